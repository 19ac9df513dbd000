/**
 * The backup controller: runs the backups, restores and DR-standby applies that the store asks
 * for, deletes backups, collects garbage and keeps the catalog in step with the target.
 *
 * Level-triggered like the volume controller: every pass (once a second, and at once when
 * kicked) looks at the Backup objects and at the volumes being restored, and starts what is due.
 * Work is in the store, so a crash of `zebu up` loses none of it: the next process sees backups
 * and restores still in progress and runs them again (blocks already on the target are not
 * uploaded again; a restore rewrites what it had written).
 *
 * The data goes through the volume's engine (its data socket on the node, opened by the agent):
 * a backup reads a snapshot of an attached volume while it is in use; a restore attaches its new
 * volume without a frontend and writes it.
 */
import { ZebuError, ErrorCode, toZebuError } from '../errors.ts';
import { isImageBackupVolume } from './backing-image-backup.ts';
import type { StoreObject } from '../store/store.ts';
import type { DataClient } from '../protocol/client.ts';
import { Kind, type BackupValue, type Objects, type RestoreStatus, type VolumeValue } from '../cluster/objects.ts';
import type { Settings } from '../cluster/settings.ts';
import type { EventRecorder } from './events.ts';
import { openTarget, checkTarget, type TargetOptions } from '../backup/target.ts';
import { BackupRepository } from '../backup/repository.ts';
import { runBackup } from '../backup/backup-job.ts';
import { ReplicaSnapshotReader, type ReplicaOpener } from './snapshot-reader.ts';
import { runRestore, type BlockWriter } from '../backup/restore-job.ts';
import { runGc, type GcResult } from '../backup/gc.ts';
import { Op } from '../protocol/frames.ts';
import type { CompressionName, Manifest } from '../backup/format.ts';

export const TARGET_NAME = 'default';
export const CREDENTIALS_SECRET = 'backup-target-credentials';

/** How the controller reaches a volume's engine on a node (its agent). */
export interface EngineData {
  openEngineData(nodeId: string, volume: string): Promise<DataClient>;
  /**
   * A data connection to a replica (HOST:PORT) at an epoch: backups read snapshots straight from
   * the engine's RW replicas (snapshot-reader.ts). Absent: every read goes through the engine.
   */
  openReplicaData?: ReplicaOpener;
}

/** Deletes a snapshot of an attached volume (the manager service). */
export type SnapshotDeleter = (volume: string, snapshot: string) => Promise<void>;

export interface BackupControllerOptions {
  objects: Objects;
  settings: Settings;
  events: EventRecorder;
  engines: EngineData;
  /** Removes the snapshots older backups took once a newer backup has completed. */
  deleteSnapshot?: SnapshotDeleter;
  /** Where a restore attaches its volume. */
  defaultNodeId: string;
  /** Pass interval (default 1 s). */
  pollMs?: number;
  log?: (event: Record<string, unknown>) => void;
}

/** Failures worth another attempt: the engine or the target went away for a while. */
const TRANSIENT = new Set<string>([ErrorCode.DISCONNECTED, ErrorCode.TIMEOUT, ErrorCode.BUSY, ErrorCode.CLOSED]);
const MAX_ATTEMPTS = 8;
const MAX_BACKOFF_MS = 60_000;
const PROGRESS_WRITE_MS = 1000;
const TARGET_RETRY_MS = 10_000;

interface Running {
  abort: AbortController;
  done: Promise<void>;
}

export class BackupController {
  private readonly o: Required<BackupControllerOptions>;
  private repo: BackupRepository | null = null;
  private repoKey = '';
  private indexLoaded = false;
  /** After a failure to open the target, passes leave that target alone for a while (it may be down). */
  private repoFailure: { generation: number; retryAtMs: number } | null = null;
  private readonly backups = new Map<string, Running>();
  private readonly restores = new Map<string, Running>();
  /** Backup or volume name -> no new attempt before this time. */
  private readonly notBefore = new Map<string, number>();
  private gcRun: Promise<GcResult> | null = null;
  private gcWanted = false;
  private syncRun: Promise<unknown> | null = null;
  private lastSyncMs = 0;
  private timer: NodeJS.Timeout | null = null;
  private pass: Promise<void> | null = null;
  private again = false;
  private stopped = false;

  constructor(options: BackupControllerOptions) {
    this.o = { pollMs: 1000, log: () => {}, deleteSnapshot: async () => {}, ...options };
  }

  start(): void {
    this.timer = setInterval(() => this.kick(), this.o.pollMs);
    this.timer.unref();
    this.kick();
  }

