/**
 * A node's side of backing images: the files of images on this node's disks
 * (`DISK/backing-images/NAME/image.raw`). For each file the backing-image controller asked for
 * (`pending`) it fetches the bytes — downloaded from the image's URL, or copied from a ready file
 * on another disk of this node — and reports `in-progress` with its progress, then `ready` or
 * `failed` with the reason. It removes files marked `cleaning`, and checks ready files (size and
 * SHA-512) when it starts and every `verifyEveryMs`: a file that no longer matches is `failed`,
 * and one that comes back after being `unknown` is `ready` again only once checked.
 */
import fs from 'node:fs';
import path from 'node:path';
import { ZebuError, ErrorCode } from '../errors.ts';
import { BACKING_IMAGES_DIR, Kind, imageFilePath, type BackingImageValue, type Objects } from '../cluster/objects.ts';
import { writtenByManager, type BackingImageFile } from '../cluster/object-types.ts';
import type { StoreObject } from '../store/store.ts';
import { downloadImage } from './image-download.ts';
import { hashFile, moveIntoPlace } from '../backing-image/writer.ts';
import { convertQcow2, isQcow2 } from '../backing-image/qcow2.ts';

export { imageFilePath };
const PROGRESS_WRITE_MS = 1000;

export interface BackingImageFilesOptions {
  objects: Objects;
  nodeId: string;
  /** Disk name -> its directory, for this node's disks. */
  diskPaths: () => Map<string, string>;
  fetch?: typeof fetch;
  /** First wait between download attempts (image-download.ts; default 500 ms). */
  retryDelayMs?: number;
  /** How often ready files are checked again (default 6 h). */
  verifyEveryMs?: number;
  log: (event: Record<string, unknown>) => void;
}

export class BackingImageFiles {
  private readonly o: BackingImageFilesOptions;
  /** Fetches and checks under way, by `image/disk`. */
  private readonly running = new Map<string, AbortController>();
  /** When each ready file was last checked (ms), by `image/disk`. */
  private readonly checkedAt = new Map<string, number>();
  private pass: Promise<void> | null = null;
  private stopped = false;

  constructor(options: BackingImageFilesOptions) {
    this.o = options;
  }

  /** Whether this file was fetched or checked since this agent started (a replica may read it). */
  isChecked(image: string, disk: string): boolean {
    return this.checkedAt.has(`${image}/${disk}`);
  }

  /** One look at every image (one at a time; the agent calls it on changes and periodically). */
  kick(): Promise<void> {
    if (this.stopped) return Promise.resolve();
    this.pass ??= this.reconcile()
      .catch((err) => this.o.log({ event: 'backing-image-pass-failed', error: (err as Error).message }))
      .finally(() => {
        this.pass = null;
      });
    return this.pass;
  }

  async stop(): Promise<void> {
    this.stopped = true;
    for (const a of this.running.values()) a.abort(new Error('the agent is stopping'));
    await this.pass;
    while (this.running.size > 0) await new Promise((r) => setTimeout(r, 10));
  }

  private async reconcile(): Promise<void> {
    const disks = this.o.diskPaths();
    for (const image of await this.o.objects.list(Kind.BackingImage)) {
      for (const [diskName, file] of Object.entries(image.value.status.files)) {
        const diskPath = disks.get(diskName);
        if (diskPath === undefined || file.nodeId !== this.o.nodeId) continue;
        const key = `${image.name}/${diskName}`;
        if (this.running.has(key)) continue;
        // The first file of an upload or an export is written by the manager (src/backing-image/writer.ts).
        const managerWrites = writtenByManager(image.value.spec.source, file.from);
        if (managerWrites && (file.state === 'pending' || file.state === 'starting' || file.state === 'in-progress')) continue;
        if (file.state === 'cleaning') await this.clean(image.name, diskName, diskPath);
        else if (file.state === 'pending' || file.state === 'starting' || file.state === 'in-progress') this.start(key, (signal) => this.fetchFile(image, diskName, diskPath, file, signal));
        else if (file.state === 'unknown' || (file.state === 'ready' && Date.now() - (this.checkedAt.get(key) ?? 0) >= (this.o.verifyEveryMs ?? 6 * 3600_000))) {
          this.start(key, (signal) => this.checkFile(image.name, diskName, diskPath, signal));
        }
      }
    }
  }

