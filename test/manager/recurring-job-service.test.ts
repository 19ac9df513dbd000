/**
 * Recurring jobs in the store: create (defaults, next run, a name taken), list and get with the
 * volumes each job covers, update (checked as a whole; a new schedule starts from now), delete
 * (volumes stop naming it), and which jobs and groups a volume joins (unknown ones refused).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { SqliteStore } from '../../src/store/sqlite-store.ts';
import { Kind, Objects } from '../../src/cluster/objects.ts';
import { EventRecorder } from '../../src/manager/events.ts';
import { RecurringJobServiceImpl } from '../../src/manager/recurring-job-service.ts';
import { ZebuError, ErrorCode } from '../../src/errors.ts';

function code(c: string, pattern: RegExp): (err: unknown) => boolean {
  return (err) => err instanceof ZebuError && err.code === c && pattern.test(err.message);
}

async function setup(t: { after: (fn: () => void) => void }) {
  const store = SqliteStore.open(':memory:');
  t.after(() => store.close());
  const objects = new Objects(store);
  let now = new Date('2026-03-01T10:15:00Z');
  const service = new RecurringJobServiceImpl({ objects, events: new EventRecorder(objects), now: () => now });
  for (const name of ['db', 'web', 'scratch']) {
    await objects.create(Kind.Volume, name, {
      spec: { sizeBytes: 1 << 30, numberOfReplicas: 1, nodeId: null, maintenance: false },
      status: { state: 'detached', robustness: 'healthy', epoch: 0, currentNodeId: null, attachStartedAt: null, endpoint: null, message: null, snapshots: [] },
      createdAt: now.toISOString(), deletionRequestedAt: null,
    });
  }
  return { objects, service, setNow: (d: Date) => (now = d) };
}

test('recurring job service: create, list, get; a new job waits for its first scheduled time; names are unique', async (t) => {
  const { objects, service } = await setup(t);
  const hourly = await service.createRecurringJob({ name: 'hourly', task: 'snapshot', cron: '0 * * * *', groups: ['default'], retain: 5 });
  assert.equal(hourly.nextRunAt, '2026-03-01T11:00:00.000Z');
  assert.equal(hourly.lastRunAt, null);
  assert.deepEqual(hourly.members, ['db', 'scratch', 'web'], 'volumes that name no job are in the default group');
  await service.createRecurringJob({ name: 'nightly', task: 'backup', cron: '0 0 2 * * *', timezone: 'America/New_York', groups: ['db-tier'] });
  assert.deepEqual((await service.listRecurringJobs()).map((j) => [j.name, j.nextRunAt]), [['hourly', '2026-03-01T11:00:00.000Z'], ['nightly', '2026-03-02T07:00:00.000Z']]);
  await assert.rejects(service.createRecurringJob({ name: 'hourly', task: 'backup', cron: '* * * * *' }), code(ErrorCode.EXISTS, /recurring job hourly already exists/));
  await assert.rejects(service.createRecurringJob({ name: 'Bad_Name', task: 'backup', cron: '* * * * *' }), code(ErrorCode.EINVAL, /lowercase/));
  await assert.rejects(service.createRecurringJob({ name: 'x', task: 'backup', cron: '* * * *' }), code(ErrorCode.EINVAL, /cron/));
  await assert.rejects(service.getRecurringJob('nope'), code(ErrorCode.NOT_FOUND, /recurring job nope not found/));
  // Nothing half-made by the refused ones.
  assert.deepEqual((await objects.list(Kind.RecurringJob)).map((j) => j.name).sort(), ['hourly', 'nightly']);
  const events = (await objects.list(Kind.Event)).map((e) => e.value.reason);
  assert.equal(events.filter((r) => r === 'RecurringJobCreated').length, 2);
});

test('recurring job service: update checks the whole job; a new schedule starts from now', async (t) => {
  const { service, setNow } = await setup(t);
  await service.createRecurringJob({ name: 'hourly', task: 'snapshot', cron: '0 * * * *' });
  setNow(new Date('2026-03-01T12:30:00Z'));
  const kept = await service.updateRecurringJob('hourly', { retain: 9 });
  assert.equal(kept.retain, 9);
  assert.equal(kept.nextRunAt, '2026-03-01T11:00:00.000Z', 'same schedule: the due run is not lost');
  const moved = await service.updateRecurringJob('hourly', { cron: '*/15 * * * *' });
  assert.equal(moved.nextRunAt, '2026-03-01T12:45:00.000Z');
  await assert.rejects(service.updateRecurringJob('hourly', { retain: 0 }), code(ErrorCode.EINVAL, /retain/));
  await assert.rejects(service.updateRecurringJob('hourly', { task: 'compact' }), code(ErrorCode.EINVAL, /task/));
  assert.equal((await service.getRecurringJob('hourly')).retain, 9, 'a refused update changes nothing');
  await assert.rejects(service.updateRecurringJob('nope', { retain: 2 }), code(ErrorCode.NOT_FOUND, /nope/));
});

test('recurring job service: volumes join jobs by name and by group; unknown jobs and groups are refused; a deleted job leaves its volumes', async (t) => {
  const { objects, service } = await setup(t);
  await service.createRecurringJob({ name: 'hourly', task: 'snapshot', cron: '0 * * * *', groups: ['default'] });
  await service.createRecurringJob({ name: 'nightly', task: 'backup', cron: '0 2 * * *', groups: ['db-tier'] });
  await service.createRecurringJob({ name: 'weekly', task: 'backup-force-create', cron: '0 3 * * 0' });

  assert.deepEqual(await service.setVolumeJobs('db', { recurringJobGroups: ['db-tier'], recurringJobs: ['weekly'] }), {
    volume: 'db', recurringJobs: ['weekly'], recurringJobGroups: ['db-tier'], jobs: ['nightly', 'weekly'],
  });
  assert.deepEqual((await service.getRecurringJob('hourly')).members, ['scratch', 'web'], 'db left the default group by naming its own');
  assert.deepEqual((await service.getRecurringJob('nightly')).members, ['db']);

  await assert.rejects(service.setVolumeJobs('web', { recurringJobs: ['hourly', 'montly'] }), code(ErrorCode.NOT_FOUND, /recurring job montly not found/));
  await assert.rejects(service.setVolumeJobs('web', { recurringJobGroups: ['db-teir'] }), code(ErrorCode.EINVAL, /no recurring job is in group db-teir.*db-tier, default/));
  await assert.rejects(service.setVolumeJobs('web', { recurringJobs: 'hourly' }), code(ErrorCode.EINVAL, /list/));
  await assert.rejects(service.setVolumeJobs('nope', { recurringJobs: [] }), code(ErrorCode.NOT_FOUND, /volume nope not found/));
  assert.equal((await objects.get(Kind.Volume, 'web'))!.value.spec.recurringJobs, undefined, 'refused: nothing changed');

  await service.deleteRecurringJob('weekly');
  assert.deepEqual((await objects.get(Kind.Volume, 'db'))!.value.spec.recurringJobs, []);
  assert.deepEqual((await service.getRecurringJob('nightly')).members, ['db'], 'still in its group');
  await assert.rejects(service.deleteRecurringJob('weekly'), code(ErrorCode.NOT_FOUND, /weekly/));
});
