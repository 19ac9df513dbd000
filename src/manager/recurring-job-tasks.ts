/**
 * One recurring job's task on one volume: attach the volume for the job when it is detached (and
 * allowed), take the snapshot or the backup — or say plainly why none was needed — apply the
 * job's retention to what it made, and detach what it attached.
 *
 * Rules kept here (see docs/recurring-jobs.md):
 * - A job attaches a detached volume without an NBD export — on the node a workload last attached
 *   it on when that node is up, else on a node that holds a healthy replica (the manager's node
 *   when it does); never while no node that is up holds one — and marks it (`spec.jobAttachment`):
 *   the volume controller then adds no replica (nor moves one there for data locality), and a
 *   workload attach waits for the job.
 * - `backup` makes no backup identical to the last one: a probe snapshot is taken and, when no
 *   block was written between the last backup's snapshot and it, it is deleted again, the result
 *   is `skipped: unchanged since backup B` and the volume's recovery point moves to now.
 * - Retention removes only what the job made (its snapshots, recorded in its status before each
 *   is taken; its backups, labelled `recurring-job`), never the newest, and no snapshot at all
 *   while the volume's backups fail.
 */
import crypto from 'node:crypto';
import { setTimeout as delay } from 'node:timers/promises';
import { ZebuError, ErrorCode } from '../errors.ts';
import type { StoreObject } from '../store/store.ts';
import { Kind, type BackupValue, type Objects, type RecurringJobResult, type RecurringJobValue } from '../cluster/objects.ts';
import type { Settings } from '../cluster/settings.ts';
import type { EventRecorder } from './events.ts';
import type { ManagerServiceImpl } from './service.ts';
import type { BackupServiceImpl } from './backup-service.ts';
import type { BackupView } from './backup-types.ts';
import { TARGET_NAME } from './backup-controller.ts';
import {
  backupSnapshotName, backupsFailing, cleanupVictims, nameTimeStamp, jobsForVolume, retentionVictims, snapshotDeleteVictims, unchangedSince,
  type BackupFacts, type SnapshotNode,
} from './recurring-jobs.ts';
import { isBackupTask } from './protection.ts';
import { nodeForJob } from './attach-node.ts';

/** The label a job puts on the backups it makes: its retention counts only those. */
export const JOB_LABEL = 'recurring-job';
const POLL_MS = 250;

export interface TaskOutcome {
  result: Exclude<RecurringJobResult, 'running'>;
  message: string;
}

export interface JobTaskOptions {
  objects: Objects;
  settings: Settings;
  events: EventRecorder;
  volumes: Pick<ManagerServiceImpl, 'createSnapshot' | 'deleteSnapshot' | 'listSnapshots'>;
  backups: Pick<BackupServiceImpl, 'createJobBackup' | 'deleteBackup' | 'getBackup'>;
  /** Checks the backup target now (reachable and writable), recording the answer in its status. */
  checkTarget: () => Promise<void>;
  defaultNodeId: string;
  log: (event: Record<string, unknown>) => void;
}

/** Waits `ms`; an abort rejects with the abort's reason (not a generic AbortError). */
function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return delay(ms, undefined, { signal }).catch(() => {
    throw signal.reason;
  });
}

function backupFacts(b: StoreObject<BackupValue>): BackupFacts {
  return {
    name: b.name, snapshot: b.value.spec.snapshot, ownSnapshot: b.value.spec.ownSnapshot === true, state: b.value.status.state,
    requestedAt: b.value.spec.requestedAt, deleting: b.value.spec.deletionRequestedAt !== null, message: b.value.status.message,
  };
}

export class JobTasks {
  private readonly o: JobTaskOptions;

  constructor(options: JobTaskOptions) {
    this.o = options;
  }

