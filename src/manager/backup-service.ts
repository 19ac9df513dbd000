/**
 * The backup operations of the API (BackupService): checks requests, records what is wanted in
 * the store (BackupTarget, Backup, Secret) and builds views. The backup controller does the work;
 * the target-wide commands (check, sync, verify, collect) run at once and answer when done.
 */
import crypto from 'node:crypto';
import { ZebuError, ErrorCode, invalid } from '../errors.ts';
import type { StoreObject } from '../store/store.ts';
import { Kind, type BackupValue, type Objects } from '../cluster/objects.ts';
import type { EventRecorder } from './events.ts';
import { checkLabels } from './labels.ts';
import { backupSnapshotName } from './recurring-jobs.ts';
import { parseTargetUrl } from '../backup/target.ts';
import { verifyTarget, type TargetVerifyResult } from '../backup/verify-target.ts';
import { BACKUP_BLOCK_BYTES } from '../backup/format.ts';
import { TARGET_NAME, CREDENTIALS_SECRET, type BackupController } from './backup-controller.ts';
import type { ManagerServiceImpl } from './service.ts';
import { VOLUME_NAME } from './service.ts';
import type {
  BackupCreateInput, BackupGcView, BackupMetrics, BackupService, BackupSyncResult, BackupTargetSetInput, BackupTargetView, BackupView,
} from './backup-types.ts';

const BACKUP_NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$/;

export interface BackupServiceOptions {
  objects: Objects;
  events: EventRecorder;
  controller: BackupController;
  volumes: Pick<ManagerServiceImpl, 'createSnapshot' | 'listSnapshots'>;
}

function checkBackupName(name: unknown): string {
  if (typeof name !== 'string' || !BACKUP_NAME.test(name)) throw invalid(`backup name must be 1-63 characters of [A-Za-z0-9._-], got ${JSON.stringify(name)}`, 'name');
  return name;
}

export class BackupServiceImpl implements BackupService {
  private readonly o: BackupServiceOptions;

  constructor(options: BackupServiceOptions) {
    this.o = options;
  }

  // ---- target -------------------------------------------------------------------------------

  private async targetView(): Promise<BackupTargetView> {
    const t = await this.o.objects.get(Kind.BackupTarget, TARGET_NAME);
    if (t === null) throw new ZebuError(ErrorCode.NOT_FOUND, 'no backup target is set (zebu backup-target set URL)');
    const backups = (await this.o.objects.list(Kind.Backup)).filter((b) => b.value.spec.targetUrl === t.value.spec.url).length;
    return {
      name: TARGET_NAME,
      url: t.value.spec.url,
      endpoint: t.value.spec.endpoint,
      region: t.value.spec.region,
      credentials: t.value.spec.hasCredentials ? 'set' : 'none',
      ...t.value.status,
      backups,
    };
  }

  getBackupTarget(): Promise<BackupTargetView> {
    return this.targetView();
  }

