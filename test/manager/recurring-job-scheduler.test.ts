/**
 * The scheduler with a fake clock and fake tasks: a job runs when due and once for a run the
 * manager missed, `concurrency` volumes at a time, one task per volume at a time across jobs;
 * results, last and next run are stored; a new scheduler (a restarted manager) runs again what
 * was left `running` and releases the attachment of a job that is gone; a backup job's volume
 * whose recovery point is too old gets one warning.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { SqliteStore } from '../../src/store/sqlite-store.ts';
import { Kind, Objects, type RecurringJobValue } from '../../src/cluster/objects.ts';
import { EventRecorder } from '../../src/manager/events.ts';
import { RecurringJobScheduler } from '../../src/manager/recurring-job-scheduler.ts';
import type { JobTasks, TaskOutcome } from '../../src/manager/recurring-job-tasks.ts';
import { validateRecurringJob } from '../../src/manager/recurring-jobs.ts';
import type { StoreObject } from '../../src/store/store.ts';

async function setup(t: { after: (fn: () => void) => void }, volumes: string[]) {
  const store = SqliteStore.open(':memory:');
  t.after(() => store.close());
  const objects = new Objects(store);
  const events = new EventRecorder(objects);
  for (const name of volumes) {
    await objects.create(Kind.Volume, name, {
      spec: { sizeBytes: 4096, numberOfReplicas: 1, nodeId: null, maintenance: false },
      status: { state: 'detached', robustness: 'healthy', epoch: 0, currentNodeId: null, attachStartedAt: null, endpoint: null, message: null, snapshots: [] },
      createdAt: '2026-01-01T00:00:00Z', deletionRequestedAt: null,
    });
  }
  return { objects, events };
}

async function createJob(objects: Objects, name: string, input: Record<string, unknown>, createdAt: string): Promise<void> {
  const spec = validateRecurringJob(input);
  const value: RecurringJobValue = { spec, status: { createdAt, lastRunFor: createdAt, lastRunAt: null, nextRunAt: null, volumes: {} } };
  await objects.create(Kind.RecurringJob, name, value);
}

/** Tasks that take as long as the test says and record who ran when. */
class FakeTasks {
  log: { job: string; volume: string; start: number; end: number }[] = [];
  released: { job: string; volume: string }[] = [];
  running = 0;
  maxRunning = 0;
  private t = 0;
  durationMs = 30;
  outcome: TaskOutcome = { result: 'completed', message: 'done' };

  async run(job: StoreObject<RecurringJobValue>, volume: string): Promise<TaskOutcome> {
    const start = this.t++;
    this.running++;
    this.maxRunning = Math.max(this.maxRunning, this.running);
    await new Promise((r) => setTimeout(r, this.durationMs));
    this.running--;
    this.log.push({ job: job.name, volume, start, end: this.t++ });
    return this.outcome;
  }

  async release(job: string, volume: string): Promise<void> {
    this.released.push({ job, volume });
  }
}

test('scheduler: due runs (a missed run once), stored results and times, concurrency, one task per volume at a time', async (t) => {
  const { objects, events } = await setup(t, ['a', 'b', 'c', 'd']);
  let now = new Date('2026-01-01T10:00:30Z');
  await createJob(objects, 'hourly', { task: 'snapshot', cron: '0 * * * *', concurrency: 2, groups: ['default'] }, '2026-01-01T09:00:30Z');
  await createJob(objects, 'other', { task: 'backup', cron: '0 * * * *', concurrency: 4, groups: ['default'] }, '2026-01-01T09:00:30Z');
  const tasks = new FakeTasks();
  const scheduler = new RecurringJobScheduler({ objects, events, tasks: tasks as unknown as JobTasks, now: () => now, pollMs: 3_600_000 });
  t.after(() => scheduler.stop());
  scheduler.kick();
  await scheduler.idle();
  // 10:00 was due (created 09:00:30): each job ran once for every volume.
  assert.equal(tasks.log.length, 8);
  const job = (await objects.must(Kind.RecurringJob, 'hourly')).value;
  assert.equal(job.status.lastRunAt, '2026-01-01T10:00:30.000Z');
  assert.equal(job.status.nextRunAt, '2026-01-01T11:00:00.000Z');
  assert.deepEqual(Object.keys(job.status.volumes).sort(), ['a', 'b', 'c', 'd']);
  assert.ok(Object.values(job.status.volumes).every((r) => r.result === 'completed' && r.message === 'done'));
  // Never two tasks on one volume at once.
  for (const v of ['a', 'b', 'c', 'd']) {
    const [x, y] = tasks.log.filter((e) => e.volume === v);
    assert.ok(x.end < y.start || y.end < x.start, `volume ${v}: ${JSON.stringify([x, y])}`);
  }
  assert.ok(tasks.maxRunning <= 4);

  // Not due again before 11:00; the manager "down" from 10:00 to 15:20: one run, not five.
  now = new Date('2026-01-01T10:59:59Z');
  scheduler.kick();
  await scheduler.idle();
  assert.equal(tasks.log.length, 8);
  now = new Date('2026-01-01T15:20:00Z');
  scheduler.kick();
  await scheduler.idle();
  scheduler.kick();
  await scheduler.idle();
  assert.equal(tasks.log.length, 16);
  assert.equal((await objects.must(Kind.RecurringJob, 'hourly')).value.status.nextRunAt, '2026-01-01T16:00:00.000Z');
});

