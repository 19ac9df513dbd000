/**
 * SHA-256 of backup blocks on a worker thread, so that hashing (about 0.8 s of CPU per GiB on a
 * small machine) runs beside the event loop that reads the blocks and writes them out, instead of
 * holding it: on the loop, no socket was read while a 2 MiB block was hashed.
 *
 * A block is copied into one of a few slots of shared memory (a memcpy, tens of times cheaper than
 * the hash; the slots are reused, so their pages are touched once) and the worker hashes it there.
 * WebCrypto's digest would also run off the loop, but copies every block into fresh memory, which
 * costs more than the hash on a machine whose freed pages fault on first touch.
 *
 * If the worker cannot start or dies, hashing goes on, on the loop: a backup never fails for it.
 */
import { Worker } from 'node:worker_threads';
import { assert } from '../errors.ts';
import { sha256 } from './format.ts';

// CommonJS, evaluated: no file to find next to this module (sources or compiled build alike).
const WORKER_SOURCE = `
const { parentPort, workerData } = require('node:worker_threads');
const crypto = require('node:crypto');
const shared = workerData.shared;
parentPort.on('message', (m) => {
  const view = Buffer.from(shared, m.offset, m.length);
  parentPort.postMessage({ id: m.id, hash: crypto.createHash('sha256').update(view).digest('hex') });
});
`;

interface Waiting {
  slot: number;
  resolve: (hash: string) => void;
}

export class BlockHasher {
  private readonly slotBytes: number;
  private readonly shared: SharedArrayBuffer;
  private readonly free: number[] = [];
  /** Callers waiting for a free slot. */
  private readonly queue: (() => void)[] = [];
  private readonly pending = new Map<number, Waiting>();
  private worker: Worker | null;
  private nextId = 1;

  constructor(slots: number, slotBytes: number) {
    assert(slots >= 1 && slotBytes >= 1, 'block hasher slots');
    this.slotBytes = slotBytes;
    this.shared = new SharedArrayBuffer(slots * slotBytes);
    for (let i = 0; i < slots; i++) this.free.push(i);
    let worker: Worker | null = null;
    try {
      worker = new Worker(WORKER_SOURCE, { eval: true, workerData: { shared: this.shared } });
      worker.on('message', (m: { id: number; hash: string }) => this.done(m.id, m.hash));
      worker.on('error', () => this.lose());
      worker.on('exit', () => this.lose());
      worker.unref();
    } catch {
      worker = null;
    }
    this.worker = worker;
  }

  /** Whether blocks are hashed on the worker (false: on the caller's thread). */
  get offThread(): boolean {
    return this.worker !== null;
  }

  /** SHA-256 of `data` in hex; `data` may be reused once this resolves. */
  async hash(data: Buffer): Promise<string> {
    if (this.worker === null || data.length > this.slotBytes) return sha256(data);
    while (this.free.length === 0) {
      await new Promise<void>((resolve) => this.queue.push(resolve));
      if (this.worker === null) return sha256(data);
    }
    const slot = this.free.pop()!;
    const offset = slot * this.slotBytes;
    Buffer.from(this.shared, offset, data.length).set(data);
    const id = this.nextId++;
    return new Promise<string>((resolve) => {
      this.pending.set(id, { slot, resolve });
      this.worker!.postMessage({ id, offset, length: data.length });
    }).then((hash) => (hash !== '' ? hash : sha256(data)));
  }

  /** Stops the worker; blocks still being hashed are hashed on this thread. */
  async close(): Promise<void> {
    const worker = this.worker;
    this.lose();
    await worker?.terminate();
  }

  private done(id: number, hash: string): void {
    const waiting = this.pending.get(id);
    if (waiting === undefined) return;
    this.pending.delete(id);
    this.release(waiting.slot);
    waiting.resolve(hash);
  }

  private release(slot: number): void {
    this.free.push(slot);
    this.queue.shift()?.();
  }

  /** The worker is gone: whatever it held is hashed here ('' tells the caller to). */
  private lose(): void {
    if (this.worker === null) return;
    this.worker = null;
    for (const [id, waiting] of this.pending) {
      this.pending.delete(id);
      this.release(waiting.slot);
      waiting.resolve('');
    }
    while (this.queue.length > 0) this.queue.shift()!();
  }
}
