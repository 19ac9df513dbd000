/**
 * A tiny in-memory block backend served by a real DataServer on a UNIX socket: a stand-in
 * engine whose size a test can change (online expand) and whose requests it can hold.
 */
import { ZebuError, ErrorCode } from '../../src/errors.ts';
import type { BlockBackend, BackendExtent } from '../../src/protocol/backend.ts';
import { DataServer } from '../../src/protocol/server.ts';

export class MemoryBackend implements BlockBackend {
  sizeBytes: number;
  readonly epoch = 0;
  private data: Buffer;
  private gate: Promise<void> | null = null;
  private openGate: (() => void) | null = null;
  /** Requests waiting at the gate. */
  held = 0;
  private fenced = false;

  constructor(sizeBytes: number) {
    this.sizeBytes = sizeBytes;
    this.data = Buffer.alloc(sizeBytes);
  }

  /** Online expand: the new size shows in INFO. */
  resize(sizeBytes: number): void {
    const grown = Buffer.alloc(sizeBytes);
    this.data.copy(grown, 0, 0, Math.min(sizeBytes, this.data.length));
    this.data = grown;
    this.sizeBytes = sizeBytes;
  }

  /** From now on, I/O waits until release(). */
  hold(): void {
    if (this.gate !== null) return;
    this.gate = new Promise((resolve) => (this.openGate = resolve));
  }

  release(): void {
    this.openGate?.();
    this.gate = null;
    this.openGate = null;
  }

  /** From now on every request fails FENCED, as a superseded engine answers. */
  fence(): void {
    this.fenced = true;
  }

  private async pass(): Promise<void> {
    if (this.fenced) throw new ZebuError(ErrorCode.FENCED, 'volume v is faulted: superseded by a newer epoch');
    if (this.gate === null) return;
    this.held++;
    await this.gate;
    this.held--;
  }

  private check(offset: number, length: number): void {
    if (offset + length > this.sizeBytes) throw new ZebuError(ErrorCode.EINVAL, `range ${offset}+${length} beyond ${this.sizeBytes}`);
  }

  async checkEpoch(): Promise<void> {}

  async read(offset: number, length: number, out: Buffer, outOffset: number): Promise<void> {
    await this.pass();
    this.check(offset, length);
    this.data.copy(out, outOffset, offset, offset + length);
  }

  async readSnapshot(): Promise<void> {
    throw new ZebuError(ErrorCode.UNSUPPORTED, 'no snapshots in memory');
  }

  async write(offset: number, data: Buffer): Promise<void> {
    await this.pass();
    this.check(offset, data.length);
    data.copy(this.data, offset);
  }

  async zero(offset: number, length: number): Promise<void> {
    await this.pass();
    this.check(offset, length);
    this.data.fill(0, offset, offset + length);
  }

  async flush(): Promise<void> {
    await this.pass();
  }

  async blockStatus(offset: number, length: number): Promise<BackendExtent[]> {
    return [{ offset, length, data: true }];
  }

  info(): unknown {
    return { sizeBytes: this.sizeBytes };
  }

  async snapshotCreate(): Promise<unknown> {
    throw new ZebuError(ErrorCode.UNSUPPORTED, 'no snapshots in memory');
  }

  snapshotList(): unknown {
    return [];
  }

  async snapshotDelete(): Promise<void> {
    throw new ZebuError(ErrorCode.UNSUPPORTED, 'no snapshots in memory');
  }

  async snapshotRevert(): Promise<void> {
    throw new ZebuError(ErrorCode.UNSUPPORTED, 'no snapshots in memory');
  }

  /** A copy of the bytes as they are now (another engine's view of the same replicas). */
  clone(): MemoryBackend {
    const copy = new MemoryBackend(this.sizeBytes);
    this.data.copy(copy.data);
    return copy;
  }

  /** Reads the bytes directly (what the replicas hold). */
  peek(offset: number, length: number): Buffer {
    return Buffer.from(this.data.subarray(offset, offset + length));
  }

  /**
   * Serves this backend on `socketPath` (the frontend's side of an engine); `identity` is added
   * to INFO (an engine process says which process it is: {process: {pid, startTime}}).
   */
  async serve(socketPath: string, secret: Buffer, identity?: Record<string, unknown>): Promise<DataServer> {
    const server = new DataServer(this, { secret, identity });
    await server.listenPath(socketPath);
    return server;
  }
}
