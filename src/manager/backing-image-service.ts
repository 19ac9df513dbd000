/**
 * The backing-image operations the API and CLI use: create (checked by backing-images.ts), list,
 * get and delete. The controller and the agents do the work; views say where every file is.
 */
import { ZebuError, ErrorCode, toZebuError } from '../errors.ts';
import { writeImageFile, type ImageWrites } from '../backing-image/writer.ts';
import type { StoreObject } from '../store/store.ts';
import { Kind, type BackingImageValue, type Objects } from '../cluster/objects.ts';
import type { EventRecorder } from './events.ts';
import { REFETCH_MAX_ATTEMPTS, checkBackingImageName, validateBackingImage, type BackingImageInput, type BackingImageSource, type FileState } from './backing-images.ts';

export interface BackingImageFileView {
  disk: string;
  node: string;
  state: FileState;
  progress: number;
  message: string | null;
  since: string;
  /** "source", "backup" or "disk NAME". */
  from: string;
}

export interface BackingImageView {
  name: string;
  source: BackingImageSource;
  /** ready: a file is ready; in-progress: the first is on its way; pending: none yet; failed: no file, and it cannot be fetched now. */
  state: 'ready' | 'in-progress' | 'pending' | 'failed';
  /** SHA-512 of the image: the expected one, or that of its first ready file; null before. */
  checksum: string | null;
  expectedChecksum: string | null;
  sizeBytes: number;
  minCopies: number;
  readyCopies: number;
  nodeSelector: string[];
  diskSelector: string[];
  files: BackingImageFileView[];
  /** Fetches from scratch after every file was lost. */
  refetch: { attempts: number; maxAttempts: number; notBefore: string | null; message: string | null };
  /** The image's own copy in the backup target (uploads and exports get one automatically), or null. */
  backup: { targetUrl: string; backup: string; at: string } | null;
  /** Why the last backup of the image failed, or null. */
  backupError: string | null;
  message: string | null;
  createdAt: string;
  deleting: boolean;
}

export interface BackingImageServiceOptions {
  objects: Objects;
  events: EventRecorder;
  /** Wakes the controller. */
  kick?: () => void;
  /** The manager's node: an upload is written onto one of its disks. */
  nodeId: string;
  /** The manager's writes of first files under way (shared with the controller). */
  writes: ImageWrites;
  /** Stores a ready file of the image in the backup target (the controller does it). */
  backupNow: (name: string) => Promise<{ backup: string; created: boolean }>;
}

function stateOf(v: BackingImageValue): BackingImageView['state'] {
  const files = Object.values(v.status.files);
  if (files.some((f) => f.state === 'ready')) return 'ready';
  if (files.some((f) => f.state === 'starting' || f.state === 'in-progress')) return 'in-progress';
  if (v.status.refetch.attempts >= REFETCH_MAX_ATTEMPTS || (files.length > 0 && files.every((f) => f.state === 'failed'))) return 'failed';
  return 'pending';
}

function sourceText(source: BackingImageSource): string {
  switch (source.type) {
    case 'download': return `from ${source.url}`;
    case 'upload': return 'to be uploaded';
    case 'export-from-volume': return `exported from snapshot ${source.snapshot} of volume ${source.volume}`;
    case 'restore': return `restored from backup ${source.backup}`;
  }
}

export class BackingImageServiceImpl {
  private readonly o: BackingImageServiceOptions;

  constructor(options: BackingImageServiceOptions) {
    this.o = options;
  }

  private view(image: StoreObject<BackingImageValue>): BackingImageView {
    const { spec, status } = image.value;
    const files = Object.values(status.files).sort((a, b) => a.diskId.localeCompare(b.diskId));
    return {
      name: image.name,
      source: spec.source,
      state: stateOf(image.value),
      checksum: status.checksum ?? spec.expectedChecksum,
      expectedChecksum: spec.expectedChecksum,
      sizeBytes: status.sizeBytes,
      minCopies: spec.minCopies,
      readyCopies: files.filter((f) => f.state === 'ready').length,
      nodeSelector: spec.nodeSelector,
      diskSelector: spec.diskSelector,
      files: files.map((f) => ({
        disk: f.diskId, node: f.nodeId, state: f.state, progress: f.progress, message: f.message, since: f.transitionAt,
        from: typeof f.from === 'object' ? `disk ${f.from.disk}` : f.from,
      })),
      refetch: { attempts: status.refetch.attempts, maxAttempts: REFETCH_MAX_ATTEMPTS, notBefore: status.refetch.notBefore, message: status.refetch.message },
      backup: status.backup ?? null,
      backupError: status.backupError ?? null,
      message: status.message,
      createdAt: image.value.createdAt,
      deleting: image.value.deletionRequestedAt !== null,
    };
  }