  /** Runs `job`'s task on `volume`; never throws (a failure is the outcome `error`). */
  async run(job: StoreObject<RecurringJobValue>, volume: string, signal: AbortSignal): Promise<TaskOutcome> {
    let attachedByJob = false;
    try {
      const v = await this.o.objects.get(Kind.Volume, volume);
      if (v === null || v.value.deletionRequestedAt !== null) return { result: 'skipped', message: `volume ${volume} is being deleted` };
      const restore = v.value.spec.restore ?? null;
      if (restore !== null && restore.standby) return { result: 'skipped', message: `volume ${volume} is a DR standby of volume ${restore.sourceVolume}: it is not backed up or snapshotted until activated` };
      if (restore !== null && v.value.status.restore?.state !== 'completed') return { result: 'skipped', message: `volume ${volume} is being restored from backup ${restore.backup}` };
      const held = v.value.spec.jobAttachment ?? null;
      if (held !== null && held.job !== job.name) return { result: 'error', message: `volume ${volume} is held by recurring job ${held.job}` };
      if (held !== null) {
        // This job attached it before the manager stopped: the run goes on where it was.
        attachedByJob = true;
      } else if ((v.value.spec.moveAttachment ?? null) !== null) {
        // The manager attached it (no export) to move replicas: the job takes that attachment
        // over, so that the moves' end does not detach it under the job; the moves wait, and
        // attach it again once the job has detached it.
        attachedByJob = await this.takeOverMoveAttachment(job, volume);
      } else if (v.value.spec.nodeId === null) {
        if (v.value.status.epoch === 0) return { result: 'skipped', message: `volume ${volume} has never been attached: it holds no data yet` };
        const attach = await this.attachForJob(job, volume, signal);
        if (attach !== 'ours' && attach !== 'theirs') return attach;
        attachedByJob = attach === 'ours';
      }
      await this.waitAttached(volume, signal);
      return await this.perform(job, volume, signal);
    } catch (err) {
      if (signal.aborted) throw err;
      return { result: 'error', message: (err as Error).message };
    } finally {
      if (attachedByJob && !signal.aborted) await this.release(job.name, volume).catch((err) => this.o.log({ event: 'recurring-job-release-failed', job: job.name, volume, error: (err as Error).message }));
    }
  }

  // ---- attachment ---------------------------------------------------------------------------

  /**
   * Attaches a detached volume for the job: 'ours'; 'theirs' when a workload attached it
   * meanwhile (the job runs on that attachment and leaves it); else the outcome saying why not.
   */
  private async attachForJob(job: StoreObject<RecurringJobValue>, volume: string, signal: AbortSignal): Promise<'ours' | 'theirs' | TaskOutcome> {
    if (!(await this.o.settings.bool('allow-recurring-job-while-volume-detached'))) {
      return { result: 'suspended', message: `volume ${volume} is detached and the setting allow-recurring-job-while-volume-detached is false: the job waits until the volume is attached` };
    }
    // A detach still under way ends first (the job attaches a detached volume only).
    const deadline = Date.now() + (await this.o.settings.int('recurring-job-attach-timeout-seconds')) * 1000;
    for (;;) {
      const v = await this.o.objects.get(Kind.Volume, volume);
      if (v === null) throw new ZebuError(ErrorCode.NOT_FOUND, `volume ${volume} was deleted`);
      if (v.value.spec.nodeId !== null) return 'theirs';
      if (v.value.status.state === 'detached') break;
      if (Date.now() > deadline) throw new ZebuError(ErrorCode.TIMEOUT, `volume ${volume} is still ${v.value.status.state}`);
      await sleep(POLL_MS, signal);
    }
    const detached = await this.o.objects.get(Kind.Volume, volume);
    const node = await nodeForJob(this.o.objects, volume, detached?.value.spec.lastWorkloadNodeId ?? null, this.o.defaultNodeId);
    if (node === null) return { result: 'error', message: `volume ${volume} is detached and no node that is up holds a healthy replica of it: the job does not attach it where a rebuild would be needed` };
    let attached = false;
    const startedAt = new Date().toISOString();
    await this.o.objects.mutate(Kind.Volume, volume, (x) => {
      attached = false;
      // A workload attached it meanwhile: the job runs on that attachment.
      if (x.spec.nodeId !== null || x.deletionRequestedAt !== null) return false;
      x.spec.nodeId = node;
      x.spec.maintenance = true;
      x.spec.jobAttachment = { job: job.name, task: job.value.spec.task, node, startedAt };
      attached = true;
    });
    if (!attached) return 'theirs';
    await this.o.events.record({
      type: 'Normal', reason: 'JobAttached', kind: Kind.Volume, object: volume, volume,
      message: `recurring job ${job.name} (${job.value.spec.task}) attached detached volume ${volume} on node ${node} without an NBD export; it detaches it when done`,
    });
    return 'ours';
  }