  async setBackupTarget(input: BackupTargetSetInput): Promise<BackupTargetView> {
    const parsed = parseTargetUrl(input.url);
    let endpoint = input.endpoint ?? null;
    if (endpoint !== null) {
      if (parsed.scheme !== 's3') throw invalid('an endpoint is for s3:// targets only', 'endpoint');
      let url: URL;
      try {
        url = new URL(endpoint);
      } catch {
        throw invalid(`endpoint ${JSON.stringify(endpoint)} is not a URL (expected http(s)://HOST[:PORT])`, 'endpoint');
      }
      if (url.protocol !== 'http:' && url.protocol !== 'https:') throw invalid(`endpoint ${JSON.stringify(endpoint)} must be http:// or https://`, 'endpoint');
      if (url.username !== '' || url.password !== '') throw invalid('put credentials in the credentials, not in the endpoint', 'endpoint');
      endpoint = url.origin;
    }
    const region = input.region ?? null;
    if (region !== null && !/^[a-z0-9-]{1,32}$/.test(region)) throw invalid(`region ${JSON.stringify(region)} must be 1-32 characters of a-z, 0-9 and -`, 'region');
    const credentials = input.credentials;
    if (credentials != null) {
      if (parsed.scheme !== 's3') throw invalid('credentials are for s3:// targets only', 'credentials');
      for (const field of ['accessKeyId', 'secretAccessKey'] as const) {
        const value = credentials[field];
        if (typeof value !== 'string' || value.length === 0 || value.length > 512 || /[\s]/.test(value)) throw invalid(`credentials.${field} must be 1-512 characters without spaces`, `credentials.${field}`);
      }
    }
    const before = await this.o.objects.get(Kind.BackupTarget, TARGET_NAME);
    if (credentials !== undefined) {
      if (credentials === null) await this.o.objects.remove(Kind.Secret, CREDENTIALS_SECRET);
      else {
        const data: Record<string, string> = { accessKeyId: credentials.accessKeyId, secretAccessKey: credentials.secretAccessKey };
        if (credentials.sessionToken) data.sessionToken = credentials.sessionToken;
        const done = await this.o.objects.mutate(Kind.Secret, CREDENTIALS_SECRET, (s) => {
          s.data = data;
        });
        if (done === null) await this.o.objects.create(Kind.Secret, CREDENTIALS_SECRET, { data });
      }
    }
    const hasCredentials = parsed.scheme === 's3' && (credentials != null || (credentials === undefined && (before?.value.spec.hasCredentials ?? false)));
    const spec = { url: input.url, endpoint, region, hasCredentials, generation: (before?.value.spec.generation ?? 0) + 1 };
    const status = { available: null, message: null, checkedAt: null, lastSyncAt: null, lastGcAt: null, lastGc: null };
    if (before === null) {
      try {
        await this.o.objects.create(Kind.BackupTarget, TARGET_NAME, { spec, status });
      } catch (err) {
        if ((err as ZebuError).code !== ErrorCode.EXISTS) throw err;
      }
    }
    await this.o.objects.mutate(Kind.BackupTarget, TARGET_NAME, (t) => {
      t.spec = spec;
      if (before !== null && before.value.spec.url !== input.url) t.status = status;
    });
    if (before !== null && before.value.spec.url !== input.url) {
      // The catalog lists what the target holds: backups of the old target leave it (they stay
      // on that target; setting it again lists them again). Unfinished ones end in error.
      for (const b of await this.o.objects.list(Kind.Backup)) {
        if (b.value.spec.targetUrl !== input.url && b.value.status.state === 'completed') await this.o.objects.remove(Kind.Backup, b.name);
      }
    }
    await this.o.events.record({ type: 'Normal', reason: 'BackupTargetSet', message: `backup target set to ${input.url}${endpoint !== null ? ` at ${endpoint}` : ''}`, kind: Kind.BackupTarget, object: TARGET_NAME, volume: null });
    await this.o.controller.check();
    // A target that already holds backups (another cluster's, or ours before a reinstall): list them.
    const view = await this.targetView();
    if (view.available === true) await this.o.controller.sync().catch(() => {});
    this.o.controller.kick();
    return this.targetView();
  }

  async checkBackupTarget(): Promise<BackupTargetView> {
    await this.targetView();
    await this.o.controller.check();
    return this.targetView();
  }

  async syncBackupTarget(): Promise<BackupSyncResult> {
    await this.targetView();
    const started = Date.now();
    const result = await this.o.controller.sync();
    this.o.controller.kick();
    return { ...result, durationMs: Date.now() - started };
  }

  async verifyBackupTarget(input: { volume?: string }): Promise<TargetVerifyResult> {
    if (input.volume !== undefined && (typeof input.volume !== 'string' || !VOLUME_NAME.test(input.volume))) throw invalid(`volume must be a volume name, got ${JSON.stringify(input.volume)}`, 'volume');
    await this.targetView();
    const repo = await this.o.controller.repository();
    const result = await verifyTarget(repo, input.volume !== undefined ? { volume: input.volume } : {});
    const bad = result.missingBlocks + result.corruptBlocks;
    await this.o.events.record({
      type: bad > 0 ? 'Warning' : 'Normal', reason: 'BackupTargetVerified', kind: Kind.BackupTarget, object: TARGET_NAME, volume: input.volume ?? null,
      message: `backup target ${repo.url}${input.volume !== undefined ? ` (volume ${input.volume})` : ''}: ${result.backups.length} backup(s), ${result.blocksChecked} block(s) checked, ${result.missingBlocks} missing, ${result.corruptBlocks} corrupt`,
    });
    return result;
  }