  /** Runs a pass now (or right after the one running). */
  kick(): void {
    if (this.stopped) return;
    if (this.pass !== null) {
      this.again = true;
      return;
    }
    this.pass = this.reconcile()
      .catch((err) => this.o.log({ event: 'backup-pass-failed', error: (err as Error).message }))
      .finally(() => {
        this.pass = null;
        if (this.again) {
          this.again = false;
          this.kick();
        }
      });
  }

  /** Stops passes and jobs; jobs stay in progress in the store and resume at the next start. */
  async stop(): Promise<void> {
    this.stopped = true;
    if (this.timer !== null) clearInterval(this.timer);
    for (const r of [...this.backups.values(), ...this.restores.values()]) r.abort.abort(new ZebuError(ErrorCode.CLOSED, 'the manager is stopping'));
    await this.pass;
    await Promise.allSettled([...this.backups.values(), ...this.restores.values()].map((r) => r.done));
    await this.gcRun?.catch(() => {});
    await this.syncRun?.catch(() => {});
    this.repo?.close();
  }

  /** Resolves when nothing runs (tests). */
  async idle(): Promise<void> {
    for (;;) {
      const pending = [this.pass, ...[...this.backups.values(), ...this.restores.values()].map((r) => r.done), this.gcRun, this.syncRun].filter((p) => p !== null);
      if (pending.length === 0) return;
      await Promise.allSettled(pending);
    }
  }

  // ---- the target ---------------------------------------------------------------------------

  /** The repository of the current target, opened (and its marker checked) once per target. */
  async repository(): Promise<BackupRepository> {
    const target = await this.o.objects.get(Kind.BackupTarget, TARGET_NAME);
    if (target === null) throw new ZebuError(ErrorCode.NOT_FOUND, 'no backup target is set (zebu backup-target set URL)');
    const key = `${target.value.spec.generation}`;
    if (this.repo !== null && this.repoKey === key) return this.repo;
    const options = await this.targetOptions();
    this.repo?.close();
    this.repo = null;
    for (const r of this.backups.values()) r.abort.abort(new ZebuError(ErrorCode.CLOSED, 'the backup target changed'));
    const repo = new BackupRepository(openTarget(target.value.spec.url, options));
    try {
      await repo.init();
    } catch (err) {
      repo.close();
      throw err;
    }
    this.repo = repo;
    this.repoKey = key;
    this.indexLoaded = false;
    return repo;
  }

  async targetOptions(): Promise<TargetOptions> {
    const target = await this.o.objects.must(Kind.BackupTarget, TARGET_NAME);
    const secret = target.value.spec.hasCredentials ? await this.o.objects.get(Kind.Secret, CREDENTIALS_SECRET) : null;
    const data = secret?.value.data;
    return {
      endpoint: target.value.spec.endpoint,
      region: target.value.spec.region,
      credentials: data?.accessKeyId !== undefined && data.secretAccessKey !== undefined ? { accessKeyId: data.accessKeyId, secretAccessKey: data.secretAccessKey, ...(data.sessionToken ? { sessionToken: data.sessionToken } : {}) } : null,
    };
  }

  /** Checks the target (reachable, writable) and records the answer in its status. */
  async check(): Promise<void> {
    const target = await this.o.objects.must(Kind.BackupTarget, TARGET_NAME);
    let message: string | null;
    try {
      const probe = openTarget(target.value.spec.url, await this.targetOptions());
      try {
        message = await checkTarget(probe);
      } finally {
        probe.close();
      }
      if (message === null) {
        await this.repository();
        this.repoFailure = null;
      }
    } catch (err) {
      message = (err as Error).message;
    }
    await this.o.objects.mutate(Kind.BackupTarget, TARGET_NAME, (t) => {
      t.status.available = message === null;
      t.status.message = message;
      t.status.checkedAt = new Date().toISOString();
    });
  }

  /**
   * Learns the blocks the target holds, once per target: every block a completed manifest names
   * (those are on the target); of the blocks a partial manifest names, only those that are there
   * (it lists a block before the upload, which a crash may have cut off).
   */
  private async loadIndex(repo: BackupRepository): Promise<void> {
    if (this.indexLoaded) return;
    for (const b of await this.o.objects.list(Kind.Backup)) {
      if (b.value.spec.targetUrl !== repo.url) continue;
      if (b.value.status.state === 'completed') {
        const m = await repo.readManifest(b.value.spec.volume, b.name);
        if (m !== null) repo.learn(m);
        continue;
      }
      const partial = await repo.readPartial(b.value.spec.volume, b.name);
      for (const [, hash] of partial?.blocks ?? []) {
        if (!repo.index.known.has(hash) && (await repo.hasBlock(hash))) repo.index.known.add(hash);
      }
    }
    this.indexLoaded = true;
  }

  // ---- passes -------------------------------------------------------------------------------