  async listBackingImages(): Promise<BackingImageView[]> {
    return (await this.o.objects.list(Kind.BackingImage)).sort((a, b) => a.name.localeCompare(b.name)).map((i) => this.view(i));
  }

  async getBackingImage(name: string): Promise<BackingImageView> {
    checkBackingImageName(name);
    const image = await this.o.objects.get(Kind.BackingImage, name);
    if (image === null) throw new ZebuError(ErrorCode.NOT_FOUND, `backing image ${name} not found`);
    return this.view(image);
  }

  async createBackingImage(input: BackingImageInput & { name?: unknown }): Promise<BackingImageView> {
    const name = checkBackingImageName(input.name);
    const spec = validateBackingImage(input);
    const source = spec.source;
    if (source.type === 'restore') {
      const backup = await this.o.objects.get(Kind.Backup, source.backup);
      if (backup === null) throw new ZebuError(ErrorCode.NOT_FOUND, `backup ${source.backup} not found`, { field: 'fromBackup' });
      if (backup.value.status.state !== 'completed') throw new ZebuError(ErrorCode.BUSY, `backup ${source.backup} is ${backup.value.status.state}; only a completed backup can be restored`, { field: 'fromBackup' });
      if (backup.value.spec.deletionRequestedAt !== null) throw new ZebuError(ErrorCode.BUSY, `backup ${source.backup} is being deleted`, { field: 'fromBackup' });
    }
    if (source.type === 'export-from-volume') {
      const volume = await this.o.objects.get(Kind.Volume, source.volume);
      if (volume === null) throw new ZebuError(ErrorCode.NOT_FOUND, `volume ${source.volume} not found`, { field: 'fromVolume' });
      if (!volume.value.status.snapshots.some((x) => x.name === source.snapshot)) {
        throw new ZebuError(ErrorCode.NOT_FOUND, `volume ${source.volume} has no snapshot ${source.snapshot}`, { field: 'snapshot' });
      }
    }
    try {
      await this.o.objects.create(Kind.BackingImage, name, {
        spec,
        status: { checksum: null, sizeBytes: 0, files: {}, refetch: { attempts: 0, notBefore: null, message: null }, message: null },
        createdAt: new Date().toISOString(),
        deletionRequestedAt: null,
      });
    } catch (err) {
      if (err instanceof ZebuError && err.code === ErrorCode.EXISTS) throw new ZebuError(ErrorCode.EXISTS, `backing image ${name} already exists`, { field: 'name' });
      throw err;
    }
    await this.o.events.record({
      type: 'Normal', reason: 'BackingImageCreated', kind: Kind.BackingImage, object: name, volume: null,
      message: `backing image ${name} ${sourceText(source)}, ${spec.minCopies} cop${spec.minCopies === 1 ? 'y' : 'ies'}${spec.expectedChecksum !== null ? ', checksum given' : ''}`,
    });
    this.o.kick?.();
    return this.getBackingImage(name);
  }

  /**
   * Receives the bytes of an `upload` image (the request body, streamed) into a file on a disk of
   * the manager's node; answers once the file is ready (checked against the expected checksum)
   * or failed. Refused while a file is ready or another upload runs; a failed upload may be sent
   * again.
   */
  async uploadBackingImage(name: string, body: AsyncIterable<Buffer>, sizeBytes: number | null): Promise<BackingImageView> {
    checkBackingImageName(name);
    const image = await this.o.objects.get(Kind.BackingImage, name);
    if (image === null) throw new ZebuError(ErrorCode.NOT_FOUND, `backing image ${name} not found`);
    if (image.value.spec.source.type !== 'upload') throw new ZebuError(ErrorCode.EINVAL, `backing image ${name} is not an upload (its source is ${image.value.spec.source.type})`);
    if (image.value.deletionRequestedAt !== null) throw new ZebuError(ErrorCode.BUSY, `backing image ${name} is being deleted`);
    const files = Object.values(image.value.status.files);
    if (files.some((f) => f.state === 'ready')) throw new ZebuError(ErrorCode.EXISTS, `backing image ${name} is already uploaded (a file is ready)`);
    if (this.o.writes.any(name) || files.some((f) => f.state === 'pending' || f.state === 'starting' || f.state === 'in-progress')) {
      throw new ZebuError(ErrorCode.BUSY, `backing image ${name}: an upload is under way`);
    }
    const disk = await this.uploadDisk(image.value, sizeBytes);
    await this.o.events.record({ type: 'Normal', reason: 'BackingImageUploading', kind: Kind.BackingImage, object: name, volume: null, message: `backing image ${name}: receiving the upload onto disk ${disk.name}` });
    try {
      await writeImageFile({
        objects: this.o.objects, writes: this.o.writes, image: name, disk: disk.name, diskPath: disk.path, node: this.o.nodeId, doing: 'receiving the upload', upload: true,
        fill: async (file, progress) => {
          let done = 0;
          for await (const chunk of body) {
            if (sizeBytes !== null && done + chunk.length > sizeBytes) throw new ZebuError(ErrorCode.EINVAL, `the upload is longer than its Content-Length ${sizeBytes}`);
            await file.write(chunk, 0, chunk.length, done);
            done += chunk.length;
            progress(done, sizeBytes);
          }
          if (sizeBytes !== null && done !== sizeBytes) throw new ZebuError(ErrorCode.EINVAL, `the upload was cut off after ${done} of ${sizeBytes} bytes`);
        },
      });
    } catch (err) {
      const e = toZebuError(err);
      await this.o.events.record({ type: 'Warning', reason: 'BackingImageUploadFailed', kind: Kind.BackingImage, object: name, volume: null, message: `backing image ${name}: the upload failed: ${e.message}` });
      throw e;
    }
    await this.o.events.record({ type: 'Normal', reason: 'BackingImageUploaded', kind: Kind.BackingImage, object: name, volume: null, message: `backing image ${name}: upload received and verified on disk ${disk.name}` });
    this.o.kick?.();
    return this.getBackingImage(name);
  }