  async gcBackupTarget(): Promise<BackupGcView> {
    await this.targetView();
    return this.o.controller.gc();
  }

  // ---- backups ------------------------------------------------------------------------------

  private view(b: StoreObject<BackupValue>): BackupView {
    const s = b.value.status;
    const progress = s.state === 'completed' ? 1 : s.totalBytes > 0 ? Math.min(1, s.doneBytes / s.totalBytes) : 0;
    return {
      name: b.name,
      volume: b.value.spec.volume,
      snapshot: b.value.spec.snapshot,
      state: s.state,
      progress,
      doneBytes: s.doneBytes,
      totalBytes: s.totalBytes,
      bytesPerSecond: s.bytesPerSecond,
      message: s.message,
      labels: b.value.spec.labels,
      url: b.value.spec.targetUrl,
      requestedAt: b.value.spec.requestedAt,
      startedAt: s.startedAt,
      completedAt: s.completedAt,
      sizeBytes: s.sizeBytes,
      base: s.base,
      backingImage: s.backingImage ?? null,
      uploadedBytes: s.stats?.uploadedBytes ?? null,
      readBytes: s.stats?.readBytes ?? null,
      blocks: s.stats?.blocks ?? null,
      deleting: b.value.spec.deletionRequestedAt !== null,
    };
  }

  async listBackups(filter: { volume?: string } = {}): Promise<BackupView[]> {
    const all = await this.o.objects.list(Kind.Backup);
    return all
      .filter((b) => filter.volume === undefined || b.value.spec.volume === filter.volume)
      .sort((a, b) => (a.value.spec.requestedAt < b.value.spec.requestedAt ? -1 : a.value.spec.requestedAt > b.value.spec.requestedAt ? 1 : 0))
      .map((b) => this.view(b));
  }

  async getBackup(name: string): Promise<BackupView> {
    checkBackupName(name);
    const b = await this.o.objects.get(Kind.Backup, name);
    if (b === null) throw new ZebuError(ErrorCode.NOT_FOUND, `backup ${name} not found`);
    return this.view(b);
  }

  async createBackup(input: BackupCreateInput): Promise<BackupView> {
    if (typeof input.volume !== 'string' || !VOLUME_NAME.test(input.volume)) throw invalid(`volume must be a volume name, got ${JSON.stringify(input.volume)}`, 'volume');
    const labels = checkLabels(input.labels);
    const target = await this.o.objects.get(Kind.BackupTarget, TARGET_NAME);
    if (target === null) throw new ZebuError(ErrorCode.BUSY, 'no backup target is set (zebu backup-target set URL)');
    const volume = await this.o.objects.get(Kind.Volume, input.volume);
    if (volume === null) throw new ZebuError(ErrorCode.NOT_FOUND, `volume ${input.volume} not found`);
    if (volume.value.spec.restore?.standby) throw new ZebuError(ErrorCode.BUSY, `volume ${input.volume} is a DR standby: activate it before backing it up`);
    let snapshot: string;
    const ownSnapshot = input.snapshot === undefined;
    if (input.snapshot !== undefined) {
      const snapshots = await this.o.volumes.listSnapshots(input.volume);
      if (!snapshots.some((s) => s.name === input.snapshot)) throw new ZebuError(ErrorCode.NOT_FOUND, `snapshot ${input.snapshot} of volume ${input.volume} not found (its snapshots: ${snapshots.map((s) => s.name).join(', ') || 'none'})`);
      snapshot = input.snapshot;
      if (volume.value.status.state !== 'attached') throw new ZebuError(ErrorCode.BUSY, `a backup reads an attached volume: volume ${input.volume} is ${volume.value.status.state}`);
    } else {
      // Takes the snapshot now (409 when the volume is not attached).
      // Named as snapshot-cleanup recognises the snapshots backups take (BACKUP_SNAPSHOT_NAME).
      snapshot = (await this.o.volumes.createSnapshot(input.volume, backupSnapshotName(new Date(), crypto.randomBytes(2).toString('hex')))).name;
    }
    return this.recordBackup(input.volume, snapshot, ownSnapshot, labels, target.value.spec.url, volume.value.spec.sizeBytes);
  }

