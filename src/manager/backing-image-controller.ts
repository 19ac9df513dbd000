/**
 * The backing-image controller in the manager: for every image, marks the files whose disk or
 * node is gone `unknown`, asks the plan (backing-images.ts) for the next step and takes it — a
 * new file to fetch or copy (`pending`, which the agent of its node then fetches), or, when no
 * file is left that can be used, the lost files `cleaning` and the image fetched again after a
 * backoff. A deleted image's files are cleaned up before the object goes. Level-triggered: a pass
 * over every image each poll, and at once on a change.
 */
import type { StoreObject } from '../store/store.ts';
import { Kind, imageFilePath, type BackingImageValue, type Objects } from '../cluster/objects.ts';
import type { Settings } from '../cluster/settings.ts';
import type { EventRecorder } from './events.ts';
import { observeFiles, planBackingImage, refetchWaitMs, writtenByManager, type BackingImageFile, type DiskForImage } from './backing-images.ts';
import { writeImageFile, type ImageFiller, type ImageWrites } from '../backing-image/writer.ts';
import type { EngineData } from './backup-controller.ts';
import { isAllZero, type CompressionName } from '../backup/format.ts';
import type { BackupRepository } from '../backup/repository.ts';
import { ZebuError, ErrorCode, toZebuError } from '../errors.ts';
import { backupImage, restoreImage, restoreManifestInto } from './backing-image-backup.ts';
import { TARGET_NAME } from './backup-controller.ts';
import { ReplicaSnapshotReader } from './snapshot-reader.ts';

/** An export reads the snapshot in pieces of this size. */
const EXPORT_CHUNK_BYTES = 4 * 1024 * 1024;

export interface BackingImageControllerOptions {
  objects: Objects;
  settings: Settings;
  events: EventRecorder;
  /** The manager's node: first files of images whose bytes pass through the manager go on its disks. */
  nodeId: string;
  /** The manager's writes of first files under way (shared with the service's uploads). */
  writes: ImageWrites;
  /** How an export reaches the volume's engine. */
  engines: EngineData;
  /** The backup target's repository (a restore reads the backup from it). */
  backups: { repository(): Promise<BackupRepository> };
  pollMs?: number;
  now?: () => Date;
  log?: (event: Record<string, unknown>) => void;
}

export class BackingImageController {
  private readonly o: BackingImageControllerOptions;
  private readonly now: () => Date;
  private readonly log: (event: Record<string, unknown>) => void;
  private timer: NodeJS.Timeout | null = null;
  private pass: Promise<void> | null = null;
  private again = false;
  /** Backups of images under way, by image. */
  private readonly backingUp = new Map<string, Promise<{ backup: string; created: boolean }>>();
  /** When an automatic backup of an image last failed (ms): tried again a minute later. */
  private readonly backupFailedAt = new Map<string, number>();
  /** The backup target's URL as last seen (null: none set). */
  private targetUrl: string | null = null;

  constructor(options: BackingImageControllerOptions) {
    this.o = options;
    this.now = options.now ?? (() => new Date());
    this.log = options.log ?? (() => {});
  }

  start(): void {
    this.kick();
    this.timer = setInterval(() => this.kick(), this.o.pollMs ?? 1000);
    this.timer.unref();
  }

  async stop(): Promise<void> {
    if (this.timer !== null) clearInterval(this.timer);
    this.timer = null;
    await this.pass;
  }

  /** One pass now (or right after the one under way). */
  kick(): Promise<void> {
    if (this.pass !== null) {
      this.again = true;
      return this.pass;
    }
    this.pass = (async () => {
      do {
        this.again = false;
        await this.reconcileAll().catch((err) => this.log({ event: 'backing-image-reconcile-failed', error: (err as Error).message }));
      } while (this.again);
    })().finally(() => {
      this.pass = null;
    });
    return this.pass;
  }

  private async disks(): Promise<DiskForImage[]> {
    const [disks, leases] = await Promise.all([this.o.objects.list(Kind.Disk), this.o.objects.list(Kind.NodeLease)]);
    const up = new Set(leases.map((l) => l.name));
    return disks.map((d) => {
      const nodeUp = up.has(d.value.spec.nodeId);
      const problem = !nodeUp ? `node ${d.value.spec.nodeId} is down` : !d.value.status.ready ? `disk ${d.name} is not ready${d.value.status.message !== null ? ` (${d.value.status.message})` : ''}` : null;
      return {
        name: d.name, nodeId: d.value.spec.nodeId, usable: problem === null, problem, allowScheduling: d.value.spec.allowScheduling,
        availableBytes: Math.max(0, d.value.status.storageAvailableBytes - d.value.spec.storageReservedBytes),
      };
    });
  }

