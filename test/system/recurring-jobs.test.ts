/**
 * Recurring jobs through `zebu up`, the real CLI and real NBD clients, on schedules of a few
 * seconds:
 * - the scenario of Longhorn's "recurring backup of detached volumes", with Zebu's rules: with
 *   allow-recurring-job-while-volume-detached false a detached volume's backup job is suspended
 *   and says so; with it true the job attaches the volume without an NBD export, backs it up and
 *   detaches it; later runs find nothing changed and say `skipped: unchanged since backup B`
 *   (no identical backup, the recovery point moves on); a workload attach during a job waits and
 *   then succeeds; data written and the volume detached makes the next run back it up again;
 *   retention keeps the job's newest backups; no replica is ever added or moved;
 * - snapshot jobs: retention counts only the job's snapshots, an unchanged volume gets no new
 *   snapshot, two jobs due together on one volume both run; a backup target that is down makes
 *   the run fail with the snapshots kept, and a later run succeeds; a time-zone schedule;
 * - `zebu up` SIGKILLed while a job holds a volume: after the restart the job runs again and the
 *   volume is not left attached.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import crypto from 'node:crypto';
import { spawn } from 'node:child_process';
import { writeAt, readVolume } from '../support/volume-io.ts';
import { startZebuUp, stopZebuUp, zebu, mustZebu, mustZebuJson, zebuDataDir, waitFor, type ZebuUp } from '../support/zebu-up.ts';
import { ZEBU_MAIN } from '../support/replica-process.ts';

const MiB = 1024 * 1024;

interface JobResult { volume: string; result: string; message: string | null; at: string }
interface Job { name: string; results: JobResult[]; nextRunAt: string | null; lastRunAt: string | null }
interface Backup { name: string; volume: string; state: string; base: string | null; labels: Record<string, string>; requestedAt: string; snapshot: string }

function jobResult(up: ZebuUp, job: string, volume: string): JobResult | undefined {
  return mustZebuJson<Job>(up, ['recurring-job', 'get', job]).results.find((r) => r.volume === volume);
}

function backupsOf(up: ZebuUp, volume: string): Backup[] {
  return mustZebuJson<Backup[]>(up, ['backup', 'list', '--volume', volume]);
}

function newestCompleted(up: ZebuUp, volume: string): Backup {
  const list = backupsOf(up, volume).filter((b) => b.state === 'completed').sort((a, b) => (a.requestedAt < b.requestedAt ? 1 : -1));
  assert.ok(list.length > 0, `volume ${volume} has a completed backup`);
  return list[0];
}

function replicaNames(up: ZebuUp, volume: string): string[] {
  return mustZebuJson<{ name: string }[]>(up, ['replica', 'list', '--volume', volume]).map((r) => r.name).sort();
}

/** A CLI command running in the background (an attach that waits). */
function zebuAsync(up: ZebuUp, args: string[]): Promise<{ status: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [ZEBU_MAIN, ...args], { env: { ...process.env, ZEBU_API: up.api, ZEBU_TOKEN: up.token }, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d) => (stdout += d));
    child.stderr.on('data', (d) => (stderr += d));
    child.on('close', (status) => resolve({ status, stdout, stderr }));
  });
}

/**
 * The results of the given jobs on the volume from their first runs that started after `since`
 * (a run that started before it may not have seen what was written just before).
 */
async function nextResults(up: ZebuUp, jobs: string[], volume: string, since: string, timeoutMs = 60_000): Promise<Record<string, JobResult>> {
  // Polled through the API every 20 ms: a result lasts only until the job's next run starts.
  const out: Record<string, JobResult> = {};
  return waitFor(`results of ${jobs.join(', ')} on ${volume} after ${since}`, async () => {
    for (const job of jobs) {
      if (out[job] !== undefined) continue;
      const r = await fetch(`${up.api}/v1/recurringjobs/${job}`, { headers: { authorization: `Bearer ${up.token}` } });
      assert.equal(r.status, 200);
      const j = (await r.json()) as Job;
      const result = j.results.find((x) => x.volume === volume);
      if (j.lastRunAt !== null && j.lastRunAt > since && result !== undefined && result.result !== 'running') out[job] = result;
    }
    return jobs.every((job) => out[job] !== undefined) ? out : undefined;
  }, timeoutMs, 20);
}

