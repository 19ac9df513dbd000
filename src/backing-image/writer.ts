/**
 * The first file of an image whose bytes pass through the manager — an upload (the API request's
 * body), or an export of a volume's snapshot (read through its engine) — written onto a disk of
 * the manager's node. The agents then copy it to more disks as for any image.
 *
 * The file entry is claimed (`in-progress`, from the source) before a byte is written, its
 * progress updated while the bytes arrive, and the bytes go to `image.raw.part`: flushed, hashed
 * (SHA-512, checked against the image's expected checksum) and only then renamed into place and
 * the entry made `ready`, the image's checksum and size fixed. Any failure leaves the entry
 * `failed` with the reason and no file. The writes under way are listed in `ImageWrites`: an
 * entry of the manager's own that is in progress but not listed there was cut off by a manager
 * restart (the controller fails it).
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { ZebuError, ErrorCode, toZebuError } from '../errors.ts';
import { Kind, imageFilePath, type Objects } from '../cluster/objects.ts';
import type { BackingImageFile } from '../cluster/object-types.ts';
import { convertQcow2, isQcow2 } from './qcow2.ts';
import { syncPath } from '../backup/target.ts';

const PROGRESS_WRITE_MS = 1000;

/** The manager's writes of first files under way, by `image/disk`. */
export class ImageWrites {
  private readonly keys = new Set<string>();
  has(image: string, disk: string): boolean {
    return this.keys.has(`${image}/${disk}`);
  }
  add(image: string, disk: string): void {
    this.keys.add(`${image}/${disk}`);
  }
  delete(image: string, disk: string): void {
    this.keys.delete(`${image}/${disk}`);
  }
  /** Whether any file of `image` is being written. */
  any(image: string): boolean {
    for (const k of this.keys) if (k.startsWith(`${image}/`)) return true;
    return false;
  }
}

/** SHA-512 (hex) and size of a file, streamed. */
export async function hashFile(file: string, signal?: AbortSignal): Promise<{ checksum: string; sizeBytes: number }> {
  const hash = crypto.createHash('sha512');
  let sizeBytes = 0;
  for await (const chunk of fs.createReadStream(file, { highWaterMark: 1 << 20, signal })) {
    hash.update(chunk as Buffer);
    sizeBytes += (chunk as Buffer).length;
  }
  return { checksum: hash.digest('hex'), sizeBytes };
}

/**
 * Makes `part` durable, then renames it to `target` and makes the name durable: a file at
 * `target` is always whole.
 */
export async function moveIntoPlace(part: string, target: string): Promise<void> {
  await syncPath(part);
  fs.renameSync(part, target);
  await syncPath(path.dirname(target));
}

/** What fills the part file: writes at offsets through `write`, says how far it got through `progress`. */
export type ImageFiller = (file: fs.promises.FileHandle, progress: (doneBytes: number, totalBytes: number | null) => void) => Promise<void>;

export interface WriteImageFileOptions {
  objects: Objects;
  writes: ImageWrites;
  image: string;
  disk: string;
  diskPath: string;
  node: string;
  /** Shown in the entry while it is written ("receiving the upload"). */
  doing: string;
  fill: ImageFiller;
  /**
   * An upload: its bytes are checked against the expected checksum (the published one, of what
   * was sent), and a qcow2 file is converted to raw, whose checksum is the image's.
   */
  upload?: boolean;
  /** Where the bytes come from (default: the source). */
  from?: 'source' | 'backup';
}

/**
 * Claims the entry of `disk` (absent, or failed) and writes the file; resolves with its checksum
 * and size once it is ready, rejects with the reason once it is failed.
 */
export async function writeImageFile(o: WriteImageFileOptions): Promise<{ checksum: string; sizeBytes: number }> {
  const now = (): string => new Date().toISOString();
  let claimed = false;
  // Listed before the entry is claimed: an in-progress entry not listed is one cut off.
  o.writes.add(o.image, o.disk);
  await o.objects.mutate(Kind.BackingImage, o.image, (v) => {
    const current = v.status.files[o.disk];
    if (v.deletionRequestedAt !== null || (current !== undefined && current.state !== 'failed')) return false;
    const entry: BackingImageFile = { diskId: o.disk, nodeId: o.node, state: 'in-progress', progress: 0, message: o.doing, transitionAt: now(), from: o.from ?? 'source' };
    v.status.files[o.disk] = entry;
    claimed = true;
  });
  if (!claimed) {
    o.writes.delete(o.image, o.disk);
    throw new ZebuError(ErrorCode.BUSY, `backing image ${o.image}: disk ${o.disk} already has a file, or the image is being deleted`);
  }
  const target = imageFilePath(o.diskPath, o.image);
  const part = `${target}.part`;
  const setEntry = (change: (f: BackingImageFile) => void): Promise<unknown> =>
    o.objects.mutate(Kind.BackingImage, o.image, (v) => {
      const f = v.status.files[o.disk];
      if (f === undefined || f.state !== 'in-progress') return false;
      change(f);
    });
  try {
    fs.mkdirSync(path.dirname(target), { recursive: true });
    let lastWrite = 0;
    let writing: Promise<unknown> = Promise.resolve();
    const progress = (done: number, total: number | null): void => {
      if (Date.now() - lastWrite < PROGRESS_WRITE_MS) return;
      lastWrite = Date.now();
      writing = setEntry((f) => {
        f.progress = total !== null && total > 0 ? Math.min(1, done / total) : 0;
        f.message = `${o.doing}: ${done} bytes${total !== null ? ` of ${total}` : ''}`;
      }).catch(() => {});
    };
    const file = await fs.promises.open(part, 'w');
    try {
      await o.fill(file, progress);
    } finally {
      await file.close();
    }
    await writing;
    let got = await hashFile(part);
    if (got.sizeBytes === 0) throw new ZebuError(ErrorCode.EINVAL, 'the image is empty (0 bytes)');
    const current = await o.objects.get(Kind.BackingImage, o.image);
    const expected = current?.value.spec.expectedChecksum ?? null;
    if (o.upload === true) {
      if (expected !== null && expected !== got.checksum) throw new ZebuError(ErrorCode.EINVAL, `checksum mismatch: the upload's SHA-512 is ${got.checksum}, expected ${expected}`);
      if (await isQcow2(part)) {
        const raw = `${part}.raw`;
        try {
          await convertQcow2(part, raw);
          fs.renameSync(raw, part);
        } finally {
          fs.rmSync(raw, { force: true });
        }
        got = await hashFile(part);
      }
    }
    // The image's own checksum (of the raw file), or the expected one for what is not uploaded.
    const want = current?.value.status.checksum ?? (o.upload === true ? null : expected);
    if (want !== null && want !== got.checksum) throw new ZebuError(ErrorCode.EINVAL, `checksum mismatch: the image's SHA-512 is ${got.checksum}, expected ${want}`);
    await moveIntoPlace(part, target);
    await o.objects.mutate(Kind.BackingImage, o.image, (v) => {
      const f = v.status.files[o.disk];
      if (f === undefined || f.state !== 'in-progress') return false;
      v.status.checksum ??= got.checksum;
      v.status.sizeBytes = got.sizeBytes;
      f.state = 'ready';
      f.progress = 1;
      f.message = null;
      f.transitionAt = now();
    });
    return got;
  } catch (err) {
    const e = toZebuError(err);
    fs.rmSync(part, { force: true });
    await setEntry((f) => {
      f.state = 'failed';
      f.message = e.message;
      f.transitionAt = now();
    }).catch(() => {});
    throw e;
  } finally {
    o.writes.delete(o.image, o.disk);
  }
}