  private async reconcile(): Promise<void> {
    const target = await this.o.objects.get(Kind.BackupTarget, TARGET_NAME);
    const backups = await this.o.objects.list(Kind.Backup);
    const volumes = (await this.o.objects.list(Kind.Volume)).filter((v) => (v.value.spec.restore ?? null) !== null);
    if (target === null) {
      for (const b of backups) {
        if (b.value.status.state === 'pending' || b.value.status.state === 'in-progress') {
          await this.setBackupStatus(b.name, { message: 'waiting: no backup target is set (zebu backup-target set URL)' });
        }
      }
      return;
    }
    let repo: BackupRepository;
    const failure = this.repoFailure;
    if (failure !== null && failure.generation === target.value.spec.generation && Date.now() < failure.retryAtMs) return;
    try {
      repo = await this.repository();
      await this.loadIndex(repo);
      this.repoFailure = null;
    } catch (err) {
      this.repoFailure = { generation: target.value.spec.generation, retryAtMs: Date.now() + TARGET_RETRY_MS };
      const message = `backup target ${target.value.spec.url}: ${(err as Error).message}`;
      if (target.value.status.available !== false || target.value.status.message !== message) {
        await this.o.objects.mutate(Kind.BackupTarget, TARGET_NAME, (t) => {
          t.status.available = false;
          t.status.message = message;
          t.status.checkedAt = new Date().toISOString();
        });
      }
      for (const b of backups) {
        if (b.value.status.state === 'pending' || b.value.status.state === 'in-progress') await this.setBackupStatus(b.name, { message: `waiting: ${message}` });
      }
      return;
    }

    // Deletions first: a deleted backup must not be started.
    for (const b of backups) {
      if (b.value.spec.deletionRequestedAt === null) continue;
      const running = this.backups.get(b.name);
      if (running !== undefined) {
        running.abort.abort(new ZebuError(ErrorCode.CLOSED, `backup ${b.name} was deleted`));
        continue;
      }
      try {
        if (b.value.spec.targetUrl === repo.url) await repo.deleteBackup(b.value.spec.volume, b.name);
        await this.o.objects.remove(Kind.Backup, b.name);
        this.gcWanted = true;
        await this.o.events.record({ type: 'Normal', reason: 'BackupDeleted', message: `backup ${b.name} of volume ${b.value.spec.volume} deleted from ${b.value.spec.targetUrl}`, kind: Kind.Backup, object: b.name, volume: b.value.spec.volume });
      } catch (err) {
        await this.setBackupStatus(b.name, { message: `delete failed, retrying: ${(err as Error).message}` });
      }
    }

    const now = Date.now();
    for (const b of backups) {
      const s = b.value.status.state;
      if (b.value.spec.deletionRequestedAt !== null || (s !== 'pending' && s !== 'in-progress')) continue;
      if (this.backups.has(b.name) || (this.notBefore.get(b.name) ?? 0) > now) continue;
      if (b.value.spec.targetUrl !== repo.url) {
        await this.failBackup(b.name, `the backup target changed from ${b.value.spec.targetUrl} to ${repo.url}`);
        continue;
      }
      this.startBackup(b, repo);
    }

    for (const v of volumes) {
      if (this.restores.has(v.name) || (this.notBefore.get(`volume/${v.name}`) ?? 0) > now) continue;
      await this.reconcileRestore(v, backups, repo);
    }

    if (this.gcWanted && this.gcRun === null) {
      this.gcWanted = false;
      void this.gc().catch((err) => this.o.log({ event: 'backup-gc-failed', error: (err as Error).message }));
    }
    const pollSeconds = await this.o.settings.int('backup-target-poll-interval-seconds');
    if (pollSeconds > 0 && this.syncRun === null && now - this.lastSyncMs >= pollSeconds * 1000) {
      void this.sync().catch((err) => this.o.log({ event: 'backup-sync-failed', error: (err as Error).message }));
    }
  }

  // ---- backups ------------------------------------------------------------------------------

  private async setBackupStatus(name: string, change: Partial<BackupValue['status']>): Promise<void> {
    await this.o.objects.mutate(Kind.Backup, name, (b) => {
      Object.assign(b.status, change);
    });
  }

  private async failBackup(name: string, message: string): Promise<void> {
    const b = await this.o.objects.mutate(Kind.Backup, name, (x) => {
      x.status.state = 'error';
      x.status.message = message;
    });
    if (b !== null) await this.o.events.record({ type: 'Warning', reason: 'BackupFailed', message: `backup ${name} of volume ${b.value.spec.volume}: ${message}`, kind: Kind.Backup, object: name, volume: b.value.spec.volume });
  }