/** The volume as the API returns it, without a CLI process (fast enough to catch a job's short hold). */
async function apiVolume(up: ZebuUp, name: string): Promise<{ heldByJob: unknown; state: string }> {
  const r = await fetch(`${up.api}/v1/volumes/${name}`, { headers: { authorization: `Bearer ${up.token}` } });
  assert.equal(r.status, 200);
  return (await r.json()) as { heldByJob: unknown; state: string };
}

test('backups of a detached volume: suspended, then attached without export, skipped when unchanged, waited for by a workload attach, retained', async (t) => {
  const dataDir = zebuDataDir(t);
  const root = path.dirname(dataDir);
  const work = path.join(root, 'work');
  fs.mkdirSync(work);
  const up = await startZebuUp({ dataDir });
  t.after(() => stopZebuUp(up));

  mustZebu(up, ['backup-target', 'set', `file://${path.join(root, 'backups')}`]);
  mustZebu(up, ['volume', 'create', 'v1', '--size', '256MiB', '--replicas', '2']);
  let uri = mustZebu(up, ['volume', 'attach', 'v1']).trim();
  writeAt(work, uri, 0, crypto.randomBytes(4 * MiB));
  mustZebu(up, ['volume', 'detach', 'v1']);
  const replicas = replicaNames(up, 'v1');
  assert.equal(replicas.length, 2);

  mustZebu(up, ['recurring-job', 'create', 'bk', '--task', 'backup', '--cron', '*/2 * * * * *', '--retain', '2']);
  mustZebu(up, ['volume', 'update', 'v1', '--recurring-job', 'bk']);

  // Setting false (the default): suspended, visibly; no backup, the volume stays detached.
  const suspended = await waitFor('the job to be suspended on v1', () => {
    const r = jobResult(up, 'bk', 'v1');
    return r?.result === 'suspended' ? r : undefined;
  });
  assert.match(suspended.message!, /detached.*allow-recurring-job-while-volume-detached is false/);
  const detachedView = mustZebuJson(up, ['volume', 'get', 'v1']);
  assert.equal(detachedView.state, 'detached');
  assert.equal(detachedView.recurringJobs[0].result, 'suspended');
  assert.match(mustZebu(up, ['volume', 'get', 'v1']), /recurring jobs:\s+bk \(backup, next .*\): suspended: volume v1 is detached/);
  assert.equal(backupsOf(up, 'v1').length, 0);
  assert.equal(detachedView.lastBackup, null);

  // Setting true: attached with no NBD export, backed up, detached.
  mustZebu(up, ['setting', 'set', 'allow-recurring-job-while-volume-detached', 'true']);
  const held = await waitFor('the job to attach v1', () => {
    const v = mustZebuJson(up, ['volume', 'get', 'v1']);
    return v.heldByJob !== null ? v : undefined;
  }, 60_000, 50);
  assert.equal(held.heldByJob.job, 'bk');
  assert.equal(held.frontend, false, 'no NBD export while the job holds it');
  assert.equal(held.endpoint, null);
  const first = await waitFor('a completed backup of v1', () => backupsOf(up, 'v1').find((b) => b.state === 'completed'));
  assert.equal(first.labels['recurring-job'], 'bk');

  // Nothing written since: the next runs attach, skip visibly, detach.
  const skipped = await waitFor('a skipped run', () => {
    const r = jobResult(up, 'bk', 'v1');
    return r?.result === 'skipped' ? r : undefined;
  });
  assert.equal(skipped.message, `skipped: unchanged since backup ${first.name}`);
  const events = mustZebuJson<{ reason: string; message: string }[]>(up, ['events', '--volume', 'v1']);
  assert.ok(events.some((e) => e.reason === 'BackupSkipped' && e.message.includes(first.name)), 'an event says the backup was skipped');
  assert.equal(backupsOf(up, 'v1').filter((b) => b.state === 'completed').length, 1, 'no identical backup');
  const covered = mustZebuJson(up, ['volume', 'get', 'v1']);
  assert.equal(covered.lastBackup, first.name);
  assert.ok(covered.recoveryPointAt > first.requestedAt, `the recovery point moved on (${covered.recoveryPointAt} > ${first.requestedAt})`);
  assert.ok(covered.recoveryPointAgeSeconds < 30);
  assert.match(mustZebu(up, ['volume', 'list']), /LAST BACKUP\s+RECOVERY POINT AGE/);

  // A workload attach while a job holds the volume waits, then succeeds with an export. The job
  // holds it longest while it backs up much new data; the CLI may still come too late (a slow
  // machine): then the attach is an ordinary one, and the next try writes more.
  let waited: { status: number | null; stdout: string; stderr: string } | null = null;
  for (let attempt = 0; attempt < 6 && waited === null; attempt++) {
    uri = mustZebu(up, ['volume', 'attach', 'v1']).trim();
    writeAt(work, uri, ((attempt % 3) * 64 + 40) * MiB, crypto.randomBytes(64 * MiB));
    mustZebu(up, ['volume', 'detach', 'v1']);
    await waitFor('the job to hold v1 again', async () => (await apiVolume(up, 'v1')).heldByJob !== null, 60_000, 10);
    const attached = await zebuAsync(up, ['volume', 'attach', 'v1', '--timeout', '120']);
    assert.equal(attached.status, 0, attached.stderr);
    if (/held by recurring job bk .*waits/.test(attached.stderr)) waited = attached;
    else mustZebu(up, ['volume', 'detach', 'v1']);
  }
  assert.ok(waited !== null, 'an attach came while the job held the volume, and waited for it');
  uri = waited.stdout.trim();
  assert.match(uri, /^nbd:\/\//);
  const view = mustZebuJson(up, ['volume', 'get', 'v1']);
  assert.equal(view.heldByJob, null);
  assert.equal(view.frontend, true);
  assert.ok(mustZebuJson<{ reason: string }[]>(up, ['events', '--volume', 'v1']).some((e) => e.reason === 'AttachResumed'));

  // Attached by the workload: the job runs on it as it is (and leaves it attached).
  // (A run that started during the write may back it up; the first run after it then finds it unchanged.)
  let before = new Set(backupsOf(up, 'v1').map((b) => b.name));
  writeAt(work, uri, 8 * MiB, crypto.randomBytes(2 * MiB));
  const ran = await nextResults(up, ['bk'], 'v1', new Date().toISOString());
  assert.ok(ran.bk.result === 'completed' || ran.bk.result === 'skipped', JSON.stringify(ran));
  const second = newestCompleted(up, 'v1');
  assert.ok(!before.has(second.name), 'the data written made a new backup');
  assert.ok(ran.bk.message!.includes(second.name), `${ran.bk.message} names ${second.name}`);
  assert.notEqual(second.base, null, 'incremental');
  assert.equal(mustZebuJson(up, ['volume', 'get', 'v1']).state, 'attached');
  const image = readVolume(work, uri);
  mustZebu(up, ['volume', 'detach', 'v1']);

  // Written and detached again: the next run backs it up; retention keeps the job's newest 2.
  // The job waits meanwhile: a run while the workload writes would back up half the write, the
  // run after it the rest — two new backups, and retention would rightly let `second` go.
  mustZebu(up, ['recurring-job', 'update', 'bk', '--cron', '0 0 1 1 *']);
  await waitFor('no run of bk under way', () => mustZebuJson(up, ['volume', 'get', 'v1']).state === 'detached' || undefined, 60_000, 50);
  uri = mustZebu(up, ['volume', 'attach', 'v1']).trim();
  before = new Set(backupsOf(up, 'v1').map((b) => b.name));
  writeAt(work, uri, 16 * MiB, crypto.randomBytes(MiB));
  mustZebu(up, ['volume', 'detach', 'v1']);
  await waitFor('v1 detached by its workload', () => mustZebuJson(up, ['volume', 'get', 'v1']).state === 'detached' || undefined, 60_000, 50);
  mustZebu(up, ['recurring-job', 'update', 'bk', '--cron', '*/2 * * * * *']);
  const third = await nextResults(up, ['bk'], 'v1', new Date().toISOString(), 90_000);
  assert.ok(third.bk.result === 'completed' || third.bk.result === 'skipped', JSON.stringify(third));
  assert.ok(!before.has(newestCompleted(up, 'v1').name), 'the data written made a new backup');
  const kept = backupsOf(up, 'v1').filter((b) => b.state === 'completed');
  assert.equal(kept.length, 2, kept.map((b) => b.name).join(', '));
  assert.ok(!kept.some((b) => b.name === first.name) && kept.some((b) => b.name === second.name));

  // The second backup holds what the volume held then.
  mustZebu(up, ['recurring-job', 'delete', 'bk']);
  await waitFor('v1 detached', () => mustZebuJson(up, ['volume', 'get', 'v1']).state === 'detached');
  mustZebu(up, ['volume', 'create', 'copy', '--from-backup', second.name, '--replicas', '1']);
  await waitFor('the restore to complete', () => mustZebuJson(up, ['volume', 'get', 'copy']).restore?.state === 'completed', 120_000);
  const copyUri = mustZebu(up, ['volume', 'attach', 'copy']).trim();
  assert.ok(readVolume(work, copyUri).equals(image), 'the restored backup equals the volume at that backup');
  mustZebu(up, ['volume', 'detach', 'copy']);

  assert.deepEqual(replicaNames(up, 'v1'), replicas, 'the job never added or moved a replica');
  const metrics = await (await fetch(`${up.api}/metrics`, { headers: { authorization: `Bearer ${up.token}` } })).text();
  assert.match(metrics, /zebu_volume_last_backup_timestamp_seconds\{volume="v1"\} \d+/);
  assert.match(metrics, /zebu_volume_recovery_point_timestamp_seconds\{volume="v1"\} \d+/);
});

interface Snapshot { name: string; parent: string | null; sizeBytesUsed: number; createdAt: string }

test('snapshot jobs: retention of their own snapshots, no identical snapshot, two jobs at once, snapshots kept while the target is down, snapshot-delete, time zones', async (t) => {
  const dataDir = zebuDataDir(t);
  const root = path.dirname(dataDir);
  const work = path.join(root, 'work');
  const targetDir = path.join(root, 'backups');
  fs.mkdirSync(work);
  const up = await startZebuUp({ dataDir });
  t.after(() => stopZebuUp(up));
  mustZebu(up, ['backup-target', 'set', `file://${targetDir}`]);
  mustZebu(up, ['volume', 'create', 'v2', '--size', '64MiB', '--replicas', '2']);
  const uri = mustZebu(up, ['volume', 'attach', 'v2']).trim();
  writeAt(work, uri, 0, crypto.randomBytes(MiB));
  mustZebu(up, ['snapshot', 'create', 'v2', 'mine']);
  const snapshots = (): Snapshot[] => mustZebuJson<Snapshot[]>(up, ['snapshot', 'list', 'v2']);
  const jobSnapshots = (): string[] => snapshots().map((s) => s.name).filter((n) => n.startsWith('snap-'));

  // Two jobs due at the same times on one volume: both run, one after the other.
  mustZebu(up, ['recurring-job', 'create', 'snap', '--task', 'snapshot', '--cron', '*/2 * * * * *', '--retain', '2']);
  mustZebu(up, ['recurring-job', 'create', 'bk', '--task', 'backup', '--cron', '*/2 * * * * *', '--retain', '3']);
  mustZebu(up, ['volume', 'update', 'v2', '--recurring-job', 'snap', '--recurring-job', 'bk']);
  for (let round = 0; round < 4; round++) {
    const snapsBefore = new Set(jobSnapshots());
    const backupsBefore = new Set(backupsOf(up, 'v2').map((b) => b.name));
    writeAt(work, uri, (4 + round) * MiB, crypto.randomBytes(MiB));
    // The first runs that started after the write: what was written is in a snapshot and a backup
    // of this round (made by them, or by runs that started during the write).
    const results = await nextResults(up, ['snap', 'bk'], 'v2', new Date().toISOString());
    assert.ok(results.snap.result !== 'error' && results.bk.result !== 'error', JSON.stringify(results));
    assert.ok(jobSnapshots().some((n) => !snapsBefore.has(n)), `round ${round}: a new snapshot`);
    assert.ok(!backupsBefore.has(newestCompleted(up, 'v2').name), `round ${round}: a new backup`);
  }
  // The job runs every 2 s: between a run's new snapshot and its removal of the oldest there are
  // three for a moment, so the count is read once a run has finished.
  for (let i = 0; i < 50 && jobSnapshots().length !== 2; i++) await new Promise((r) => setTimeout(r, 100));
  assert.equal(jobSnapshots().length, 2, `the snapshot job keeps its newest 2: ${snapshots().map((s) => s.name).join(', ')}`);
  assert.ok(snapshots().some((s) => s.name === 'mine'), 'a user\'s snapshot is not the job\'s to remove');
  assert.ok(backupsOf(up, 'v2').filter((b) => b.state === 'completed').length <= 3);

  // Nothing written: no identical snapshot, no identical backup, both said.
  const quiet = await nextResults(up, ['snap', 'bk'], 'v2', new Date().toISOString());
  assert.match(quiet.snap.message!, /^skipped: unchanged since snapshot snap-/);
  assert.match(quiet.bk.message!, /^skipped: unchanged since backup backup-/);

  // The target down: the backup fails, the snapshot job keeps its snapshots beyond retain.
  fs.renameSync(targetDir, `${targetDir}.away`);
  fs.writeFileSync(targetDir, 'not a directory');
  for (let round = 0; round < 2; round++) {
    writeAt(work, uri, (10 + round) * MiB, crypto.randomBytes(MiB));
    const results = await nextResults(up, ['snap', 'bk'], 'v2', new Date().toISOString());
    assert.equal(results.bk.result, 'error', JSON.stringify(results));
    assert.match(results.bk.message!, /unavailable|failed/);
  }
  assert.ok(jobSnapshots().length >= 3, `no job snapshot pruned while backups fail (${jobSnapshots().length} kept, retain 2)`);
  const keptEvents = mustZebuJson<{ reason: string; message: string }[]>(up, ['events', '--volume', 'v2']).filter((e) => e.reason === 'SnapshotsKept');
  assert.ok(keptEvents.some((e) => /kept because the backup target is unavailable/.test(e.message)), JSON.stringify(keptEvents));
  const failedEvents = mustZebuJson<{ reason: string; type: string }[]>(up, ['events', '--volume', 'v2']);
  assert.ok(failedEvents.some((e) => e.reason === 'RecurringJobFailed' && e.type === 'Warning'));

  // Back: the next run backs up, and the snapshot job prunes to its retain again.
  fs.rmSync(targetDir);
  fs.renameSync(`${targetDir}.away`, targetDir);
  const backupsBefore = new Set(backupsOf(up, 'v2').map((b) => b.name));
  writeAt(work, uri, 12 * MiB, crypto.randomBytes(MiB));
  await nextResults(up, ['bk'], 'v2', new Date().toISOString());
  assert.ok(!backupsBefore.has(newestCompleted(up, 'v2').name), 'a backup once the target is back');
  writeAt(work, uri, 13 * MiB, crypto.randomBytes(MiB));
  await waitFor('the snapshot job back at its retain', () => jobSnapshots().length === 2, 60_000);

  // snapshot-delete keeps the newest one and what backups need, whoever made the rest.
  mustZebu(up, ['recurring-job', 'delete', 'snap']);
  mustZebu(up, ['recurring-job', 'delete', 'bk']);
  mustZebu(up, ['recurring-job', 'create', 'prune', '--task', 'snapshot-delete', '--cron', '*/2 * * * * *', '--retain', '1']);
  mustZebu(up, ['volume', 'update', 'v2', '--recurring-job', 'prune']);
  const pruned = await nextResults(up, ['prune'], 'v2', new Date().toISOString());
  assert.equal(pruned.prune.result, 'completed', JSON.stringify(pruned));
  const completed = backupsOf(up, 'v2').filter((b) => b.state === 'completed').sort((a, b) => (a.requestedAt < b.requestedAt ? 1 : -1));
  const left = snapshots().map((s) => s.name);
  assert.ok(!left.includes('mine'), `snapshot-delete removed the old user snapshot: ${left.join(', ')}`);
  assert.ok(left.includes(completed[0].snapshot), 'the newest backup\'s snapshot is kept (the next backup is incremental from it)');
  assert.ok(left.length <= 2, left.join(', '));
  mustZebu(up, ['recurring-job', 'delete', 'prune']);

  // backup-force-create makes a backup at every run, changed or not.
  mustZebu(up, ['recurring-job', 'create', 'force', '--task', 'backup-force-create', '--cron', '*/2 * * * * *', '--retain', '2']);
  mustZebu(up, ['volume', 'update', 'v2', '--recurring-job', 'force']);
  const f1 = await nextResults(up, ['force'], 'v2', new Date().toISOString());
  const f2 = await nextResults(up, ['force'], 'v2', f1.force.at);
  assert.deepEqual([f1.force.result, f2.force.result], ['completed', 'completed'], JSON.stringify([f1, f2]));
  assert.equal(backupsOf(up, 'v2').filter((b) => b.labels['recurring-job'] === 'force' && b.state === 'completed').length, 2);
  mustZebu(up, ['recurring-job', 'delete', 'force']);

  // A schedule in a time zone: midnight in India is 18:30 UTC.
  const tz = mustZebuJson<Job>(up, ['recurring-job', 'create', 'tz', '--task', 'snapshot', '--cron', '0 0 * * *', '--timezone', 'Asia/Kolkata']);
  assert.match(tz.nextRunAt!, /T18:30:00\.000Z$/);
  mustZebu(up, ['volume', 'detach', 'v2']);
});

test('zebu up SIGKILLed while a job holds a detached volume: the job runs again after the restart and the volume is not left attached', async (t) => {
  const dataDir = zebuDataDir(t);
  const root = path.dirname(dataDir);
  const work = path.join(root, 'work');
  fs.mkdirSync(work);
  let up = await startZebuUp({ dataDir });
  t.after(() => stopZebuUp(up));
  mustZebu(up, ['backup-target', 'set', `file://${path.join(root, 'backups')}`]);
  mustZebu(up, ['volume', 'create', 'v3', '--size', '256MiB', '--replicas', '2']);
  const uri = mustZebu(up, ['volume', 'attach', 'v3']).trim();
  const data = crypto.randomBytes(96 * MiB);
  writeAt(work, uri, 0, data);
  mustZebu(up, ['volume', 'detach', 'v3']);
  mustZebu(up, ['setting', 'set', 'allow-recurring-job-while-volume-detached', 'true']);
  mustZebu(up, ['recurring-job', 'create', 'bk', '--task', 'backup', '--cron', '*/3 * * * * *']);
  mustZebu(up, ['volume', 'update', 'v3', '--recurring-job', 'bk']);

  await waitFor('the job to attach v3', () => mustZebuJson(up, ['volume', 'get', 'v3']).heldByJob !== null, 60_000, 20);
  up.child.kill('SIGKILL');
  await up.exited;
  up = await startZebuUp({ dataDir });
  const events = await waitFor('the run resumed', () => {
    const list = mustZebuJson<{ reason: string; message: string }[]>(up, ['events']);
    return list.find((e) => e.reason === 'RecurringJobResumed');
  });
  assert.match(events.message, /runs again on v3/);
  const backup = await waitFor('a completed backup of v3', () => backupsOf(up, 'v3').find((b) => b.state === 'completed'), 120_000);
  // Stop the job: the volume must end detached, held by nothing.
  mustZebu(up, ['setting', 'set', 'allow-recurring-job-while-volume-detached', 'false']);
  const after = await waitFor('v3 detached and free', () => {
    const v = mustZebuJson(up, ['volume', 'get', 'v3']);
    return v.state === 'detached' && v.heldByJob === null ? v : undefined;
  }, 60_000);
  assert.equal(after.lastBackup !== null, true);
  assert.notEqual(jobResult(up, 'bk', 'v3')?.result, 'running');
  // The backup holds the data.
  mustZebu(up, ['volume', 'create', 'copy', '--from-backup', backup.name, '--replicas', '1']);
  await waitFor('the restore to complete', () => mustZebuJson(up, ['volume', 'get', 'copy']).restore?.state === 'completed', 120_000);
  const copyUri = mustZebu(up, ['volume', 'attach', 'copy']).trim();
  const image = readVolume(work, copyUri);
  assert.ok(image.subarray(0, data.length).equals(data), 'the backup taken across the restart holds the data');
  mustZebu(up, ['volume', 'detach', 'copy']);
});
