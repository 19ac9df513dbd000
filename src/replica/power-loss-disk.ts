/**
 * A Disk that can lose power (tests only). Every file's writes since its last datasync stay in
 * memory (reads see them: a page cache) and reach the real file at datasync. powerFail() then
 * plays the crash: a seeded random part of the unsynced writes reaches the files, the rest is
 * lost, and the disk refuses everything afterwards; the caller ends the process (or abandons the
 * replica). writeFileAtomic stays durable as it is (write temp, fsync, rename, fsync dir).
 *
 * Modes: 'drop' applies some unsynced writes whole and drops the others; 'tear' also applies
 * some in part, cut at a random 512-byte boundary (a sector-atomic disk tearing a write).
 * File creation, truncation and unlink are not simulated as lost (the replica syncs the
 * directory after each of them).
 */
import fs from 'node:fs';
import { ZebuError, ErrorCode } from '../errors.ts';
import type { Disk, DiskFile, OpenMode } from './disk.ts';

/** 'keep': every unsynced write reaches the file (the process died, the page cache did not). */
export type PowerLossMode = 'drop' | 'tear' | 'keep';

/** Writes bytes into a file synchronously, at the moment of the crash. */
export type ApplyNow = (filePath: string, data: Buffer, position: number) => void;

/** The real file system's ApplyNow. */
function applyToFile(filePath: string, data: Buffer, position: number): void {
  let fd: number;
  try {
    fd = fs.openSync(filePath, 'r+');
  } catch {
    return; // unlinked meanwhile
  }
  try {
    writeAll(fd, data, position);
  } finally {
    fs.closeSync(fd);
  }
}

const SECTOR_BYTES = 512;

interface UnsyncedWrite {
  position: number;
  data: Buffer;
}

/** The unsynced writes of one path (shared by every open of it, and kept across close). */
interface FileCache {
  /** Writes not yet handed to the file, in order. */
  pending: UnsyncedWrite[];
  /** Writes being handed to the file by a running datasync: still overlaid on reads. */
  syncing: UnsyncedWrite[];
  /** Datasyncs of this path run one after the other. */
  syncChain: Promise<void>;
}

/** mulberry32: small, seeded, good enough to pick what a crash keeps. */
function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

export interface PowerFailReport {
  files: number;
  writes: number;
  applied: number;
  torn: number;
  dropped: number;
}

export class PowerLossDisk implements Disk {
  private readonly inner: Disk;
  private readonly caches = new Map<string, FileCache>();
  private failed = false;

  private readonly applyNow: ApplyNow;

  /** `applyNow` writes what survives a crash into `inner`'s files (default: the real file system). */
  constructor(inner: Disk, applyNow: ApplyNow = applyToFile) {
    this.inner = inner;
    this.applyNow = applyNow;
  }

  /** Writes not yet synced (tests). */
  get unsyncedWrites(): number {
    let n = 0;
    for (const cache of this.caches.values()) n += cache.pending.length + cache.syncing.length;
    return n;
  }

  checkAlive(what: string): void {
    if (this.failed) throw new ZebuError(ErrorCode.EIO, `${what}: the disk lost power`);
  }

  cache(filePath: string): FileCache {
    let cache = this.caches.get(filePath);
    if (cache === undefined) {
      cache = { pending: [], syncing: [], syncChain: Promise.resolve() };
      this.caches.set(filePath, cache);
    }
    return cache;
  }

  /**
   * The unsynced writes of a path, oldest first. The lists are replaced, never emptied in
   * place, so this stays valid while a datasync moves them to the file.
   */
  overlay(filePath: string): UnsyncedWrite[] {
    const cache = this.caches.get(filePath);
    if (cache === undefined || (cache.syncing.length === 0 && cache.pending.length === 0)) return [];
    return cache.syncing.length === 0 ? cache.pending.slice() : [...cache.syncing, ...cache.pending];
  }

  /**
   * The power fails: a seeded subset of every file's unsynced writes reaches the file
   * (synchronously, nothing else runs meanwhile), the rest is lost, and every later operation
   * fails with EIO. The caller then kills the process or abandons the replica.
   */
  powerFail(seed: number, mode: PowerLossMode): PowerFailReport {
    this.failed = true;
    const random = prng(seed);
    const report: PowerFailReport = { files: 0, writes: 0, applied: 0, torn: 0, dropped: 0 };
    // Paths in a fixed order: the same seed loses the same writes.
    for (const filePath of [...this.caches.keys()].sort()) {
      const cache = this.caches.get(filePath)!;
      const writes = [...cache.syncing, ...cache.pending];
      cache.syncing = [];
      cache.pending = [];
      if (writes.length === 0) continue;
      report.files++;
      for (const w of writes) {
        report.writes++;
        if (mode === 'keep') {
          this.applyNow(filePath, w.data, w.position);
          report.applied++;
          continue;
        }
        const roll = random();
        const sectors = Math.ceil(w.data.length / SECTOR_BYTES);
        if (mode === 'tear' && roll < 1 / 3 && sectors > 1) {
          // Only the part before or after a sector boundary reached the platter.
          const cut = (1 + Math.floor(random() * (sectors - 1))) * SECTOR_BYTES;
          if (random() < 0.5) this.applyNow(filePath, w.data.subarray(0, cut), w.position);
          else this.applyNow(filePath, w.data.subarray(cut), w.position + cut);
          report.torn++;
        } else if (roll < (mode === 'tear' ? 2 / 3 : 1 / 2)) {
          this.applyNow(filePath, w.data, w.position);
          report.applied++;
        } else {
          report.dropped++;
        }
      }
    }
    return report;
  }