  /** Turns the manager's attachment for replica moves into this job's; false when it is gone. */
  private async takeOverMoveAttachment(job: StoreObject<RecurringJobValue>, volume: string): Promise<boolean> {
    let taken: string | null = null;
    await this.o.objects.mutate(Kind.Volume, volume, (x) => {
      taken = null;
      const moving = x.spec.moveAttachment ?? null;
      if (moving === null || x.spec.nodeId === null || (x.spec.jobAttachment ?? null) !== null) return false;
      x.spec.moveAttachment = null;
      x.spec.jobAttachment = { job: job.name, task: job.value.spec.task, node: x.spec.nodeId, startedAt: new Date().toISOString() };
      taken = x.spec.nodeId;
    });
    if (taken === null) return false;
    await this.o.events.record({
      type: 'Normal', reason: 'JobAttached', kind: Kind.Volume, object: volume, volume,
      message: `recurring job ${job.name} (${job.value.spec.task}) took over the attachment of volume ${volume} on node ${taken} made for replica moves; the moves go on after it`,
    });
    return true;
  }

  /** Waits until the volume is attached and its engine serves (the job's attachment or a workload's). */
  private async waitAttached(volume: string, signal: AbortSignal): Promise<void> {
    const timeoutS = await this.o.settings.int('recurring-job-attach-timeout-seconds');
    const deadline = Date.now() + timeoutS * 1000;
    for (;;) {
      const [v, engine] = await Promise.all([this.o.objects.get(Kind.Volume, volume), this.o.objects.get(Kind.Engine, volume)]);
      if (v === null || v.value.deletionRequestedAt !== null) throw new ZebuError(ErrorCode.NOT_FOUND, `volume ${volume} was deleted`);
      if (v.value.spec.nodeId === null) throw new ZebuError(ErrorCode.BUSY, `volume ${volume} was detached before the job could run`);
      const e = engine?.value;
      if (v.value.status.state === 'attached' && e !== undefined && e.status.state === 'running' && e.status.epoch === v.value.status.epoch) return;
      if (Date.now() > deadline) {
        throw new ZebuError(ErrorCode.TIMEOUT, `volume ${volume} was not attached within ${timeoutS} s (it is ${v.value.status.state}${v.value.status.message !== null ? `: ${v.value.status.message}` : ''})`);
      }
      await sleep(POLL_MS, signal);
    }
  }

  /** Detaches what the job attached; a workload attach that waited is applied by the volume controller. */
  async release(jobName: string, volume: string): Promise<void> {
    let released = false;
    const after = await this.o.objects.mutate(Kind.Volume, volume, (x) => {
      released = false;
      if ((x.spec.jobAttachment ?? null) === null || x.spec.jobAttachment!.job !== jobName) return false;
      x.spec.jobAttachment = null;
      x.spec.nodeId = null;
      x.spec.maintenance = false;
      released = true;
    });
    if (!released) return;
    const waiting = after?.value.spec.pendingAttach ?? null;
    await this.o.events.record({
      type: 'Normal', reason: 'JobDetached', kind: Kind.Volume, object: volume, volume,
      message: `recurring job ${jobName} is done with volume ${volume}: detaching it${waiting !== null ? `; then it attaches to node ${waiting.nodeId} as asked` : ''}`,
    });
  }

  // ---- tasks --------------------------------------------------------------------------------

