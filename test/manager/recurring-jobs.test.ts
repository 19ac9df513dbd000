/**
 * The recurring-job rules: input checks (each bad field named), due runs (a missed run once, not
 * a burst; time zones; seconds), which jobs cover a volume, and what retention removes.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { ZebuError, ErrorCode } from '../../src/errors.ts';
import { DEFAULT_GROUP, MAX_RETAIN, dueRun, jobsForVolume, retentionVictims, validateRecurringJob, checkJobName } from '../../src/manager/recurring-jobs.ts';

function refused(field: string, pattern: RegExp): (err: unknown) => boolean {
  return (err) => err instanceof ZebuError && err.code === ErrorCode.EINVAL && err.field === field && pattern.test(err.message);
}

test('recurring jobs: a valid job gets its defaults; the cron is normalised', () => {
  const spec = validateRecurringJob({ task: 'backup', cron: ' */30  * * * * * ', groups: ['nightly', 'default', 'nightly'], labels: { team: 'db' } });
  assert.deepEqual(spec, {
    task: 'backup', cron: '*/30 * * * * *', timezone: 'UTC', retain: { count: 1, maxAgeSeconds: null }, concurrency: 1,
    groups: ['default', 'nightly'], labels: { team: 'db' },
  });
  const full = validateRecurringJob({ task: 'snapshot-delete', cron: '0 3 * * 1-5', timezone: 'Europe/Berlin', retain: 7, retainMaxAgeSeconds: 86400 * 30, concurrency: 4 });
  assert.deepEqual(full.retain, { count: 7, maxAgeSeconds: 86400 * 30 });
  assert.equal(full.timezone, 'Europe/Berlin');
});

test('recurring jobs: bad input is refused with the field at fault', () => {
  const base = { task: 'snapshot', cron: '0 * * * *' };
  assert.throws(() => validateRecurringJob({ ...base, task: 'defrag' }), refused('task', /one of snapshot, snapshot-cleanup, snapshot-delete, backup, backup-force-create/));
  assert.throws(() => validateRecurringJob({ ...base, task: undefined }), refused('task', /task must be/));
  assert.throws(() => validateRecurringJob({ ...base, cron: 'every day' }), refused('cron', /every day/));
  assert.throws(() => validateRecurringJob({ ...base, cron: '61 * * * *' }), refused('cron', /minute/));
  assert.throws(() => validateRecurringJob({ ...base, cron: '0 0 0 * * * 2030' }), refused('cron', /five|six|parts/i));
  assert.throws(() => validateRecurringJob({ ...base, cron: '' }), refused('cron', /required/));
  assert.throws(() => validateRecurringJob({ ...base, timezone: 'Mars/Olympus' }), refused('timezone', /Mars\/Olympus.*IANA/));
  assert.throws(() => validateRecurringJob({ ...base, retain: 0 }), refused('retain', /1 to 250/));
  assert.throws(() => validateRecurringJob({ ...base, retain: MAX_RETAIN + 1 }), refused('retain', /got 251/));
  assert.throws(() => validateRecurringJob({ ...base, retain: 2.5 }), refused('retain', /whole number/));
  assert.throws(() => validateRecurringJob({ ...base, retain: '3' }), refused('retain', /whole number/));
  assert.throws(() => validateRecurringJob({ ...base, retainMaxAgeSeconds: 5 }), refused('retainMaxAgeSeconds', /60 to/));
  assert.throws(() => validateRecurringJob({ ...base, concurrency: 0 }), refused('concurrency', /1 to 100/));
  assert.throws(() => validateRecurringJob({ ...base, groups: 'nightly' }), refused('groups', /list/));
  assert.throws(() => validateRecurringJob({ ...base, groups: ['Nightly!'] }), refused('groups', /lowercase/));
  assert.throws(() => validateRecurringJob({ ...base, labels: { 'a b': 'x' } }), refused('labels', /label key/));
  assert.throws(() => validateRecurringJob({ ...base, labels: { a: 3 } }), refused('labels', /string/));
  assert.throws(() => checkJobName('-x'), refused('name', /lowercase/));
  assert.equal(checkJobName('nightly-backup'), 'nightly-backup');
});