  async open(filePath: string, mode: OpenMode): Promise<DiskFile> {
    this.checkAlive(`open ${filePath}`);
    if (mode === 'create') this.caches.delete(filePath);
    return new PowerLossFile(this, await this.inner.open(filePath, mode));
  }

  async readFile(filePath: string): Promise<Buffer> {
    this.checkAlive(`read ${filePath}`);
    // The overlay is taken before the read: a datasync finishing meanwhile cannot hide a write.
    const overlay = this.overlay(filePath);
    const base = await this.inner.readFile(filePath);
    if (overlay.length === 0) return base;
    let size = base.length;
    for (const w of overlay) size = Math.max(size, w.position + w.data.length);
    const out = Buffer.alloc(size);
    base.copy(out);
    for (const w of overlay) w.data.copy(out, w.position);
    return out;
  }

  async writeFileAtomic(filePath: string, data: Buffer): Promise<void> {
    this.checkAlive(`write ${filePath}`);
    this.caches.delete(filePath);
    return this.inner.writeFileAtomic(filePath, data);
  }

  async unlink(filePath: string): Promise<void> {
    this.checkAlive(`unlink ${filePath}`);
    this.caches.delete(filePath);
    return this.inner.unlink(filePath);
  }

  exists(filePath: string): Promise<boolean> {
    return this.inner.exists(filePath);
  }

  readdir(dirPath: string): Promise<string[]> {
    return this.inner.readdir(dirPath);
  }

  async mkdir(dirPath: string): Promise<void> {
    this.checkAlive(`mkdir ${dirPath}`);
    return this.inner.mkdir(dirPath);
  }

  async syncDir(dirPath: string): Promise<void> {
    this.checkAlive(`sync ${dirPath}`);
    return this.inner.syncDir(dirPath);
  }
}

function writeAll(fd: number, data: Buffer, position: number): void {
  let done = 0;
  while (done < data.length) done += fs.writeSync(fd, data, done, data.length - done, position + done);
}

class PowerLossFile implements DiskFile {
  readonly path: string;
  private readonly disk: PowerLossDisk;
  private readonly inner: DiskFile;

  constructor(disk: PowerLossDisk, inner: DiskFile) {
    this.disk = disk;
    this.inner = inner;
    this.path = inner.path;
  }

  async read(buf: Buffer, bufOffset: number, length: number, position: number): Promise<number> {
    this.disk.checkAlive(`read ${this.path}`);
    const overlay = this.disk.overlay(this.path);
    const got = await this.inner.read(buf, bufOffset, length, position);
    if (overlay.length === 0) return got;
    // Beyond the file's end, unsynced writes may leave holes: those read as zeros.
    buf.fill(0, bufOffset + got, bufOffset + length);
    let end = got;
    const rangeEnd = position + length;
    for (const w of overlay) {
      const from = Math.max(position, w.position);
      const to = Math.min(rangeEnd, w.position + w.data.length);
      if (from >= to) continue;
      w.data.copy(buf, bufOffset + (from - position), from - w.position, to - w.position);
      end = Math.max(end, to - position);
    }
    return end;
  }

  async write(buf: Buffer, bufOffset: number, length: number, position: number): Promise<void> {
    this.disk.checkAlive(`write ${this.path}`);
    // A copy: the caller may reuse its buffer once the write is acknowledged.
    this.disk.cache(this.path).pending.push({ position, data: Buffer.from(buf.subarray(bufOffset, bufOffset + length)) });
  }

  datasync(): Promise<void> {
    try {
      this.disk.checkAlive(`sync ${this.path}`);
    } catch (err) {
      return Promise.reject(err);
    }
    const cache = this.disk.cache(this.path);
    const run = cache.syncChain.catch(() => {}).then(async () => {
      this.disk.checkAlive(`sync ${this.path}`);
      cache.syncing = cache.pending;
      cache.pending = [];
      try {
        for (const w of cache.syncing) {
          this.disk.checkAlive(`sync ${this.path}`);
          await this.inner.write(w.data, 0, w.data.length, w.position);
        }
        this.disk.checkAlive(`sync ${this.path}`);
        await this.inner.datasync();
        cache.syncing = [];
      } catch (err) {
        // Not known to be on disk: still unsynced.
        cache.pending = [...cache.syncing, ...cache.pending];
        cache.syncing = [];
        throw err;
      }
    });
    cache.syncChain = run;
    return run;
  }

  async punchHole(offset: number, length: number): Promise<boolean> {
    this.disk.checkAlive(`punch ${this.path}`);
    // Unsynced like a write of zeros: a crash before the next sync may lose it. (The size stays:
    // zeros past the end would grow the file, so the range is cut at the size the file has.)
    const size = await this.sizeBytes();
    const end = Math.min(offset + length, size);
    if (end > offset) this.disk.cache(this.path).pending.push({ position: offset, data: Buffer.alloc(end - offset) });
    return true;
  }

  async truncate(sizeBytes: number): Promise<void> {
    this.disk.checkAlive(`truncate ${this.path}`);
    // Writes beyond the new end would be cut off by it: hand everything over first.
    await this.datasync();
    return this.inner.truncate(sizeBytes);
  }

  async sizeBytes(): Promise<number> {
    this.disk.checkAlive(`stat ${this.path}`);
    const overlay = this.disk.overlay(this.path);
    let size = await this.inner.sizeBytes();
    for (const w of overlay) size = Math.max(size, w.position + w.data.length);
    return size;
  }

  close(): Promise<void> {
    // Unsynced writes stay in the cache (as in a page cache): later opens still see them.
    return this.inner.close();
  }
}