  private startBackup(b: StoreObject<BackupValue>, repo: BackupRepository): void {
    const abort = new AbortController();
    const done = this.runBackupJob(b, repo, abort.signal)
      .catch((err) => this.o.log({ event: 'backup-job-failed', backup: b.name, error: (err as Error).message }))
      .finally(() => {
        this.backups.delete(b.name);
        this.kick();
      });
    this.backups.set(b.name, { abort, done });
  }

  private async runBackupJob(b: StoreObject<BackupValue>, repo: BackupRepository, signal: AbortSignal): Promise<void> {
    const name = b.name;
    const volumeName = b.value.spec.volume;
    const volume = await this.o.objects.get(Kind.Volume, volumeName);
    if (volume === null || volume.value.deletionRequestedAt !== null) return this.failBackup(name, `volume ${volumeName} is gone`);
    const engine = await this.o.objects.get(Kind.Engine, volumeName);
    if (volume.value.status.state !== 'attached' || engine === null || engine.value.status.state !== 'running') {
      if (volume.value.spec.nodeId === null) return this.failBackup(name, `volume ${volumeName} is detached; a backup reads an attached volume (attach it and create the backup again)`);
      // Attaching, or its engine restarting (after a crash): wait.
      await this.setBackupStatus(name, { message: `waiting for volume ${volumeName} to be attached and its engine running` });
      this.notBefore.set(name, Date.now() + 2000);
      return;
    }
    const base = await this.baseFor(b, repo);
    const compression = (await this.o.settings.string('backup-compression')) as CompressionName;
    const concurrency = await this.o.settings.int('backup-concurrency');
    const startedAt = b.value.status.startedAt ?? new Date().toISOString();
    await this.setBackupStatus(name, { state: 'in-progress', startedAt, message: null });
    const started = Date.now();
    let client: DataClient | null = null;
    let source: ReplicaSnapshotReader | null = null;
    try {
      client = await this.o.engines.openEngineData(engine.value.spec.nodeId, volumeName);
      source = await ReplicaSnapshotReader.create(client, this.o.engines.openReplicaData, (e) => this.o.log({ ...e, backup: name, volume: volumeName }));
      const progress = new JobProgress({
        events: this.o.events, reason: 'BackupProgress', kind: Kind.Backup, object: name, volume: volumeName, started,
        say: (text) => `backup ${name} of volume ${volumeName}: ${text}`,
        write: (p) => this.setBackupStatus(name, p),
      });
      const manifest = await runBackup({
        repo,
        source,
        volume: volumeName,
        name,
        snapshot: b.value.spec.snapshot,
        sizeBytes: engine.value.status.sizeBytes,
        createdAt: b.value.spec.requestedAt,
        labels: b.value.spec.labels,
        compression,
        base,
        concurrency,
        backingImage: volume.value.spec.backingImage ?? null,
        signal,
        onProgress: (p) => progress.update(p.doneBytes, p.totalBytes),
      });
      await this.o.objects.mutate(Kind.Backup, name, (x) => {
        x.status.state = 'completed';
        x.status.completedAt = manifest.completedAt;
        x.status.message = null;
        x.status.sizeBytes = manifest.sizeBytes;
        x.status.base = manifest.base;
        x.status.stats = manifest.stats;
        x.status.backingImage = manifest.backingImage ?? null;
        x.status.doneBytes = x.status.totalBytes;
      });
      this.notBefore.delete(name);
      this.o.log({ event: 'backup-read-sources', backup: name, volume: volumeName, ...source.counts });
      // The backup's own time (deleting older snapshots below merges layers, which can take longer).
      const seconds = (Date.now() - started) / 1000;
      await this.dropOlderSnapshots(name, volumeName);
      const s = manifest.stats;
      await this.o.events.record({
        type: 'Normal', reason: 'BackupCompleted', kind: Kind.Backup, object: name, volume: volumeName,
        message: `backup ${name} of volume ${volumeName} (snapshot ${manifest.snapshot}) completed in ${seconds.toFixed(1)} s: ${s.blocks} block(s), ${s.uploadedBlocks} uploaded (${s.uploadedBytes} bytes), ${s.readBytes} bytes read (${source.counts.directBytes} straight from the replicas)${manifest.base !== null ? `, incremental from ${manifest.base}` : ''}`,
      });
    } catch (err) {
      const e = toZebuError(err);
      if (signal.aborted) {
        // Deleted, stopping or the target changed: the next pass decides.
        return;
      }
      const attempts = b.value.status.attempts + 1;
      const delay = retryDelayMs(e, attempts);
      if (delay !== null) {
        this.notBefore.set(name, Date.now() + delay);
        await this.setBackupStatus(name, { attempts, message: `attempt ${attempts} failed (${e.message}); retrying in ${Math.round(delay / 1000)} s` });
        return;
      }
      await this.setBackupStatus(name, { attempts });
      await this.failBackup(name, e.message);
    } finally {
      source?.close();
      client?.close();
    }
  }