  private start(key: string, job: (signal: AbortSignal) => Promise<void>): void {
    const abort = new AbortController();
    this.running.set(key, abort);
    void job(abort.signal)
      .catch((err) => this.o.log({ event: 'backing-image-file-failed', file: key, error: (err as Error).message }))
      .finally(() => {
        this.running.delete(key);
        if (!this.stopped) void this.kick();
      });
  }

  /** Changes one file's entry when it is still in one of `from` states; returns whether it did. */
  private async setFile(image: string, disk: string, from: readonly BackingImageFile['state'][], change: (f: BackingImageFile, v: BackingImageValue) => void): Promise<boolean> {
    let changed = false;
    await this.o.objects.mutate(Kind.BackingImage, image, (v) => {
      changed = false;
      const f = v.status.files[disk];
      if (f === undefined || !from.includes(f.state)) return false;
      change(f, v);
      changed = true;
    });
    return changed;
  }

  private async clean(image: string, disk: string, diskPath: string): Promise<void> {
    fs.rmSync(path.join(diskPath, BACKING_IMAGES_DIR, image), { recursive: true, force: true });
    await this.o.objects.mutate(Kind.BackingImage, image, (v) => {
      if (v.status.files[disk]?.state !== 'cleaning') return false;
      delete v.status.files[disk];
    });
    this.checkedAt.delete(`${image}/${disk}`);
    this.o.log({ event: 'backing-image-file-removed', image, disk });
  }

  private async fetchFile(image: StoreObject<BackingImageValue>, disk: string, diskPath: string, file: BackingImageFile, signal: AbortSignal): Promise<void> {
    const now = (): string => new Date().toISOString();
    const started = await this.setFile(image.name, disk, ['pending', 'starting', 'in-progress'], (f) => {
      f.state = 'starting';
      f.progress = 0;
      f.message = null;
      f.transitionAt = now();
    });
    if (!started) return;
    const target = imageFilePath(diskPath, image.name);
    fs.mkdirSync(path.dirname(target), { recursive: true });
    let lastWrite = 0;
    const progress = async (done: number, total: number | null): Promise<void> => {
      if (Date.now() - lastWrite < PROGRESS_WRITE_MS) return;
      lastWrite = Date.now();
      await this.setFile(image.name, disk, ['starting', 'in-progress'], (f) => {
        if (f.state === 'starting') f.transitionAt = now();
        f.state = 'in-progress';
        f.progress = total !== null && total > 0 ? Math.min(1, done / total) : 0;
        f.message = total === null ? `${done} bytes so far` : null;
      });
    };
    const expected = image.value.status.checksum ?? image.value.spec.expectedChecksum;
    let result: { checksum: string; sizeBytes: number };
    try {
      result = await this.fetchBytes(image, file, target, expected, (done, total) => void progress(done, total).catch(() => {}), signal);
    } catch (err) {
      // Stopped: the next agent takes it up again (the file is still starting or in progress).
      if (signal.aborted) return;
      const message = (err as Error).message;
      await this.setFile(image.name, disk, ['starting', 'in-progress'], (f) => {
        f.state = 'failed';
        f.message = message;
        f.transitionAt = now();
      });
      this.o.log({ event: 'backing-image-fetch-failed', image: image.name, disk, error: message });
      return;
    }
    let clash: string | null = null;
    await this.setFile(image.name, disk, ['starting', 'in-progress'], (f, v) => {
      clash = v.status.checksum !== null && v.status.checksum !== result.checksum ? `its SHA-512 ${result.checksum} differs from the image's ${v.status.checksum}` : null;
      if (clash !== null) {
        f.state = 'failed';
        f.message = clash;
      } else {
        v.status.checksum ??= result.checksum;
        v.status.sizeBytes = result.sizeBytes;
        f.state = 'ready';
        f.progress = 1;
        f.message = null;
      }
      f.transitionAt = now();
    });
    if (clash !== null) fs.rmSync(target, { force: true });
    else this.checkedAt.set(`${image.name}/${disk}`, Date.now());
  }

