/**
 * A Disk that fails on command. Tests (in process, or through the replica server's
 * fault-injection op) add rules; each rule matches an operation kind and optionally a path
 * substring, skips `afterOps` matching calls, then fails `count` of them (or all, when absent).
 */
import type { Disk, DiskFile, OpenMode } from './disk.ts';

export type FaultOp = 'read' | 'write' | 'sync' | 'meta' | 'any';
export type FaultErrno = 'EIO' | 'ENOSPC';

export interface FaultRule {
  op: FaultOp;
  errno: FaultErrno;
  pathIncludes?: string;
  afterOps?: number;
  count?: number;
}

interface LiveRule extends FaultRule {
  seen: number;
  fired: number;
}

const MAX_RULES = 64;

function systemError(errno: FaultErrno, op: string, filePath: string): NodeJS.ErrnoException {
  const text = errno === 'EIO' ? 'i/o error' : 'no space left on device';
  const err: NodeJS.ErrnoException = new Error(`${errno}: ${text} (injected), ${op} '${filePath}'`);
  err.code = errno;
  err.errno = errno === 'EIO' ? -5 : -28;
  err.syscall = op;
  return err;
}

export class FaultyDisk implements Disk {
  private readonly inner: Disk;
  private rules: LiveRule[] = [];

  constructor(inner: Disk) {
    this.inner = inner;
  }

  addRule(rule: FaultRule): void {
    if (this.rules.length >= MAX_RULES) throw new Error(`at most ${MAX_RULES} fault rules`);
    this.rules.push({ ...rule, seen: 0, fired: 0 });
  }

  clearRules(): void {
    this.rules = [];
  }

  /** Throws the injected error when a rule fires for this operation. */
  check(op: Exclude<FaultOp, 'any'>, filePath: string): void {
    for (const rule of this.rules) {
      if (rule.op !== 'any' && rule.op !== op) continue;
      if (rule.pathIncludes !== undefined && !filePath.includes(rule.pathIncludes)) continue;
      rule.seen++;
      if (rule.seen <= (rule.afterOps ?? 0)) continue;
      if (rule.count !== undefined && rule.fired >= rule.count) continue;
      rule.fired++;
      throw systemError(rule.errno, op, filePath);
    }
  }

  async open(filePath: string, mode: OpenMode): Promise<DiskFile> {
    this.check('meta', filePath);
    return new FaultyDiskFile(this, await this.inner.open(filePath, mode));
  }
  async readFile(filePath: string): Promise<Buffer> {
    this.check('read', filePath);
    return this.inner.readFile(filePath);
  }
  async writeFileAtomic(filePath: string, data: Buffer): Promise<void> {
    this.check('meta', filePath);
    return this.inner.writeFileAtomic(filePath, data);
  }
  unlink(filePath: string): Promise<void> {
    return this.inner.unlink(filePath);
  }
  exists(filePath: string): Promise<boolean> {
    return this.inner.exists(filePath);
  }
  readdir(dirPath: string): Promise<string[]> {
    return this.inner.readdir(dirPath);
  }
  mkdir(dirPath: string): Promise<void> {
    return this.inner.mkdir(dirPath);
  }
  async syncDir(dirPath: string): Promise<void> {
    this.check('sync', dirPath);
    return this.inner.syncDir(dirPath);
  }
}

class FaultyDiskFile implements DiskFile {
  readonly path: string;
  private readonly disk: FaultyDisk;
  private readonly inner: DiskFile;
  constructor(disk: FaultyDisk, inner: DiskFile) {
    this.disk = disk;
    this.inner = inner;
    this.path = inner.path;
  }
  async read(buf: Buffer, bufOffset: number, length: number, position: number): Promise<number> {
    this.disk.check('read', this.path);
    return this.inner.read(buf, bufOffset, length, position);
  }
  async write(buf: Buffer, bufOffset: number, length: number, position: number): Promise<void> {
    this.disk.check('write', this.path);
    return this.inner.write(buf, bufOffset, length, position);
  }
  async datasync(): Promise<void> {
    this.disk.check('sync', this.path);
    return this.inner.datasync();
  }
  async punchHole(offset: number, length: number): Promise<boolean> {
    this.disk.check('write', this.path);
    return this.inner.punchHole(offset, length);
  }
  async truncate(sizeBytes: number): Promise<void> {
    this.disk.check('write', this.path);
    return this.inner.truncate(sizeBytes);
  }
  sizeBytes(): Promise<number> {
    return this.inner.sizeBytes();
  }
  close(): Promise<void> {
    return this.inner.close();
  }
}