  /** A disk of the manager's node for an upload: ready, allowed by the selectors, with room. */
  private async uploadDisk(image: BackingImageValue, sizeBytes: number | null): Promise<{ name: string; path: string }> {
    const spec = image.spec;
    const disks = (await this.o.objects.list(Kind.Disk)).filter((d) => d.value.spec.nodeId === this.o.nodeId);
    const refusals: string[] = [];
    for (const d of disks.sort((a, b) => a.name.localeCompare(b.name))) {
      const existing = image.status.files[d.name];
      const room = d.value.status.storageAvailableBytes - d.value.spec.storageReservedBytes;
      if (!d.value.status.ready) refusals.push(`disk ${d.name} is not ready`);
      else if (!d.value.spec.allowScheduling) refusals.push(`disk ${d.name}: scheduling is off`);
      else if (spec.nodeSelector.length > 0 && !spec.nodeSelector.includes(this.o.nodeId)) refusals.push(`node ${this.o.nodeId} is not in the node selector`);
      else if (spec.diskSelector.length > 0 && !spec.diskSelector.includes(d.name)) refusals.push(`disk ${d.name} is not in the disk selector`);
      else if (existing !== undefined && existing.state !== 'failed') refusals.push(`disk ${d.name} has a file (${existing.state})`);
      else if (sizeBytes !== null && room < sizeBytes) refusals.push(`disk ${d.name} has ${Math.max(0, room)} bytes free, the upload is ${sizeBytes}`);
      else return { name: d.name, path: d.value.spec.path };
    }
    throw new ZebuError(ErrorCode.ENOSPC, `no disk of node ${this.o.nodeId} (where the API runs) can take the upload: ${refusals.join('; ') || 'it has no disks'}`);
  }

  /** Stores the image in the backup target (once per content); answers when it is there. */
  async backupBackingImage(name: string): Promise<BackingImageView> {
    checkBackingImageName(name);
    const image = await this.o.objects.get(Kind.BackingImage, name);
    if (image === null) throw new ZebuError(ErrorCode.NOT_FOUND, `backing image ${name} not found`);
    if ((await this.o.objects.get(Kind.BackupTarget, 'default')) === null) throw new ZebuError(ErrorCode.NOT_FOUND, 'no backup target is set (zebu backup-target set URL)');
    await this.o.backupNow(name);
    return this.getBackingImage(name);
  }

  /** Marks the image deleting: its files are removed, then the object. Refused while a volume is on it. */
  async deleteBackingImage(name: string): Promise<BackingImageView> {
    checkBackingImageName(name);
    const users = (await this.o.objects.list(Kind.Volume)).filter((v) => v.value.spec.backingImage?.name === name).map((v) => v.name);
    if (users.length > 0) {
      if ((await this.o.objects.get(Kind.BackingImage, name)) === null) throw new ZebuError(ErrorCode.NOT_FOUND, `backing image ${name} not found`);
      throw new ZebuError(ErrorCode.BUSY, `backing image ${name} is in use by volume${users.length > 1 ? 's' : ''} ${users.join(', ')}: delete ${users.length > 1 ? 'them' : 'it'} first`);
    }
    const image = await this.o.objects.mutate(Kind.BackingImage, name, (v) => {
      if (v.deletionRequestedAt !== null) return false;
      v.deletionRequestedAt = new Date().toISOString();
    });
    if (image === null) throw new ZebuError(ErrorCode.NOT_FOUND, `backing image ${name} not found`);
    this.o.kick?.();
    return this.view(image);
  }
}