  private async fetchBytes(
    image: StoreObject<BackingImageValue>, file: BackingImageFile, target: string, expected: string | null,
    onProgress: (done: number, total: number | null) => void, signal: AbortSignal,
  ): Promise<{ checksum: string; sizeBytes: number }> {
    const source = image.value.spec.source;
    if (typeof file.from === 'object') {
      // A copy of a ready file on another disk of this node.
      const fromPath = this.o.diskPaths().get(file.from.disk);
      if (fromPath === undefined) throw new ZebuError(ErrorCode.UNSUPPORTED, `disk ${file.from.disk} is not on node ${this.o.nodeId}: copies between nodes are not built yet`);
      const part = `${target}.part`;
      try {
        fs.copyFileSync(imageFilePath(fromPath, image.name), part);
        const got = await hashFile(part, signal);
        onProgress(got.sizeBytes, got.sizeBytes);
        if (expected !== null && got.checksum !== expected) throw new ZebuError(ErrorCode.EINVAL, `the copy from disk ${file.from.disk} has SHA-512 ${got.checksum}, not the image's ${expected}`);
        await moveIntoPlace(part, target);
        return got;
      } finally {
        fs.rmSync(part, { force: true });
      }
    }
    if (file.from === 'source' && source.type === 'download') {
      const free = fs.statfsSync(path.dirname(target));
      // The expected checksum is the published one, of the bytes downloaded (a qcow2 file, say);
      // the image's own (status) is of the raw file, and is compared once the file is made.
      const downloaded = `${target}.download`;
      try {
        const r = await downloadImage({ url: source.url, path: downloaded, expectedChecksum: image.value.spec.expectedChecksum, maxBytes: free.bavail * free.bsize, onProgress, fetch: this.o.fetch, retryDelayMs: this.o.retryDelayMs, signal });
        if (!(await isQcow2(downloaded))) {
          await moveIntoPlace(downloaded, target);
          return { checksum: r.checksum, sizeBytes: r.sizeBytes };
        }
        const raw = `${target}.part`;
        try {
          await convertQcow2(downloaded, raw, signal);
          const got = await hashFile(raw, signal);
          await moveIntoPlace(raw, target);
          return got;
        } finally {
          fs.rmSync(raw, { force: true });
        }
      } finally {
        fs.rmSync(downloaded, { force: true });
      }
    }
    throw new ZebuError(ErrorCode.UNSUPPORTED, `fetching a ${source.type} image from its ${file.from === 'backup' ? 'backup' : 'source'} is not built yet`);
  }

  /** Checks a ready (or returning unknown) file against the image's size and checksum. */
  private async checkFile(image: string, disk: string, diskPath: string, signal: AbortSignal): Promise<void> {
    const current = await this.o.objects.get(Kind.BackingImage, image);
    const file = current?.value.status.files[disk];
    if (current === null || file === undefined || (file.state !== 'ready' && file.state !== 'unknown')) return;
    const target = imageFilePath(diskPath, image);
    let problem: string | null = null;
    try {
      const got = await hashFile(target, signal);
      const want = current.value.status;
      if (want.checksum === null) problem = 'the image has no checksum yet';
      else if (got.sizeBytes !== want.sizeBytes) problem = `the file is ${got.sizeBytes} bytes, the image ${want.sizeBytes}: it changed on disk`;
      else if (got.checksum !== want.checksum) problem = `the file's SHA-512 ${got.checksum} is not the image's ${want.checksum}: it changed on disk`;
    } catch (err) {
      if (signal.aborted) return;
      problem = (err as NodeJS.ErrnoException).code === 'ENOENT' ? 'the file is missing' : `cannot read the file: ${(err as Error).message}`;
    }
    const stillThere = await this.setFile(image, disk, ['ready', 'unknown'], (f) => {
      const state = problem === null ? 'ready' : 'failed';
      if (f.state !== state) f.transitionAt = new Date().toISOString();
      f.state = state;
      f.progress = problem === null ? 1 : 0;
      f.message = problem;
    });
    // Only a file found good counts as checked (a replica on it may start: agent.ts), and only
    // once its entry says so; a bad one is failed and checked again only once it is replaced.
    if (problem === null && stillThere) this.checkedAt.set(`${image}/${disk}`, Date.now());
    if (problem !== null) {
      this.checkedAt.delete(`${image}/${disk}`);
      this.o.log({ event: 'backing-image-file-bad', image, disk, problem });
    }
  }
}