  private async reconcileAll(): Promise<void> {
    const images = await this.o.objects.list(Kind.BackingImage);
    if (images.length === 0) return;
    const disks = await this.disks();
    const recoveryWaitSeconds = await this.o.settings.int('backing-image-recovery-wait-seconds');
    this.targetUrl = (await this.o.objects.get(Kind.BackupTarget, TARGET_NAME))?.value.spec.url ?? null;
    // The disks each image is needed on: those of the replicas (not failed) of volumes on it.
    const neededOn = new Map<string, string[]>();
    for (const r of await this.o.objects.list(Kind.Replica)) {
      const image = r.value.spec.backingImage?.name;
      if (image === undefined || r.value.deletionRequestedAt !== null || r.value.spec.failedAt !== null) continue;
      if (!neededOn.has(image)) neededOn.set(image, []);
      neededOn.get(image)!.push(r.value.spec.diskId);
    }
    for (const image of images) await this.reconcile(image, disks, recoveryWaitSeconds, neededOn.get(image.name) ?? []);
  }

  private async reconcile(image: StoreObject<BackingImageValue>, disks: DiskForImage[], recoveryWaitSeconds: number, neededOn: string[]): Promise<void> {
    const now = this.now();
    const name = image.name;
    if (image.value.deletionRequestedAt !== null) {
      const files = Object.values(image.value.status.files);
      if (files.length === 0) {
        await this.o.objects.remove(Kind.BackingImage, name);
        await this.event(name, 'Normal', 'BackingImageDeleted', `backing image ${name} and its files removed`);
        return;
      }
      await this.o.objects.mutate(Kind.BackingImage, name, (v) => {
        for (const f of Object.values(v.status.files)) {
          // A file on a disk that is gone cannot be cleaned by anyone: its entry just goes.
          if (!disks.some((d) => d.name === f.diskId && d.usable)) delete v.status.files[f.diskId];
          else if (f.state !== 'cleaning') {
            f.state = 'cleaning';
            f.transitionAt = now.toISOString();
          }
        }
      });
      return;
    }

    // A first file the manager was writing, cut off by a restart of the manager: failed.
    const cutOff = Object.values(image.value.status.files).filter((f) => this.writtenByManager(image.value, f) && !this.o.writes.has(name, f.diskId));
    if (cutOff.length > 0) {
      await this.o.objects.mutate(Kind.BackingImage, name, (v) => {
        for (const c of cutOff) {
          const f = v.status.files[c.diskId];
          if (f === undefined || !this.writtenByManager(v, f) || this.o.writes.has(name, f.diskId)) continue;
          f.state = 'failed';
          f.message = `cut off: the manager stopped while writing it${v.spec.source.type === 'upload' ? '; upload it again' : ''}`;
          f.transitionAt = now.toISOString();
        }
      });
      return;
    }

    // Files on disks that are gone or down: unknown.
    const before = Object.values(image.value.status.files);
    const files = observeFiles(before, disks, now);
    const turned = files.filter((f, i) => f.state !== before[i].state);
    if (turned.length > 0) {
      await this.o.objects.mutate(Kind.BackingImage, name, (v) => {
        for (const f of turned) {
          const current = v.status.files[f.diskId];
          if (current !== undefined && current.state !== 'unknown' && current.state !== 'cleaning') v.status.files[f.diskId] = f;
        }
      });
      for (const f of turned) await this.event(name, 'Warning', 'BackingImageFileUnknown', `backing image ${name}: file on disk ${f.diskId} is unknown: ${f.message}`);
    }

    // A ready file ends any recovery.
    if (files.some((f) => f.state === 'ready') && image.value.status.refetch.attempts > 0) {
      await this.o.objects.mutate(Kind.BackingImage, name, (v) => {
        v.status.refetch = { attempts: 0, notBefore: null, message: null };
      });
      await this.event(name, 'Normal', 'BackingImageRecovered', `backing image ${name} has a ready file again`);
    }
    // An image that cannot be fetched from its source again gets its own copy in the backup
    // target as soon as it has a ready file and a target is set.
    const source = image.value.spec.source.type;
    if ((source === 'upload' || source === 'export-from-volume') && this.targetUrl !== null && !this.hasBackup(image.value)
      && files.some((f) => f.state === 'ready' && f.nodeId === this.o.nodeId) && !this.backingUp.has(name)
      && Date.now() - (this.backupFailedAt.get(name) ?? 0) >= 60_000) {
      void this.backupNow(name).catch(() => {});
    }
    const plan = planBackingImage({
      spec: image.value.spec, files, disks, sizeBytes: image.value.status.sizeBytes, refetch: image.value.status.refetch,
      hasBackup: this.hasBackup(image.value), recoveryWaitSeconds, neededOn, now,
      fetchNode: image.value.spec.source.type === 'download' ? null : this.o.nodeId,
    });
    const at = now.toISOString();
    switch (plan.action) {
      case 'wait':
        if (image.value.status.message !== plan.reason) {
          await this.o.objects.mutate(Kind.BackingImage, name, (v) => {
            v.status.message = plan.reason;
          });
        }
        return;
      case 'fetch':
      case 'copy': {
        // An export, a restore or a fetch from the image's backup is written by the manager; a
        // download or a copy by the agent of the disk's node.
        if (plan.action === 'fetch' && writtenByManager(image.value.spec.source, plan.from)) return this.startManagerFetch(image, plan.disk, plan.from, disks);
        const disk = plan.action === 'fetch' ? plan.disk : plan.to;
        const node = disks.find((d) => d.name === disk)!.nodeId;
        const file: BackingImageFile = { diskId: disk, nodeId: node, state: 'pending', progress: 0, message: null, transitionAt: at, from: plan.action === 'fetch' ? plan.from : { disk: plan.from } };
        await this.o.objects.mutate(Kind.BackingImage, name, (v) => {
          if (v.status.files[disk] !== undefined) return false;
          v.status.files[disk] = file;
          v.status.message = null;
        });
        await this.event(name, 'Normal', plan.action === 'fetch' ? 'BackingImageFetching' : 'BackingImageCopying',
          plan.action === 'fetch' ? `backing image ${name}: fetching from its ${plan.from} onto disk ${disk}` : `backing image ${name}: copying the ready file of disk ${plan.from} to disk ${disk}`);
        return;
      }
      case 'clean':
        await this.o.objects.mutate(Kind.BackingImage, name, (v) => {
          for (const d of plan.disks) {
            const f = v.status.files[d];
            if (f === undefined || f.state !== 'failed') continue;
            f.state = 'cleaning';
            f.transitionAt = at;
          }
        });
        await this.event(name, 'Warning', 'BackingImageFileFailed', `backing image ${name}: ${plan.reason}; removed, a ready file is copied there again`);
        return;
      case 'refetch': {
        if (plan.from === null) {
          // Nowhere to fetch it from: the files are kept (an unknown one may still come back).
          if (image.value.status.message !== plan.reason) {
            await this.o.objects.mutate(Kind.BackingImage, name, (v) => {
              v.status.message = plan.reason;
            });
            await this.event(name, 'Warning', 'BackingImageLost', `backing image ${name}: ${plan.reason}`);
          }
          return;
        }
        const attempts = image.value.status.refetch.attempts + 1;
        // The first fetch again at once; later ones after a wait that doubles.
        const notBefore = new Date(now.getTime() + (attempts === 1 ? 0 : refetchWaitMs(attempts - 1))).toISOString();
        await this.o.objects.mutate(Kind.BackingImage, name, (v) => {
          for (const d of plan.cleanup) {
            const f = v.status.files[d];
            if (f === undefined) continue;
            if (!disks.some((x) => x.name === d && x.usable)) delete v.status.files[d];
            else {
              f.state = 'cleaning';
              f.transitionAt = at;
            }
          }
          v.status.refetch = { attempts, notBefore, message: plan.reason };
          v.status.message = plan.reason;
        });
        await this.event(name, 'Warning', 'BackingImageLost', `backing image ${name}: ${plan.reason}; its files are removed and it is fetched again from its ${plan.from} (attempt ${attempts}, from ${notBefore})`);
        return;
      }
    }
  }

