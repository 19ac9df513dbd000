/**
 * A Disk whose syncs take time, on the simulated clock of the replica's process. A real fsync
 * takes from a fraction of a millisecond to tens of them, and meanwhile the replica goes on
 * reading and writing: a flush can be durable on one replica and not yet on another while the
 * next writes arrive, and a power cut then finds the replicas' write-intent logs in different
 * states. With instant syncs those windows did not exist.
 *
 * Wraps the power-loss disk: writes stay unsynced (lost or torn at a power cut) until the delayed
 * sync runs.
 */
import type { Disk, DiskFile, OpenMode } from '../../src/replica/disk.ts';

export class LatencyDisk implements Disk {
  private readonly inner: Disk;
  /** Waits for one sync's latency (the process's clock; a frozen process waits longer). */
  readonly delay: () => Promise<void>;
  /** Called after each file sync completed (the simulator times a power cut by it). */
  onSynced: ((filePath: string) => void) | null = null;

  constructor(inner: Disk, delay: () => Promise<void>) {
    this.inner = inner;
    this.delay = delay;
  }

  async open(filePath: string, mode: OpenMode): Promise<DiskFile> {
    return new LatencyFile(this, await this.inner.open(filePath, mode));
  }
  readFile(filePath: string): Promise<Buffer> {
    return this.inner.readFile(filePath);
  }
  async writeFileAtomic(filePath: string, data: Buffer): Promise<void> {
    await this.delay();
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
    await this.delay();
    return this.inner.syncDir(dirPath);
  }
}

class LatencyFile implements DiskFile {
  readonly path: string;
  private readonly disk: LatencyDisk;
  private readonly inner: DiskFile;

  constructor(disk: LatencyDisk, inner: DiskFile) {
    this.disk = disk;
    this.inner = inner;
    this.path = inner.path;
  }
  read(buf: Buffer, bufOffset: number, length: number, position: number): Promise<number> {
    return this.inner.read(buf, bufOffset, length, position);
  }
  write(buf: Buffer, bufOffset: number, length: number, position: number): Promise<void> {
    return this.inner.write(buf, bufOffset, length, position);
  }
  async datasync(): Promise<void> {
    await this.disk.delay();
    await this.inner.datasync();
    this.disk.onSynced?.(this.path);
  }
  punchHole(offset: number, length: number): Promise<boolean> {
    return this.inner.punchHole(offset, length);
  }
  truncate(sizeBytes: number): Promise<void> {
    return this.inner.truncate(sizeBytes);
  }
  sizeBytes(): Promise<number> {
    return this.inner.sizeBytes();
  }
  close(): Promise<void> {
    return this.inner.close();
  }
}
