/**
 * The backing-image operations the API and CLI use: create (checked by backing-images.ts), list,
 * get and delete. The controller and the agents do the work; views say where every file is.
 */
import { ZebuError, ErrorCode, invalid } from '../errors.ts';
import type { StoreObject } from '../store/store.ts';
import { Kind, type BackingImageValue, type Objects } from './objects.ts';
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
  message: string | null;
  createdAt: string;
  deleting: boolean;
}

export interface BackingImageServiceOptions {
  objects: Objects;
  events: EventRecorder;
  /** Wakes the controller. */
  kick?: () => void;
}

function stateOf(v: BackingImageValue): BackingImageView['state'] {
  const files = Object.values(v.status.files);
  if (files.some((f) => f.state === 'ready')) return 'ready';
  if (files.some((f) => f.state === 'starting' || f.state === 'in-progress')) return 'in-progress';
  if (v.status.refetch.attempts >= REFETCH_MAX_ATTEMPTS || (files.length > 0 && files.every((f) => f.state === 'failed'))) return 'failed';
  return 'pending';
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
    if (source.type !== 'download') {
      throw invalid(`only images downloaded from a URL can be created so far (${source.type} is not built yet)`, 'source');
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
      message: `backing image ${name} from ${source.url}, ${spec.minCopies} cop${spec.minCopies === 1 ? 'y' : 'ies'}${spec.expectedChecksum !== null ? ', checksum given' : ''}`,
    });
    this.o.kick?.();
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