  /**
   * Snapshots that earlier completed backups of the volume took themselves are not needed any
   * more once this one completed (the next incremental backup starts from this one's): deleted,
   * so backups do not pile up layers. A failure is logged and tried again after the next backup.
   */
  private async dropOlderSnapshots(name: string, volume: string): Promise<void> {
    const current = await this.o.objects.get(Kind.Backup, name);
    for (const b of await this.o.objects.list(Kind.Backup)) {
      if (b.name === name || b.value.spec.volume !== volume || b.value.spec.ownSnapshot !== true) continue;
      if (b.value.status.state !== 'completed' || b.value.spec.snapshot === current?.value.spec.snapshot) continue;
      try {
        await this.o.deleteSnapshot(volume, b.value.spec.snapshot);
      } catch (err) {
        if (toZebuError(err).code !== ErrorCode.NOT_FOUND) {
          this.o.log({ event: 'backup-snapshot-delete-failed', backup: b.name, snapshot: b.value.spec.snapshot, error: (err as Error).message });
          continue;
        }
      }
      await this.o.objects.mutate(Kind.Backup, b.name, (x) => {
        x.spec.ownSnapshot = false;
      });
    }
  }

  /** The volume's newest completed backup on this target, other than this one: the incremental base. */
  private async baseFor(b: StoreObject<BackupValue>, repo: BackupRepository): Promise<Manifest | null> {
    const candidates = (await this.o.objects.list(Kind.Backup))
      .filter((x) => x.name !== b.name && x.value.spec.volume === b.value.spec.volume && x.value.spec.targetUrl === repo.url && x.value.status.state === 'completed' && x.value.spec.deletionRequestedAt === null)
      .sort((x, y) => ((x.value.status.completedAt ?? '') < (y.value.status.completedAt ?? '') ? 1 : -1));
    for (const c of candidates) {
      try {
        const m = await repo.readManifest(c.value.spec.volume, c.name);
        if (m !== null) return m;
      } catch (err) {
        this.o.log({ event: 'backup-base-unreadable', backup: c.name, error: (err as Error).message });
      }
    }
    return null;
  }

  // ---- restores and DR standby ----------------------------------------------------------------

  private async setRestore(volume: string, change: Partial<RestoreStatus>): Promise<StoreObject<VolumeValue> | null> {
    return this.o.objects.mutate(Kind.Volume, volume, (v) => {
      if (v.status.restore == null) return false;
      Object.assign(v.status.restore, change);
    });
  }

  /** The newest completed backup of `sourceVolume` in the catalog (of this target). */
  private newestBackup(backups: StoreObject<BackupValue>[], sourceVolume: string, url: string): StoreObject<BackupValue> | null {
    let best: StoreObject<BackupValue> | null = null;
    for (const b of backups) {
      if (b.value.spec.volume !== sourceVolume || b.value.spec.targetUrl !== url || b.value.status.state !== 'completed' || b.value.spec.deletionRequestedAt !== null) continue;
      if (best === null || (b.value.status.completedAt ?? '') > (best.value.status.completedAt ?? '')) best = b;
    }
    return best;
  }

