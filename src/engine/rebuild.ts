/**
 * The bookkeeping of one rebuild: which range is being copied right now, and which client
 * writes are in flight, so that copying a region and a client write to the same blocks never
 * interleave. Copying a region takes several round trips (ask the source what it holds, read
 * the data extents, write them, zero on the target what the source reads as zeros); a client
 * write landing between them would be overwritten on the target with what the copy saw before
 * it, and the replicas would differ (test/engine/rebuild.test.ts provokes exactly this).
 *
 *   copy of [a, b):  claim(a, b) — new overlapping writes wait — wait for overlapping writes in
 *                    flight — read source — write target — release() — the waiting writes go.
 *
 * Writes that do not overlap the claimed range never wait. Only one range is claimed at a time.
 */
import { assert } from '../errors.ts';
import type { RebuildProgress } from './engine.ts';

interface InFlightWrite {
  start: number;
  end: number;
}

export class Rebuild<Target> {
  readonly target: Target;
  readonly progress: RebuildProgress;
  /** Set when the rebuild must stop (target failed or removed, engine closing). */
  cancelled: string | null = null;
  private claimStart = -1;
  private claimEnd = -1;
  private readonly writes = new Map<number, InFlightWrite>();
  private nextToken = 1;
  private waiting: (() => void)[] = [];
  private claimWaiter: (() => void) | null = null;

  constructor(target: Target, progress: RebuildProgress) {
    this.target = target;
    this.progress = progress;
  }

  private overlapsClaim(start: number, end: number): boolean {
    return this.claimStart >= 0 && start < this.claimEnd && this.claimStart < end;
  }

  /** Runs `fn` now, or once the range being copied no longer overlaps [offset, offset+length). */
  whenRangeFree(offset: number, length: number, fn: () => void): void {
    if (!this.overlapsClaim(offset, offset + length)) return fn();
    this.waiting.push(fn);
  }

  writeStarted(offset: number, length: number): number {
    const token = this.nextToken++;
    this.writes.set(token, { start: offset, end: offset + length });
    return token;
  }

  writeDone(token: number): void {
    const w = this.writes.get(token);
    assert(w !== undefined, 'rebuild: a write finished twice');
    this.writes.delete(token);
    if (this.claimWaiter !== null && this.overlapsClaim(w.start, w.end) && !this.anyWriteOverlapsClaim()) {
      const wake = this.claimWaiter;
      this.claimWaiter = null;
      wake();
    }
  }

  private anyWriteOverlapsClaim(): boolean {
    for (const w of this.writes.values()) if (this.overlapsClaim(w.start, w.end)) return true;
    return false;
  }

  /** Claims [start, end) for a copy; resolves once no client write to it is in flight. */
  claim(start: number, end: number): Promise<void> {
    assert(this.claimStart < 0, 'rebuild: one claimed range at a time');
    assert(start >= 0 && end > start, 'rebuild: claimed range');
    this.claimStart = start;
    this.claimEnd = end;
    if (!this.anyWriteOverlapsClaim()) return Promise.resolve();
    return new Promise((resolve) => {
      this.claimWaiter = resolve;
    });
  }

  /** Ends the claim; the writes that waited for it go, in the order they arrived. */
  release(): void {
    this.claimStart = -1;
    this.claimEnd = -1;
    this.claimWaiter = null;
    const waiting = this.waiting;
    this.waiting = [];
    for (const fn of waiting) fn();
  }
}