  /**
   * A backup a recurring job asks for, of the snapshot it has just taken (the backup owns it:
   * it is deleted once a newer backup completed). The job checked the volume and target.
   */
  async createJobBackup(volume: string, snapshot: string, labels: Record<string, string>): Promise<BackupView> {
    const target = await this.o.objects.get(Kind.BackupTarget, TARGET_NAME);
    if (target === null) throw new ZebuError(ErrorCode.BUSY, 'no backup target is set (zebu backup-target set URL)');
    const v = await this.o.objects.get(Kind.Volume, volume);
    if (v === null) throw new ZebuError(ErrorCode.NOT_FOUND, `volume ${volume} not found`);
    return this.recordBackup(volume, snapshot, true, checkLabels(labels), target.value.spec.url, v.value.spec.sizeBytes);
  }

  private async recordBackup(volume: string, snapshot: string, ownSnapshot: boolean, labels: Record<string, string>, targetUrl: string, sizeBytes: number): Promise<BackupView> {
    const name = `backup-${crypto.randomBytes(8).toString('hex')}`;
    const requestedAt = new Date().toISOString();
    await this.o.objects.create(Kind.Backup, name, {
      spec: { volume, snapshot, ownSnapshot, labels, targetUrl, requestedAt, deletionRequestedAt: null },
      status: { state: 'pending', doneBytes: 0, totalBytes: 0, bytesPerSecond: 0, startedAt: null, completedAt: null, message: null, attempts: 0, sizeBytes, base: null, stats: null },
    });
    await this.o.events.record({ type: 'Normal', reason: 'BackupCreated', message: `backup ${name} of volume ${volume} (snapshot ${snapshot}) to ${targetUrl} asked for`, kind: Kind.Backup, object: name, volume });
    this.o.controller.kick();
    return this.getBackup(name);
  }

  async deleteBackup(name: string): Promise<BackupView> {
    checkBackupName(name);
    const b = await this.o.objects.mutate(Kind.Backup, name, (x) => {
      if (x.spec.deletionRequestedAt !== null) return false;
      x.spec.deletionRequestedAt = new Date().toISOString();
    });
    if (b === null) throw new ZebuError(ErrorCode.NOT_FOUND, `backup ${name} not found`);
    // A DR standby whose applied backup this is keeps its data; its next apply zeroes what the
    // newer backup lacks (restore-job.ts zeroOthers).
    this.o.controller.kick();
    return this.view(b);
  }

  // ---- metrics ------------------------------------------------------------------------------

  async backupMetrics(): Promise<BackupMetrics[]> {
    const byVolume = new Map<string, BackupMetrics>();
    for (const b of await this.o.objects.list(Kind.Backup)) {
      const volume = b.value.spec.volume;
      let m = byVolume.get(volume);
      if (m === undefined) {
        m = { volume, uploadedBytes: 0, reusedBytes: 0, lastDurationSeconds: null, lastSuccessSeconds: null, completed: 0, inProgress: 0, failed: 0 };
        byVolume.set(volume, m);
      }
      const s = b.value.status;
      if (s.state === 'completed') {
        m.completed++;
        m.uploadedBytes += s.stats?.uploadedBytes ?? 0;
        m.reusedBytes += (s.stats?.reusedBlocks ?? 0) * BACKUP_BLOCK_BYTES;
        const at = s.completedAt !== null ? Date.parse(s.completedAt) / 1000 : NaN;
        if (!Number.isNaN(at) && (m.lastSuccessSeconds === null || at > m.lastSuccessSeconds)) {
          m.lastSuccessSeconds = at;
          const started = s.startedAt !== null ? Date.parse(s.startedAt) / 1000 : NaN;
          m.lastDurationSeconds = Number.isNaN(started) ? null : Math.max(0, at - started);
        }
      } else if (s.state === 'error') m.failed++;
      else m.inProgress++;
    }
    return [...byVolume.values()];
  }
}