  private async reconcileRestore(v: StoreObject<VolumeValue>, backups: StoreObject<BackupValue>[], repo: BackupRepository): Promise<void> {
    const spec = v.value.spec.restore!;
    if (v.value.deletionRequestedAt !== null) return;
    let status = v.value.status.restore ?? null;
    if (status === null) {
      const initial: RestoreStatus = {
        state: 'pending', backup: spec.backup, applied: null, doneBytes: 0, totalBytes: 0, bytesPerSecond: 0,
        startedAt: null, completedAt: null, message: null, attempts: 0, attachedForRestore: false,
      };
      await this.o.objects.mutate(Kind.Volume, v.name, (x) => {
        if (x.status.restore == null) x.status.restore = initial;
      });
      status = initial;
    }
    // A failed restore stays failed (its data is incomplete); a standby tries again when a newer
    // backup than the one that failed appears.
    if (status.state === 'error') {
      if (!spec.standby && spec.activateRequestedAt === null) return;
      const newest = this.newestBackup(backups, spec.sourceVolume, repo.url);
      if (newest === null || newest.name === status.backup) return;
      await this.setRestore(v.name, { state: 'pending', attempts: 0 });
      status = { ...status, state: 'pending', attempts: 0 };
    }
    // What the volume should hold: the first backup (then whatever was applied last), or for a
    // standby (and at activation) the newest.
    let wanted = status.applied ?? spec.backup;
    if (spec.standby || spec.activateRequestedAt !== null) {
      const newest = this.newestBackup(backups, spec.sourceVolume, repo.url);
      if (newest !== null && (status.applied === null || newest.name !== status.applied)) {
        const applied = backups.find((b) => b.name === status!.applied);
        if (applied === undefined || (newest.value.status.completedAt ?? '') > (applied.value.status.completedAt ?? '')) wanted = newest.name;
        else wanted = status.applied!;
      } else if (status.applied !== null) wanted = status.applied;
    }
    if (status.applied === wanted) {
      // Up to date: detach if the restore attached it; end the standby when activation was asked.
      if (status.attachedForRestore && v.value.spec.nodeId !== null) {
        await this.o.objects.mutate(Kind.Volume, v.name, (x) => {
          x.spec.nodeId = null;
          x.spec.maintenance = false;
        });
        return;
      }
      if (status.attachedForRestore && v.value.status.state !== 'detached') return;
      if (spec.activateRequestedAt !== null) {
        await this.o.objects.mutate(Kind.Volume, v.name, (x) => {
          x.spec.restore!.standby = false;
          x.spec.restore!.activateRequestedAt = null;
          if (x.status.restore != null) x.status.restore.attachedForRestore = false;
        });
        await this.o.events.record({ type: 'Normal', reason: 'VolumeActivated', message: `volume ${v.name} activated with backup ${wanted} of volume ${spec.sourceVolume}; it can be attached`, kind: Kind.Volume, object: v.name, volume: v.name });
        return;
      }
      if (status.state !== 'completed' || status.attachedForRestore) {
        await this.setRestore(v.name, { state: 'completed', attachedForRestore: false, message: null });
      }
      return;
    }

    // An apply is due: the volume must be attached without a frontend on this node.
    if (v.value.status.state === 'creating') return;
    if (v.value.spec.nodeId === null) {
      if (v.value.status.state !== 'detached') return;
      await this.o.objects.mutate(Kind.Volume, v.name, (x) => {
        if (x.spec.nodeId !== null) return false;
        x.spec.nodeId = this.o.defaultNodeId;
        x.spec.maintenance = true;
        x.status.restore!.attachedForRestore = true;
        x.status.restore!.message = `attaching to restore backup ${wanted}`;
      });
      return;
    }
    const engine = await this.o.objects.get(Kind.Engine, v.name);
    if (v.value.status.state !== 'attached' || engine === null || engine.value.status.state !== 'running') return;
    this.startRestore(v.name, wanted, status, repo);
  }

  private startRestore(volume: string, wanted: string, status: RestoreStatus, repo: BackupRepository): void {
    const abort = new AbortController();
    const done = this.runRestoreJob(volume, wanted, status, repo, abort.signal)
      .catch((err) => this.o.log({ event: 'restore-job-failed', volume, error: (err as Error).message }))
      .finally(() => {
        this.restores.delete(volume);
        this.kick();
      });
    this.restores.set(volume, { abort, done });
  }