test('scheduler: concurrency bounds the volumes of one job processed at once', async (t) => {
  const { objects, events } = await setup(t, ['a', 'b', 'c', 'd', 'e']);
  await createJob(objects, 'j', { task: 'snapshot', cron: '* * * * *', concurrency: 2 }, '2026-01-01T09:00:00Z');
  const tasks = new FakeTasks();
  const scheduler = new RecurringJobScheduler({ objects, events, tasks: tasks as unknown as JobTasks, now: () => new Date('2026-01-01T09:05:00Z'), pollMs: 3_600_000 });
  t.after(() => scheduler.stop());
  await objects.mutate(Kind.Volume, 'a', (v) => {
    v.spec.recurringJobs = ['j'];
  });
  for (const v of ['b', 'c', 'd', 'e']) {
    await objects.mutate(Kind.Volume, v, (x) => {
      x.spec.recurringJobs = ['j'];
    });
  }
  scheduler.kick();
  await scheduler.idle();
  assert.equal(tasks.log.length, 5);
  assert.equal(tasks.maxRunning, 2);
});

test('scheduler: a restarted manager runs again what was left running, releases attachments of jobs that are gone; a stale recovery point warns once', async (t) => {
  const { objects, events } = await setup(t, ['a', 'b', 'orphan']);
  const now = new Date('2026-01-01T10:00:30Z');
  await createJob(objects, 'bk', { task: 'backup', cron: '0 * * * *', groups: ['default'] }, '2026-01-01T10:00:00Z');
  await objects.mutate(Kind.RecurringJob, 'bk', (j) => {
    j.status.lastRunFor = '2026-01-01T10:00:00.000Z';
    j.status.volumes = { a: { result: 'running', message: null, at: '2026-01-01T10:00:00.000Z' }, b: { result: 'completed', message: 'done', at: '2026-01-01T10:00:01.000Z' } };
  });
  await objects.mutate(Kind.Volume, 'orphan', (v) => {
    v.spec.nodeId = 'n1';
    v.spec.maintenance = true;
    v.spec.jobAttachment = { job: 'gone', task: 'backup', node: 'n1', startedAt: '2026-01-01T09:00:00Z' };
  });
  const tasks = new FakeTasks();
  const scheduler = new RecurringJobScheduler({ objects, events, tasks: tasks as unknown as JobTasks, now: () => now, pollMs: 3_600_000, staleCheckMs: 0 });
  t.after(() => scheduler.stop());
  scheduler.kick();
  await scheduler.idle();
  assert.deepEqual(tasks.log.map((e) => `${e.job}/${e.volume}`), ['bk/a'], 'only the unfinished volume runs again; the next run is at 11:00');
  assert.deepEqual(tasks.released, [{ job: 'gone', volume: 'orphan' }]);
  const list = await events.list();
  assert.ok(list.some((e) => e.reason === 'RecurringJobResumed' && /runs again on a/.test(e.message)));
  assert.equal((await objects.must(Kind.RecurringJob, 'bk')).value.status.volumes.a.result, 'completed');

  // No backup of any volume although the hourly job is 2 h old... here it is 30 s old: no warning.
  assert.ok(!list.some((e) => e.reason === 'RecoveryPointStale'));
  const later = new Date('2026-01-01T12:30:00Z');
  const stale = new RecurringJobScheduler({ objects, events, tasks: tasks as unknown as JobTasks, now: () => later, pollMs: 3_600_000, staleCheckMs: 0 });
  tasks.outcome = { result: 'error', message: 'target down' };
  stale.kick();
  await stale.idle();
  stale.kick();
  await stale.idle();
  await stale.stop();
  const warnings = (await events.list()).filter((e) => e.reason === 'RecoveryPointStale');
  assert.deepEqual(warnings.map((w) => w.volume).sort(), ['a', 'b', 'orphan'], 'one warning per volume, not one per look');
  assert.match(warnings[0].message, /no backup although its backup job\(s\) bk should have made one/);
  const failed = (await events.list()).filter((e) => e.reason === 'RecurringJobFailed');
  assert.ok(failed.length >= 1 && failed.every((e) => e.type === 'Warning'));
});