  private async perform(job: StoreObject<RecurringJobValue>, volume: string, signal: AbortSignal): Promise<TaskOutcome> {
    switch (job.value.spec.task) {
      case 'snapshot':
        return this.snapshotTask(job, volume);
      case 'backup':
      case 'backup-force-create':
        return this.backupTask(job, volume, signal);
      case 'snapshot-cleanup':
        return this.cleanupTask(volume);
      case 'snapshot-delete':
        return this.snapshotDeleteTask(job, volume);
    }
  }

  private async snapshots(volume: string): Promise<SnapshotNode[]> {
    return (await this.o.volumes.listSnapshots(volume)).map((s) => ({ name: s.name, parent: s.parent, createdAt: s.createdAt, sizeBytesUsed: s.sizeBytesUsed }));
  }

  private async volumeBackups(volume: string): Promise<StoreObject<BackupValue>[]> {
    const target = await this.o.objects.get(Kind.BackupTarget, TARGET_NAME);
    return (await this.o.objects.list(Kind.Backup)).filter((b) => b.value.spec.volume === volume && (target === null || b.value.spec.targetUrl === target.value.spec.url));
  }

  /** Why snapshots of the volume must be kept now (its backups fail), or null. */
  private async pruneRefusal(volume: string, backups: StoreObject<BackupValue>[]): Promise<string | null> {
    const [target, v, jobs] = await Promise.all([
      this.o.objects.get(Kind.BackupTarget, TARGET_NAME), this.o.objects.get(Kind.Volume, volume), this.o.objects.list(Kind.RecurringJob),
    ]);
    const hasBackupJob = v !== null && jobsForVolume(v.value.spec, jobs.map((j) => ({ name: j.name, spec: j.value.spec }))).some((j) => isBackupTask(j.spec.task));
    return backupsFailing(backups.map(backupFacts), target === null ? null : target.value.status, hasBackupJob);
  }

  private async snapshotTask(job: StoreObject<RecurringJobValue>, volume: string): Promise<TaskOutcome> {
    const now = new Date();
    const name = `${job.name.slice(0, 36).replace(/-+$/, '')}-${nameTimeStamp(now)}-${crypto.randomBytes(2).toString('hex')}`;
    // Recorded before it is taken: a crash in between leaves a name that is dropped when absent.
    const before = await this.snapshots(volume);
    const fresh = await this.o.objects.get(Kind.RecurringJob, job.name);
    const mine = (fresh?.value.status.created?.[volume] ?? []).filter((c) => before.some((s) => s.name === c.name));
    const previous = mine.sort((a, b) => (a.createdAt < b.createdAt ? 1 : -1))[0] ?? null;
    await this.noteCreated(job.name, volume, (list) => [...list, { name, createdAt: now.toISOString() }]);
    await this.o.volumes.createSnapshot(volume, name);
    if (previous !== null && unchangedSince(await this.snapshots(volume), name, previous.name)) {
      // Nothing written since this job's last snapshot: an identical one would only push a real
      // recovery point out of the retention.
      await this.o.volumes.deleteSnapshot(volume, name);
      await this.noteCreated(job.name, volume, (list) => list.filter((c) => c.name !== name));
      const message = `skipped: unchanged since snapshot ${previous.name}`;
      await this.o.events.record({ type: 'Normal', reason: 'SnapshotSkipped', kind: Kind.Volume, object: volume, volume, message: `recurring job ${job.name}: volume ${volume} ${message}: no new snapshot` });
      return { result: 'skipped', message };
    }
    const pruned = await this.pruneJobSnapshots(job, volume);
    return { result: 'completed', message: `snapshot ${name} taken${pruned}` };
  }