  private async runRestoreJob(volume: string, wanted: string, status: RestoreStatus, repo: BackupRepository, signal: AbortSignal): Promise<void> {
    const v = await this.o.objects.must(Kind.Volume, volume);
    const spec = v.value.spec.restore!;
    const engine = await this.o.objects.must(Kind.Engine, volume);
    const started = Date.now();
    // Recorded before the first write: a crash from here on leaves this backup's blocks behind.
    const begun = [...new Set([...(status.begun ?? []), wanted])];
    await this.setRestore(volume, { state: 'in-progress', backup: wanted, begun, startedAt: status.startedAt ?? new Date().toISOString(), message: null });
    let client: DataClient | null = null;
    try {
      const manifest = await repo.readManifest(spec.sourceVolume, wanted);
      if (manifest === null) throw new ZebuError(ErrorCode.NOT_FOUND, `backup ${wanted} of volume ${spec.sourceVolume} is not on ${repo.url}`);
      let applied: Manifest | null = null;
      let zeroOthers = false;
      if (status.applied !== null) {
        applied = await repo.readManifest(spec.sourceVolume, status.applied).catch(() => null);
        // The backup the volume holds is gone from the target: every block not in the new one is zeroed.
        if (applied === null) zeroOthers = true;
      }
      // Applies that began and did not complete (this one's too, when it is a retry): their
      // blocks may be there as well.
      const interrupted: Manifest[] = [];
      for (const name of status.begun ?? []) {
        const m = await repo.readManifest(spec.sourceVolume, name).catch(() => null);
        if (m === null) zeroOthers = true;
        else interrupted.push(m);
      }
      client = await this.o.engines.openEngineData(engine.value.spec.nodeId, volume);
      const progress = new JobProgress({
        events: this.o.events, reason: 'RestoreProgress', kind: Kind.Volume, object: volume, volume, started,
        say: (text) => `volume ${volume}: restore of backup ${wanted} ${text}`,
        write: (p) => this.setRestore(volume, p).then(() => {}),
      });
      const result = await runRestore({
        repo,
        sink: blockWriter(client),
        manifest,
        applied,
        zeroOthers,
        interrupted,
        sizeBytes: engine.value.status.sizeBytes,
        concurrency: await this.o.settings.int('backup-concurrency'),
        signal,
        onProgress: (p) => progress.update(p.doneBytes, p.totalBytes),
      });
      await this.setRestore(volume, { state: 'completed', applied: wanted, begun: [], completedAt: new Date().toISOString(), message: null, attempts: 0 });
      this.notBefore.delete(`volume/${volume}`);
      await this.o.events.record({
        type: 'Normal', reason: 'RestoreCompleted', kind: Kind.Volume, object: volume, volume,
        message: `volume ${volume}: backup ${wanted} of volume ${spec.sourceVolume} ${status.applied !== null ? `applied over ${status.applied}` : 'restored'} in ${((Date.now() - started) / 1000).toFixed(1)} s (${result.writtenBlocks} block(s) written, ${result.zeroedBlocks} zeroed)`,
      });
    } catch (err) {
      const e = toZebuError(err);
      if (signal.aborted) return;
      const attempts = status.attempts + 1;
      const delay = retryDelayMs(e, attempts);
      if (delay !== null) {
        this.notBefore.set(`volume/${volume}`, Date.now() + delay);
        await this.setRestore(volume, { attempts, message: `attempt ${attempts} failed (${e.message}); retrying in ${Math.round(delay / 1000)} s` });
        return;
      }
      // The data is incomplete: it stays unattachable, and the restore's attachment ends.
      await this.o.objects.mutate(Kind.Volume, volume, (x) => {
        if (x.status.restore == null) return false;
        Object.assign(x.status.restore, { state: 'error', attempts, message: e.message });
        if (x.status.restore.attachedForRestore) {
          x.spec.nodeId = null;
          x.spec.maintenance = false;
          x.status.restore.attachedForRestore = false;
        }
      });
      await this.o.events.record({ type: 'Warning', reason: 'RestoreFailed', message: `volume ${volume}: restore of backup ${wanted} failed: ${e.message}`, kind: Kind.Volume, object: volume, volume });
    } finally {
      client?.close();
    }
  }

  // ---- catalog sync and garbage collection ----------------------------------------------------

  /** Makes the catalog match the target: backups found there are added, those gone are removed. */
  sync(): Promise<{ volumes: number; added: string[]; removed: string[] }> {
    if (this.syncRun !== null) return this.syncRun as Promise<{ volumes: number; added: string[]; removed: string[] }>;
    const run = this.runSync().finally(() => {
      this.syncRun = null;
    });
    this.syncRun = run;
    return run;
  }

  private async runSync(): Promise<{ volumes: number; added: string[]; removed: string[] }> {
    this.lastSyncMs = Date.now();
    const repo = await this.repository();
    const added: string[] = [];
    const removed: string[] = [];
    // A backing image's own backups are the image's (its status), not the catalog's.
    const volumes = (await repo.listVolumes()).filter((v) => !isImageBackupVolume(v));
    const catalog = new Map((await this.o.objects.list(Kind.Backup)).map((b) => [b.name, b]));
    const onTarget = new Set<string>();
    for (const volume of volumes) {
      const { completed } = await repo.listBackups(volume);
      for (const name of completed) {
        onTarget.add(name);
        const known = catalog.get(name);
        if (known !== undefined && known.value.spec.targetUrl === repo.url) continue;
        if (known !== undefined) continue; // a name taken by a backup of another target
        let m: Manifest | null;
        try {
          m = await repo.readManifest(volume, name);
        } catch (err) {
          this.o.log({ event: 'backup-sync-manifest-damaged', backup: name, error: (err as Error).message });
          continue;
        }
        if (m === null) continue;
        repo.learn(m);
        try {
          await this.o.objects.create(Kind.Backup, name, backupFromManifest(m, repo.url));
          added.push(name);
        } catch (err) {
          if ((err as ZebuError).code !== ErrorCode.EXISTS) throw err;
        }
      }
    }
    for (const b of catalog.values()) {
      if (b.value.spec.targetUrl !== repo.url || b.value.status.state !== 'completed' || b.value.spec.deletionRequestedAt !== null) continue;
      if (onTarget.has(b.name)) continue;
      await this.o.objects.remove(Kind.Backup, b.name);
      removed.push(b.name);
    }
    await this.o.objects.mutate(Kind.BackupTarget, TARGET_NAME, (t) => {
      t.status.lastSyncAt = new Date().toISOString();
      t.status.available = true;
      t.status.message = null;
    });
    if (added.length > 0 || removed.length > 0) {
      await this.o.events.record({ type: 'Normal', reason: 'BackupCatalogSynced', message: `backup catalog synced from ${repo.url}: ${added.length} added, ${removed.length} removed`, kind: Kind.BackupTarget, object: TARGET_NAME, volume: null });
    }
    return { volumes: volumes.length, added, removed };
  }

