/**
 * Ordered range lock over block numbers. A request waits for every earlier request whose
 * range overlaps its own (reads do not wait for reads), so overlapping writes apply in arrival
 * order while disjoint ones run in parallel. Arrival order is the order of `acquire` calls.
 */
import { assert } from '../errors.ts';

export class RangeLockEntry {
  readonly start: number;
  readonly end: number;
  readonly shared: boolean;
  pending = 0;
  waiters: RangeLockEntry[] = [];
  onGranted: ((entry: RangeLockEntry) => void) | null;
  released = false;
  constructor(start: number, end: number, shared: boolean, onGranted: (entry: RangeLockEntry) => void) {
    this.start = start;
    this.end = end;
    this.shared = shared;
    this.onGranted = onGranted;
  }
}

export class RangeLock {
  private readonly held = new Set<RangeLockEntry>();

  get size(): number {
    return this.held.size;
  }

  /** Blocks [start, end). `onGranted` runs (maybe synchronously) once earlier overlapping entries are released. */
  acquire(start: number, end: number, shared: boolean, onGranted: (entry: RangeLockEntry) => void): RangeLockEntry {
    assert(start < end, `lock range ${start}..${end}`);
    const entry = new RangeLockEntry(start, end, shared, onGranted);
    for (const other of this.held) {
      if (other.start < end && start < other.end && !(shared && other.shared)) {
        entry.pending++;
        other.waiters.push(entry);
      }
    }
    this.held.add(entry);
    if (entry.pending === 0) this.grant(entry);
    return entry;
  }

  acquireAsync(start: number, end: number, shared: boolean): Promise<RangeLockEntry> {
    return new Promise((resolve) => {
      this.acquire(start, end, shared, resolve);
    });
  }

  release(entry: RangeLockEntry): void {
    assert(!entry.released && entry.pending === 0, 'range lock released twice or before grant');
    entry.released = true;
    this.held.delete(entry);
    for (const waiter of entry.waiters) {
      waiter.pending--;
      if (waiter.pending === 0) this.grant(waiter);
    }
    entry.waiters = [];
  }

  private grant(entry: RangeLockEntry): void {
    const fn = entry.onGranted;
    entry.onGranted = null;
    fn?.(entry);
  }
}