  /** Applies the job's retention to the snapshots it made; says what it did. */
  private async pruneJobSnapshots(job: StoreObject<RecurringJobValue>, volume: string): Promise<string> {
    const existing = new Set((await this.snapshots(volume)).map((s) => s.name));
    const fresh = await this.o.objects.get(Kind.RecurringJob, job.name);
    const created = (fresh?.value.status.created?.[volume] ?? []).filter((c) => existing.has(c.name));
    const victims = retentionVictims(created, job.value.spec.retain, new Date());
    if (victims.length > 0) {
      const refusal = await this.pruneRefusal(volume, await this.volumeBackups(volume));
      if (refusal !== null) {
        const text = `${victims.length} older snapshot(s) beyond retain ${job.value.spec.retain.count} kept because ${refusal}`;
        await this.o.events.record({ type: 'Normal', reason: 'SnapshotsKept', kind: Kind.Volume, object: volume, volume, message: `recurring job ${job.name}: ${text}` });
        return `; ${text}`;
      }
    }
    const removed: string[] = [];
    for (const victim of victims) {
      try {
        await this.o.volumes.deleteSnapshot(volume, victim.name);
        removed.push(victim.name);
      } catch (err) {
        if ((err as ZebuError).code !== ErrorCode.NOT_FOUND) throw err;
        removed.push(victim.name);
      }
    }
    const gone = new Set(removed);
    await this.noteCreated(job.name, volume, (list) => list.filter((c) => existing.has(c.name) && !gone.has(c.name)));
    return removed.length > 0 ? `; removed ${removed.join(', ')} (retain ${job.value.spec.retain.count})` : '';
  }

  private async noteCreated(job: string, volume: string, change: (list: { name: string; createdAt: string }[]) => { name: string; createdAt: string }[]): Promise<void> {
    await this.o.objects.mutate(Kind.RecurringJob, job, (x) => {
      const created = (x.status.created ??= {});
      const next = change(created[volume] ?? []);
      if (next.length === 0) delete created[volume];
      else created[volume] = next;
    });
  }

  private async backupTask(job: StoreObject<RecurringJobValue>, volume: string, signal: AbortSignal): Promise<TaskOutcome> {
    const target = await this.o.objects.get(Kind.BackupTarget, TARGET_NAME);
    if (target === null) return { result: 'error', message: 'no backup target is set (zebu backup-target set URL)' };
    await this.o.checkTarget();
    const checked = await this.o.objects.get(Kind.BackupTarget, TARGET_NAME);
    if (checked?.value.status.available === false) return { result: 'error', message: `backup target ${checked.value.spec.url} is unavailable (${checked.value.status.message}); snapshots are kept, the next run tries again` };
    const backups = await this.volumeBackups(volume);
    // A backup this job asked for earlier and that is still under way (the target was down, or the manager restarted): wait for it, not a second one.
    const unfinished = backups.find((b) => b.value.spec.labels[JOB_LABEL] === job.name && b.value.spec.deletionRequestedAt === null && (b.value.status.state === 'pending' || b.value.status.state === 'in-progress'));
    if (unfinished !== undefined) return this.awaitBackup(job, volume, unfinished.name, signal);
    const last = backups
      .filter((b) => b.value.status.state === 'completed' && b.value.spec.deletionRequestedAt === null)
      .sort((a, b) => (a.value.spec.requestedAt < b.value.spec.requestedAt ? 1 : -1))[0] ?? null;
    const probe = backupSnapshotName(new Date(), crypto.randomBytes(2).toString('hex'));
    const taken = await this.o.volumes.createSnapshot(volume, probe);
    if (job.value.spec.task === 'backup' && last !== null && unchangedSince(await this.snapshots(volume), probe, last.value.spec.snapshot)) {
      await this.o.volumes.deleteSnapshot(volume, probe);
      await this.o.objects.mutate(Kind.Volume, volume, (x) => {
        x.status.coveredAt = { at: taken.createdAt, backup: last.name };
      });
      const message = `skipped: unchanged since backup ${last.name}`;
      await this.o.events.record({
        type: 'Normal', reason: 'BackupSkipped', kind: Kind.Volume, object: volume, volume,
        message: `recurring job ${job.name}: nothing was written to volume ${volume} since backup ${last.name} (snapshot ${last.value.spec.snapshot}, completed ${last.value.status.completedAt}): no identical backup made; its data as of ${taken.createdAt} is covered by ${last.name}`,
      });
      return { result: 'skipped', message };
    }
    const created = await this.o.backups.createJobBackup(volume, probe, { ...job.value.spec.labels, [JOB_LABEL]: job.name });
    return this.awaitBackup(job, volume, created.name, signal);
  }

