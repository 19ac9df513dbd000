/**
 * Large I/O buffers (READ replies, received READ data), kept for reuse. A new multi-megabyte
 * buffer is fresh memory from the kernel: every 4 KiB page of it faults in on first touch, which
 * costs more than the copy that fills it (measured: a socket read into fresh 2 MiB buffers runs
 * at a third of the speed of one into reused ones).
 *
 * Buffers are kept by exact size (the data path moves the same few sizes again and again), up to
 * a total; beyond it a released buffer is left to the garbage collector. Releasing is optional:
 * a buffer never released is simply collected, and a buffer the pool did not hand out is ignored
 * (paths that carry pooled and other buffers alike release them all). A buffer must not be used
 * after its release; a second release while the pool keeps it is a bug that fails loudly.
 */
import { assert } from '../errors.ts';

/** Smaller buffers come from Node's own pool or are cheap: not kept. */
export const POOLED_MIN_BYTES = 64 * 1024;

export class BufferPool {
  private readonly capBytes: number;
  private readonly free = new Map<number, Buffer[]>();
  private freeBytes = 0;
  /** Handed out and not released (weakly: an unreleased buffer is still collected). */
  private readonly out = new WeakSet<Buffer>();
  /** In the free lists. */
  private readonly kept = new WeakSet<Buffer>();

  constructor(capBytes: number) {
    this.capBytes = capBytes;
  }

  /** A buffer of exactly `length` bytes, with undefined content. */
  acquire(length: number): Buffer {
    if (length < POOLED_MIN_BYTES) return Buffer.allocUnsafe(length);
    const list = this.free.get(length);
    let buf: Buffer;
    if (list !== undefined) {
      buf = list.pop()!;
      this.kept.delete(buf);
      this.freeBytes -= length;
      if (list.length === 0) this.free.delete(length);
    } else {
      buf = Buffer.allocUnsafeSlow(length);
    }
    this.out.add(buf);
    return buf;
  }

  /** Whether `buf` was handed out by acquire() and not released yet. */
  lends(buf: Buffer): boolean {
    return this.out.has(buf);
  }

  /** Gives a buffer from acquire() back; the caller must not touch it afterwards. */
  release(buf: Buffer): void {
    if (!this.out.has(buf)) {
      assert(!this.kept.has(buf), 'a buffer was released twice');
      return;
    }
    this.out.delete(buf);
    if (buf.length > this.capBytes) return;
    // Room is made by dropping kept buffers of the sizes kept longest (sizes no longer in use).
    while (this.freeBytes + buf.length > this.capBytes) {
      const [size, list] = this.free.entries().next().value!;
      this.kept.delete(list.pop()!);
      this.freeBytes -= size;
      if (list.length === 0) this.free.delete(size);
    }
    let list = this.free.get(buf.length);
    if (list === undefined) {
      list = [];
      this.free.set(buf.length, list);
    }
    list.push(buf);
    this.kept.add(buf);
    this.freeBytes += buf.length;
  }

  /**
   * Lets every kept buffer go (the garbage collector frees it); buffers handed out are not
   * touched and may still be released afterwards. For a process giving its memory back after a
   * load: a kept buffer is as large as the largest requests of that load (32 MiB for QEMU's).
   */
  clear(): void {
    for (const list of this.free.values()) for (const buf of list) this.kept.delete(buf);
    this.free.clear();
    this.freeBytes = 0;
  }

  /** Bytes kept for reuse (tests). */
  get keptBytes(): number {
    return this.freeBytes;
  }
}

/** The process's pool for data-path buffers (the server's READ replies, the client's READ data). */
export const ioBuffers = new BufferPool(64 * 1024 * 1024);

/**
 * A buffer lent from a pool whose holders may let go in any order: the request that owns it
 * (until its answer) and every connection it was sent on (until client.send's payloadDone). The
 * last to let go gives it back; one that never does only costs the reuse.
 */
export class LentBuffer {
  private holders = 1; // the owner, until letGo()
  private readonly pool: BufferPool;
  private readonly buf: Buffer;

  constructor(pool: BufferPool, buf: Buffer) {
    this.pool = pool;
    this.buf = buf;
  }

  /** Counts one more holder; the callback returned is its letting go (call it once). */
  hold(): () => void {
    assert(this.holders > 0, 'a lent buffer was held after its release');
    this.holders++;
    return () => this.letGo();
  }

  letGo(): void {
    this.holders--;
    assert(this.holders >= 0, 'a lent buffer was let go more often than it was held');
    if (this.holders === 0) this.pool.release(this.buf);
  }
}
