/**
 * A backing image's own copy in the backup target, for images that cannot be fetched from their
 * source again (an upload, an export of a snapshot that may be gone): the bytes of a ready file
 * stored as a backup in the usual format (2 MiB blocks stored once by content, a manifest), under
 * the target-side volume name `Image.NAME` — no volume can be called that (volume names start
 * with a lower-case letter or a digit), and the backup catalog leaves such names out. Its blocks
 * are kept by the target's collection like any backup's. The backup is named after the image's
 * SHA-512, so the same bytes are stored once however often they are backed up.
 */
import fs from 'node:fs';
import { ZebuError, ErrorCode } from '../errors.ts';
import type { BackupRepository } from '../backup/repository.ts';
import { runBackup, type SnapshotReader } from '../backup/backup-job.ts';
import { runRestore } from '../backup/restore-job.ts';
import type { CompressionName } from '../backup/format.ts';

const IMAGE_BACKUP_PREFIX = 'Image.';

/** The target-side volume name of an image's backups. */
export function imageBackupVolume(image: string): string {
  return `${IMAGE_BACKUP_PREFIX}${image}`;
}

/** Whether a target-side volume name holds an image's backups (not a volume's). */
export function isImageBackupVolume(volume: string): boolean {
  return volume.startsWith(IMAGE_BACKUP_PREFIX);
}

/** The backup of an image with this SHA-512. */
export function imageBackupName(checksum: string): string {
  return `image-${checksum.slice(0, 40)}`;
}

/** Reads a file as a backup reads a snapshot: every block counts as written (zero blocks are not stored). */
function fileReader(fd: number, sizeBytes: number): SnapshotReader {
  return {
    readSnapshot: async (_name, offset, length) => {
      const data = Buffer.alloc(length);
      let done = 0;
      while (done < length) {
        const n = await new Promise<number>((resolve, reject) => fs.read(fd, data, done, length - done, offset + done, (err, bytes) => (err ? reject(err) : resolve(bytes))));
        if (n === 0) throw new ZebuError(ErrorCode.EIO, `the image file ended at ${offset + done} bytes, expected ${sizeBytes}`);
        done += n;
      }
      return data;
    },
    snapshotChanges: async (_name, _base, offset, length) => [{ offset, length, data: true }],
  };
}

export interface ImageBackupOptions {
  repo: BackupRepository;
  image: string;
  checksum: string;
  /** A ready file of the image. */
  file: string;
  sizeBytes: number;
  compression: CompressionName;
  concurrency: number;
  onProgress?: (doneBytes: number, totalBytes: number) => void;
  signal?: AbortSignal;
}

/** Stores the file's bytes in the target; `created` false when a backup of the same bytes was there. */
export async function backupImage(o: ImageBackupOptions): Promise<{ backup: string; created: boolean }> {
  const volume = imageBackupVolume(o.image);
  const name = imageBackupName(o.checksum);
  const existing = await o.repo.readManifest(volume, name);
  if (existing !== null && existing.sizeBytes === o.sizeBytes) return { backup: name, created: false };
  const fd = fs.openSync(o.file, 'r');
  try {
    if (fs.fstatSync(fd).size !== o.sizeBytes) throw new ZebuError(ErrorCode.EIO, `${o.file} is ${fs.fstatSync(fd).size} bytes, the image ${o.sizeBytes}`);
    await runBackup({
      repo: o.repo, source: fileReader(fd, o.sizeBytes), volume, name, snapshot: 'image', sizeBytes: o.sizeBytes,
      createdAt: new Date().toISOString(), labels: { 'backing-image': o.image, sha512: o.checksum },
      compression: o.compression, base: null, concurrency: o.concurrency, signal: o.signal,
      onProgress: (p) => o.onProgress?.(p.doneBytes, p.totalBytes),
    });
  } finally {
    fs.closeSync(fd);
  }
  return { backup: name, created: true };
}

/** Writes an image's backup into `file` (open, empty): every block checked against its hash. */
export async function restoreImage(o: {
  repo: BackupRepository; image: string; backup: string; file: fs.promises.FileHandle; concurrency: number;
  onProgress?: (doneBytes: number, totalBytes: number) => void; signal?: AbortSignal;
}): Promise<void> {
  const manifest = await o.repo.readManifest(imageBackupVolume(o.image), o.backup);
  if (manifest === null) throw new ZebuError(ErrorCode.NOT_FOUND, `the backup ${o.backup} of backing image ${o.image} is not on the backup target ${o.repo.url}`);
  await restoreManifestInto(o.repo, manifest, o.file, o.concurrency, o.onProgress, o.signal);
}

/** Writes a backup's blocks into a file sized to it (zeros stay holes). */
export async function restoreManifestInto(
  repo: BackupRepository, manifest: Parameters<typeof runRestore>[0]['manifest'], file: fs.promises.FileHandle, concurrency: number,
  onProgress?: (doneBytes: number, totalBytes: number) => void, signal?: AbortSignal,
): Promise<void> {
  await file.truncate(manifest.sizeBytes);
  await runRestore({
    repo, manifest, applied: null, sizeBytes: manifest.sizeBytes, concurrency, signal,
    sink: {
      write: async (offset, data) => {
        await file.write(data, 0, data.length, offset);
      },
      zero: async (offset, length) => {
        await file.write(Buffer.alloc(length), 0, length, offset);
      },
      flush: () => file.sync(),
    },
    onProgress: (p) => onProgress?.(p.doneBytes, p.totalBytes),
  });
}