test('recurring jobs: a missed run is run once when the manager is back, not once per missed time', () => {
  const spec = { cron: '0 * * * *', timezone: 'UTC' };
  const created = new Date('2026-01-01T00:10:00Z');
  // A new job waits for its first scheduled time.
  assert.deepEqual(dueRun(spec, created, new Date('2026-01-01T00:59:59Z')), { due: false, next: new Date('2026-01-01T01:00:00Z') });
  assert.deepEqual(dueRun(spec, created, new Date('2026-01-01T01:00:00Z')), { due: true, next: new Date('2026-01-01T02:00:00Z') });
  // The run at 01:00 counted for 01:00: not due again until 02:00.
  assert.equal(dueRun(spec, new Date('2026-01-01T01:00:00Z'), new Date('2026-01-01T01:30:00Z')).due, false);
  // Down from 01:30 to 09:15: eight scheduled times missed, one run, and the next is 10:00.
  const back = new Date('2026-01-01T09:15:00Z');
  assert.deepEqual(dueRun(spec, new Date('2026-01-01T01:00:00Z'), back), { due: true, next: new Date('2026-01-01T10:00:00Z') });
  assert.equal(dueRun(spec, back, new Date('2026-01-01T09:59:00Z')).due, false);
});

test('recurring jobs: schedules are read in their time zone (daylight saving included) and may have seconds', () => {
  const berlin = { cron: '0 3 * * *', timezone: 'Europe/Berlin' };
  assert.deepEqual(dueRun(berlin, new Date('2026-01-15T00:00:00Z'), new Date('2026-01-15T01:00:00Z')).next, new Date('2026-01-15T02:00:00Z'));
  assert.deepEqual(dueRun(berlin, new Date('2026-07-15T00:00:00Z'), new Date('2026-07-15T00:30:00Z')).next, new Date('2026-07-15T01:00:00Z'));
  const everyTen = { cron: '*/10 * * * * *', timezone: 'UTC' };
  assert.deepEqual(dueRun(everyTen, new Date('2026-01-01T00:00:00Z'), new Date('2026-01-01T00:00:09Z')), { due: false, next: new Date('2026-01-01T00:00:10Z') });
  assert.deepEqual(dueRun(everyTen, new Date('2026-01-01T00:00:00Z'), new Date('2026-01-01T00:00:10Z')), { due: true, next: new Date('2026-01-01T00:00:20Z') });
});

test('recurring jobs: a volume is covered by the jobs it names and those of its groups; with neither, by the default group', () => {
  const job = (name: string, groups: string[]) => ({ name, spec: { groups } });
  const jobs = [job('hourly', [DEFAULT_GROUP]), job('nightly', ['db']), job('weekly', []), job('both', ['db', DEFAULT_GROUP])];
  const names = (v: Parameters<typeof jobsForVolume>[0]) => jobsForVolume(v, jobs).map((j) => j.name);
  assert.deepEqual(names({}), ['hourly', 'both']);
  assert.deepEqual(names({ recurringJobs: [], recurringJobGroups: [] }), ['hourly', 'both']);
  assert.deepEqual(names({ recurringJobs: ['weekly'] }), ['weekly']);
  assert.deepEqual(names({ recurringJobGroups: ['db'] }), ['nightly', 'both']);
  assert.deepEqual(names({ recurringJobs: ['weekly'], recurringJobGroups: ['db'] }), ['nightly', 'weekly', 'both']);
  assert.deepEqual(names({ recurringJobGroups: ['unknown'] }), []);
});

test('recurring jobs: retention removes beyond the count and past the age, never the newest', () => {
  const now = new Date('2026-02-01T00:00:00Z');
  const item = (name: string, daysAgo: number) => ({ name, createdAt: new Date(now.getTime() - daysAgo * 86400_000).toISOString() });
  const items = [item('d3', 3), item('d1', 1), item('d40', 40), item('d10', 10), item('d0', 0)];
  const victims = (retain: { count: number; maxAgeSeconds: number | null }) => retentionVictims(items, retain, now).map((i) => i.name).sort();
  assert.deepEqual(victims({ count: 3, maxAgeSeconds: null }), ['d10', 'd40']);
  assert.deepEqual(victims({ count: 10, maxAgeSeconds: null }), []);
  assert.deepEqual(victims({ count: 10, maxAgeSeconds: 5 * 86400 }), ['d10', 'd40']);
  assert.deepEqual(victims({ count: 1, maxAgeSeconds: null }), ['d1', 'd10', 'd3', 'd40']);
  // Everything is old: the newest stays.
  assert.deepEqual(retentionVictims([item('a', 90), item('b', 60)], { count: 5, maxAgeSeconds: 86400 }, now).map((i) => i.name), ['a']);
});