  /** A first file whose bytes the manager writes (not a download, not a copy), on its way. */
  private writtenByManager(v: BackingImageValue, f: BackingImageFile): boolean {
    return writtenByManager(v.spec.source, f.from) && (f.state === 'pending' || f.state === 'starting' || f.state === 'in-progress');
  }

  /**
   * What the manager's write of an image's first file (from its source, or from its own backup)
   * needs: what it still waits for, and else what it does and how it fills the file.
   */
  private async managerFetch(image: StoreObject<BackingImageValue>, from: 'source' | 'backup'): Promise<
    { waiting: string } | { waiting: null; what: string; doneReason: string; fill: ImageFiller }
  > {
    const source = image.value.spec.source;
    const concurrency = await this.o.settings.int('backup-concurrency');
    if (from === 'backup') {
      const saved = image.value.status.backup;
      if (saved == null) return { waiting: `backing image ${image.name} has no backup to be restored from` };
      return {
        waiting: null, what: `restoring it from its backup ${saved.backup}`, doneReason: 'BackingImageRestored',
        fill: async (file, progress) => {
          await restoreImage({ repo: await this.o.backups.repository(), image: image.name, backup: saved.backup, file, concurrency, onProgress: progress });
        },
      };
    }
    if (source.type === 'export-from-volume') {
      // Read from the replicas its engine has in sync: the volume must be attached.
      const { volume, snapshot } = source;
      const [vol, engine] = await Promise.all([this.o.objects.get(Kind.Volume, volume), this.o.objects.get(Kind.Engine, volume)]);
      if (vol === null) return { waiting: `volume ${volume} is gone: the image cannot be exported` };
      if (!vol.value.status.snapshots.some((x) => x.name === snapshot)) return { waiting: `volume ${volume} has no snapshot ${snapshot}` };
      if (vol.value.status.state !== 'attached' || engine === null || engine.value.status.state !== 'running') {
        return { waiting: `waiting for volume ${volume} to be attached: its snapshot ${snapshot} is read through its engine (zebu volume attach ${volume})` };
      }
      const sizeBytes = engine.value.status.sizeBytes;
      return {
        waiting: null, what: `exporting snapshot ${snapshot} of volume ${volume}`, doneReason: 'BackingImageExported',
        fill: async (file, progress) => {
          const client = await this.o.engines.openEngineData(engine.value.spec.nodeId, volume);
          let reader: ReplicaSnapshotReader | null = null;
          try {
            // Straight from the engine's RW replicas, as a backup reads (snapshot-reader.ts).
            reader = await ReplicaSnapshotReader.create(client, this.o.engines.openReplicaData, (e) => this.log({ ...e, image: image.name, volume }));
            await file.truncate(sizeBytes);
            for (let offset = 0; offset < sizeBytes; offset += EXPORT_CHUNK_BYTES) {
              const length = Math.min(EXPORT_CHUNK_BYTES, sizeBytes - offset);
              const data = await reader.readSnapshot(snapshot, offset, length);
              try {
                // Zeros stay holes: the file is as sparse as the snapshot.
                if (!isAllZero(data)) await file.write(data, 0, length, offset);
              } finally {
                reader.release(data);
              }
              progress(offset + length, sizeBytes);
            }
          } finally {
            reader?.close();
            client.close();
          }
        },
      };
    }
    if (source.type === 'restore') {
      // Every block read from the backup target is checked against its hash (restore-job.ts).
      const backup = await this.o.objects.get(Kind.Backup, source.backup);
      if (backup === null) return { waiting: `backup ${source.backup} is gone: the image cannot be restored` };
      if (backup.value.status.state !== 'completed') return { waiting: `backup ${source.backup} is ${backup.value.status.state}; waiting for it to complete` };
      const volume = backup.value.spec.volume;
      return {
        waiting: null, what: `restoring backup ${source.backup}`, doneReason: 'BackingImageRestored',
        fill: async (file, progress) => {
          const repo = await this.o.backups.repository();
          const manifest = await repo.readManifest(volume, source.backup);
          if (manifest === null) throw new ZebuError(ErrorCode.NOT_FOUND, `backup ${source.backup} of volume ${volume} is not on the backup target ${repo.url}`);
          await restoreManifestInto(repo, manifest, file, concurrency, progress);
        },
      };
    }
    return { waiting: `${source.type} images are not fetched by the manager from their source` };
  }