  private async awaitBackup(job: StoreObject<RecurringJobValue>, volume: string, name: string, signal: AbortSignal): Promise<TaskOutcome> {
    const timeoutS = await this.o.settings.int('recurring-job-attach-timeout-seconds');
    let waitingSince: number | null = null;
    let view: BackupView;
    for (;;) {
      view = await this.o.backups.getBackup(name);
      if (view.state === 'completed' || view.state === 'error') break;
      if (view.deleting) return { result: 'error', message: `backup ${name} was deleted while the job waited for it` };
      // Progress resets the clock; a backup that waits (target down) for long is left to finish later.
      if (view.state === 'pending' && view.message !== null && view.message.startsWith('waiting')) {
        waitingSince ??= Date.now();
        if (Date.now() - waitingSince > timeoutS * 1000) return { result: 'error', message: `backup ${name} is ${view.message}; it completes when it can and the next run waits for it` };
      } else waitingSince = null;
      await sleep(500, signal);
    }
    if (view.state === 'error') return { result: 'error', message: `backup ${name} failed: ${view.message}; snapshots are kept, the next run tries again` };
    const uploaded = view.uploadedBytes ?? 0;
    const pruned = await this.pruneJobBackups(job, volume);
    return { result: 'completed', message: `backup ${name} completed (${view.blocks ?? 0} block(s), ${uploaded} bytes uploaded${view.base !== null ? `, incremental from ${view.base}` : ''})${pruned}` };
  }

  private async pruneJobBackups(job: StoreObject<RecurringJobValue>, volume: string): Promise<string> {
    const mine = (await this.volumeBackups(volume))
      .filter((b) => b.value.spec.labels[JOB_LABEL] === job.name && b.value.status.state === 'completed' && b.value.spec.deletionRequestedAt === null)
      .map((b) => ({ name: b.name, createdAt: b.value.spec.requestedAt }));
    const victims = retentionVictims(mine, job.value.spec.retain, new Date());
    for (const v of victims) await this.o.backups.deleteBackup(v.name);
    return victims.length > 0 ? `; deleted ${victims.map((v) => v.name).join(', ')} (retain ${job.value.spec.retain.count})` : '';
  }

  private async cleanupTask(volume: string): Promise<TaskOutcome> {
    const backups = await this.volumeBackups(volume);
    const victims = cleanupVictims(await this.snapshots(volume), backups.map(backupFacts));
    return this.deleteSnapshots(volume, victims, backups, 'no snapshot that backups took is unneeded');
  }

  private async snapshotDeleteTask(job: StoreObject<RecurringJobValue>, volume: string): Promise<TaskOutcome> {
    const backups = await this.volumeBackups(volume);
    const victims = snapshotDeleteVictims(await this.snapshots(volume), backups.map(backupFacts), job.value.spec.retain, new Date());
    return this.deleteSnapshots(volume, victims, backups, `at most ${job.value.spec.retain.count} snapshot(s) besides those backups need`);
  }

  private async deleteSnapshots(volume: string, victims: string[], backups: StoreObject<BackupValue>[], nothing: string): Promise<TaskOutcome> {
    if (victims.length === 0) return { result: 'completed', message: `nothing to delete: ${nothing}` };
    const refusal = await this.pruneRefusal(volume, backups);
    if (refusal !== null) return { result: 'skipped', message: `skipped: ${victims.length} snapshot(s) kept because ${refusal}` };
    for (const name of victims) {
      try {
        await this.o.volumes.deleteSnapshot(volume, name);
      } catch (err) {
        if ((err as ZebuError).code !== ErrorCode.NOT_FOUND) throw err;
      }
    }
    return { result: 'completed', message: `deleted ${victims.length} snapshot(s): ${victims.join(', ')}` };
  }
}