  /** One garbage collection (a second caller shares the one running). */
  gc(): Promise<GcResult> {
    if (this.gcRun !== null) return this.gcRun;
    const run = (async () => {
      const repo = await this.repository();
      const result = await runGc(repo);
      await this.o.objects.mutate(Kind.BackupTarget, TARGET_NAME, (t) => {
        t.status.lastGcAt = new Date().toISOString();
        t.status.lastGc = { tombstones: result.tombstones, removedBlocks: result.removedBlocks, keptClaimed: result.keptClaimed };
      });
      if (result.tombstones > 0) {
        await this.o.events.record({ type: 'Normal', reason: 'BackupGarbageCollected', message: `backup target ${repo.url}: ${result.removedBlocks} unreferenced block(s) removed after ${result.tombstones} deleted backup(s)${result.keptClaimed > 0 ? `; ${result.keptClaimed} kept for a running backup` : ''}`, kind: Kind.BackupTarget, object: TARGET_NAME, volume: null });
      }
      // Blocks a running backup kept: collect them once it is done.
      if (result.keptClaimed > 0) this.gcWanted = true;
      return result;
    })().finally(() => {
      this.gcRun = null;
    });
    this.gcRun = run;
    return run;
  }
}

/** How long to wait before attempt `attempts` + 1 of a job that failed with `err`; null: give up. */
function retryDelayMs(err: ZebuError, attempts: number): number | null {
  if (!TRANSIENT.has(err.code) || attempts >= MAX_ATTEMPTS) return null;
  return Math.min(MAX_BACKOFF_MS, 1000 * 2 ** attempts);
}

interface JobProgressOptions {
  events: EventRecorder;
  reason: string;
  kind: string;
  object: string;
  volume: string;
  /** When the job started (ms), for bytes per second. */
  started: number;
  say: (text: string) => string;
  /** Stores the figures (at most once a second, and at the end). */
  write: (progress: { doneBytes: number; totalBytes: number; bytesPerSecond: number }) => Promise<void>;
}

/** A long job's progress: stored in its object, and an event at 25, 50 and 75%. */
class JobProgress {
  private readonly o: JobProgressOptions;
  private quarter = 0;
  private lastWriteMs = 0;

  constructor(options: JobProgressOptions) {
    this.o = options;
  }

  update(doneBytes: number, totalBytes: number): void {
    const now = Date.now();
    const seconds = (now - this.o.started) / 1000;
    const bytesPerSecond = seconds > 0 ? Math.round(doneBytes / seconds) : 0;
    const quarter = totalBytes > 0 ? Math.floor((4 * doneBytes) / totalBytes) : 0;
    if (quarter > this.quarter && quarter < 4) {
      this.quarter = quarter;
      const mib = (n: number): string => `${(n / (1024 * 1024)).toFixed(0)} MiB`;
      void this.o.events.record({
        type: 'Normal', reason: this.o.reason, kind: this.o.kind, object: this.o.object, volume: this.o.volume,
        message: this.o.say(`${quarter * 25}% (${mib(doneBytes)} of ${mib(totalBytes)}, ${mib(bytesPerSecond)}/s)`),
      });
    }
    if (now - this.lastWriteMs < PROGRESS_WRITE_MS && doneBytes < totalBytes) return;
    this.lastWriteMs = now;
    void this.o.write({ doneBytes, totalBytes, bytesPerSecond }).catch(() => {});
  }
}

/** A catalog entry for a backup found on the target. */
export function backupFromManifest(m: Manifest, url: string): BackupValue {
  return {
    spec: { volume: m.volume, snapshot: m.snapshot, labels: m.labels, targetUrl: url, requestedAt: m.createdAt, deletionRequestedAt: null },
    status: {
      state: 'completed', doneBytes: m.stats.readBytes, totalBytes: m.stats.readBytes, bytesPerSecond: 0, startedAt: m.createdAt, completedAt: m.completedAt,
      message: null, attempts: 0, sizeBytes: m.sizeBytes, base: m.base, stats: m.stats, backingImage: m.backingImage ?? null,
    },
  };
}

function blockWriter(client: DataClient): BlockWriter {
  return {
    write: (offset, data) => client.write(offset, data),
    zero: (offset, length) => client.request(Op.WRITE_ZEROES, 0, offset, length).then(() => {}),
    flush: () => client.flush(),
  };
}
