/**
 * A Disk held in memory: the simulator's disk (test/sim), and a quick one for tests. What is
 * written is what a later open reads: there is no page cache here, every write is durable at
 * once. Wrap it in a PowerLossDisk for unsynced writes that a crash may lose, and in a FaultyDisk
 * for EIO and ENOSPC. Every operation completes as a resolved promise, so a run is deterministic.
 *
 * Files are sparse (64 KiB chunks, allocated when written). `capacityBytes` bounds the memory the
 * files hold (ENOSPC beyond it), like a full file system.
 */
import path from 'node:path';
import type { Disk, DiskFile, OpenMode } from './disk.ts';

const CHUNK_BYTES = 64 * 1024;

/** A sparse file: chunks never written read as zeros and take no memory. */
class MemoryFile {
  sizeBytes = 0;
  private readonly chunks = new Map<number, Buffer>();

  read(buf: Buffer, bufOffset: number, length: number, position: number): void {
    this.eachChunk(position, length, (index, within, done, n) => {
      const chunk = this.chunks.get(index);
      if (chunk === undefined) buf.fill(0, bufOffset + done, bufOffset + done + n);
      else chunk.copy(buf, bufOffset + done, within, within + n);
    });
  }

  write(buf: Buffer, bufOffset: number, length: number, position: number): void {
    this.eachChunk(position, length, (index, within, done, n) => {
      let chunk = this.chunks.get(index);
      if (chunk === undefined) {
        chunk = Buffer.alloc(CHUNK_BYTES);
        this.chunks.set(index, chunk);
      }
      buf.copy(chunk, within, bufOffset + done, bufOffset + done + n);
    });
    this.sizeBytes = Math.max(this.sizeBytes, position + length);
  }

  /** The range cut at chunk boundaries: chunk index, offset in it, bytes before it, bytes in it. */
  private eachChunk(position: number, length: number, fn: (index: number, within: number, done: number, n: number) => void): void {
    let done = 0;
    while (done < length) {
      const at = position + done;
      const index = Math.floor(at / CHUNK_BYTES);
      const within = at - index * CHUNK_BYTES;
      const n = Math.min(length - done, CHUNK_BYTES - within);
      fn(index, within, done, n);
      done += n;
    }
  }

  /** Zeros the range; chunks it covers whole are freed. The size stays. */
  punch(position: number, length: number): void {
    const end = Math.min(position + length, this.sizeBytes);
    if (end <= position) return;
    this.eachChunk(position, end - position, (index, within, _done, n) => {
      const chunk = this.chunks.get(index);
      if (chunk === undefined) return;
      if (n === CHUNK_BYTES) this.chunks.delete(index);
      else chunk.fill(0, within, within + n);
    });
  }

  truncate(sizeBytes: number): void {
    if (sizeBytes < this.sizeBytes) {
      for (const index of [...this.chunks.keys()]) {
        const from = index * CHUNK_BYTES;
        if (from >= sizeBytes) this.chunks.delete(index);
        else if (from + CHUNK_BYTES > sizeBytes) this.chunks.get(index)!.fill(0, sizeBytes - from);
      }
    }
    this.sizeBytes = sizeBytes;
  }

  /** Memory held (chunks written). */
  get heldBytes(): number {
    return this.chunks.size * CHUNK_BYTES;
  }

  all(): Buffer {
    const out = Buffer.alloc(this.sizeBytes);
    this.read(out, 0, this.sizeBytes, 0);
    return out;
  }
}

function fsError(code: 'ENOENT' | 'EEXIST' | 'ENOSPC' | 'EBADF', what: string): NodeJS.ErrnoException {
  const err = new Error(`${code}: ${what}`) as NodeJS.ErrnoException;
  err.code = code;
  return err;
}

export class MemoryDisk implements Disk {
  private readonly files = new Map<string, MemoryFile>();
  private readonly dirs = new Set<string>(['/']);
  private readonly capacityBytes: number;

  constructor(options: { capacityBytes?: number } = {}) {
    this.capacityBytes = options.capacityBytes ?? Number.MAX_SAFE_INTEGER;
  }

  /** Bytes of memory the files hold (written chunks: sparse files count only what was written). */
  get usedBytes(): number {
    let n = 0;
    for (const f of this.files.values()) n += f.heldBytes;
    return n;
  }

  /** The file's bytes, now (tests). */
  contents(filePath: string): Buffer | null {
    return this.files.get(filePath)?.all() ?? null;
  }

  /** Writes at once, synchronously (a PowerLossDisk applying what reached the platter). */
  writeNow(filePath: string, data: Buffer, position: number): void {
    const f = this.files.get(filePath);
    if (f === undefined) return; // unlinked meanwhile
    f.write(data, 0, data.length, position);
  }

  private file(filePath: string): MemoryFile {
    const f = this.files.get(filePath);
    if (f === undefined) throw fsError('ENOENT', `no such file ${filePath}`);
    return f;
  }