  /**
   * Writes the first file of an image whose bytes pass through the manager (an export, a restore,
   * or any image from its own backup) onto `disk` of the manager's node, in the background; the
   * entry says how far it is, then ready or failed. Until it can start, the image's message says why.
   */
  private async startManagerFetch(image: StoreObject<BackingImageValue>, disk: string, from: 'source' | 'backup', disks: DiskForImage[]): Promise<void> {
    const name = image.name;
    if (this.o.writes.any(name)) return;
    const diskObj = await this.o.objects.get(Kind.Disk, disk);
    const job = diskObj === null ? { waiting: `disk ${disk} is gone` } : await this.managerFetch(image, from);
    if (job.waiting !== null) {
      const waiting = job.waiting;
      if (image.value.status.message !== waiting) {
        await this.o.objects.mutate(Kind.BackingImage, name, (v) => {
          v.status.message = waiting;
        });
      }
      return;
    }
    const node = disks.find((d) => d.name === disk)!.nodeId;
    await this.event(name, 'Normal', 'BackingImageFetching', `backing image ${name}: ${job.what} onto disk ${disk}`);
    await this.o.objects.mutate(Kind.BackingImage, name, (v) => {
      v.status.message = null;
    });
    void writeImageFile({
      objects: this.o.objects, writes: this.o.writes, image: name, disk, diskPath: diskObj!.value.spec.path, node, doing: job.what, from, fill: job.fill,
    }).then(
      () => this.event(name, 'Normal', job.doneReason, `backing image ${name}: ${job.what} onto disk ${disk}: done`),
      (err) => this.event(name, 'Warning', 'BackingImageFetchFailed', `backing image ${name}: ${job.what} failed: ${(err as Error).message}`),
    ).catch(() => {}).finally(() => void this.kick());
  }