  private place(f: MemoryFile, buf: Buffer, bufOffset: number, length: number, position: number, filePath: string): void {
    if (this.usedBytes + length > this.capacityBytes) throw fsError('ENOSPC', `no space left for ${filePath}`);
    f.write(buf, bufOffset, length, position);
  }

  private parentMustExist(filePath: string): void {
    if (!this.dirs.has(path.dirname(filePath))) throw fsError('ENOENT', `no directory ${path.dirname(filePath)}`);
  }

  async open(filePath: string, mode: OpenMode): Promise<DiskFile> {
    if (mode === 'create') {
      this.parentMustExist(filePath);
      if (this.files.has(filePath)) throw fsError('EEXIST', `${filePath} exists`);
      this.files.set(filePath, new MemoryFile());
    } else {
      this.file(filePath);
    }
    return new MemoryDiskFile(this, filePath, mode !== 'read');
  }

  /** For MemoryDiskFile: the file as it is now (ENOENT once unlinked: an open file then fails). */
  entry(filePath: string): MemoryFile {
    return this.file(filePath);
  }

  write(filePath: string, buf: Buffer, bufOffset: number, length: number, position: number): void {
    this.place(this.file(filePath), buf, bufOffset, length, position, filePath);
  }

  punch(filePath: string, position: number, length: number): void {
    this.file(filePath).punch(position, length);
  }

  truncate(filePath: string, sizeBytes: number): void {
    this.file(filePath).truncate(sizeBytes);
  }

  async readFile(filePath: string): Promise<Buffer> {
    return this.file(filePath).all();
  }

  async writeFileAtomic(filePath: string, data: Buffer): Promise<void> {
    this.parentMustExist(filePath);
    const old = this.files.get(filePath);
    if (this.usedBytes - (old?.heldBytes ?? 0) + data.length > this.capacityBytes) throw fsError('ENOSPC', `no space left for ${filePath}`);
    const f = new MemoryFile();
    f.write(data, 0, data.length, 0);
    this.files.set(filePath, f);
  }

  async unlink(filePath: string): Promise<void> {
    this.file(filePath);
    this.files.delete(filePath);
  }

  async exists(filePath: string): Promise<boolean> {
    return this.files.has(filePath) || this.dirs.has(filePath);
  }

  async readdir(dirPath: string): Promise<string[]> {
    if (!this.dirs.has(dirPath)) throw fsError('ENOENT', `no directory ${dirPath}`);
    const names: string[] = [];
    for (const p of [...this.files.keys(), ...this.dirs]) if (p !== dirPath && path.dirname(p) === dirPath) names.push(path.basename(p));
    return names.sort();
  }

  async mkdir(dirPath: string): Promise<void> {
    // Recursive, as NodeDisk's.
    let p = path.resolve(dirPath);
    while (!this.dirs.has(p)) {
      if (this.files.has(p)) throw fsError('EEXIST', `${p} is a file`);
      this.dirs.add(p);
      p = path.dirname(p);
    }
  }

  async syncDir(dirPath: string): Promise<void> {
    if (!this.dirs.has(dirPath)) throw fsError('ENOENT', `no directory ${dirPath}`);
  }
}

class MemoryDiskFile implements DiskFile {
  readonly path: string;
  private readonly disk: MemoryDisk;
  private readonly writable: boolean;
  private closed = false;

  constructor(disk: MemoryDisk, filePath: string, writable: boolean) {
    this.disk = disk;
    this.path = filePath;
    this.writable = writable;
  }

  private check(write: boolean): void {
    if (this.closed) throw fsError('EBADF', `${this.path} is closed`);
    if (write && !this.writable) throw fsError('EBADF', `${this.path} is open for reading only`);
  }

  async read(buf: Buffer, bufOffset: number, length: number, position: number): Promise<number> {
    this.check(false);
    const f = this.disk.entry(this.path);
    const end = Math.min(f.sizeBytes, position + length);
    if (end <= position) return 0;
    f.read(buf, bufOffset, end - position, position);
    return end - position;
  }

  async write(buf: Buffer, bufOffset: number, length: number, position: number): Promise<void> {
    this.check(true);
    this.disk.write(this.path, buf, bufOffset, length, position);
  }

  async datasync(): Promise<void> {
    this.check(false);
  }

  async punchHole(offset: number, length: number): Promise<boolean> {
    this.check(true);
    this.disk.punch(this.path, offset, length);
    return true;
  }

  async truncate(sizeBytes: number): Promise<void> {
    this.check(true);
    this.disk.truncate(this.path, sizeBytes);
  }

  async sizeBytes(): Promise<number> {
    this.check(false);
    return this.disk.entry(this.path).sizeBytes;
  }

  async close(): Promise<void> {
    this.closed = true;
  }
}