  /** The image has a copy in the current backup target. */
  private hasBackup(v: BackingImageValue): boolean {
    return this.targetUrl !== null && v.status.backup != null && v.status.backup.targetUrl === this.targetUrl;
  }

  /**
   * Stores a ready file of the image (on the manager's node) in the backup target, or joins the
   * backup under way; records it in the image's status.
   */
  backupNow(name: string): Promise<{ backup: string; created: boolean }> {
    const running = this.backingUp.get(name);
    if (running !== undefined) return running;
    const run = (async () => {
      const image = await this.o.objects.get(Kind.BackingImage, name);
      if (image === null) throw new ZebuError(ErrorCode.NOT_FOUND, `backing image ${name} not found`);
      const checksum = image.value.status.checksum;
      const ready = Object.values(image.value.status.files).filter((f) => f.state === 'ready' && f.nodeId === this.o.nodeId);
      if (checksum === null || ready.length === 0) throw new ZebuError(ErrorCode.BUSY, `backing image ${name} has no ready file on node ${this.o.nodeId} (where the manager runs) to back up`);
      const diskObj = await this.o.objects.get(Kind.Disk, ready[0].diskId);
      if (diskObj === null) throw new ZebuError(ErrorCode.BUSY, `disk ${ready[0].diskId} is gone`);
      const repo = await this.o.backups.repository();
      try {
        const result = await backupImage({
          repo, image: name, checksum, file: imageFilePath(diskObj.value.spec.path, name), sizeBytes: image.value.status.sizeBytes,
          compression: (await this.o.settings.string('backup-compression')) as CompressionName, concurrency: await this.o.settings.int('backup-concurrency'),
        });
        await this.o.objects.mutate(Kind.BackingImage, name, (v) => {
          v.status.backup = { targetUrl: repo.url, backup: result.backup, at: new Date().toISOString() };
          v.status.backupError = null;
        });
        this.backupFailedAt.delete(name);
        await this.event(name, 'Normal', 'BackingImageBackedUp', `backing image ${name}: ${result.created ? 'stored' : 'already'} in the backup target ${repo.url} as ${result.backup}`);
        return result;
      } catch (err) {
        const e = toZebuError(err);
        this.backupFailedAt.set(name, Date.now());
        await this.o.objects.mutate(Kind.BackingImage, name, (v) => {
          v.status.backupError = e.message;
        });
        await this.event(name, 'Warning', 'BackingImageBackupFailed', `backing image ${name}: its backup to ${repo.url} failed: ${e.message}`);
        throw e;
      }
    })().finally(() => {
      this.backingUp.delete(name);
      void this.kick();
    });
    this.backingUp.set(name, run);
    return run;
  }

  private async event(image: string, type: 'Normal' | 'Warning', reason: string, message: string): Promise<void> {
    await this.o.events.record({ type, reason, kind: Kind.BackingImage, object: image, volume: null, message });
  }
}
