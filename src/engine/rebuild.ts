/**
 * Range claims: which ranges are being copied or compared right now, and which client writes are
 * in flight, so that copying (or hashing) a region and a client write to the same blocks never
 * interleave. Copying a region takes several round trips (ask the source what it holds, read
 * the data extents, write them, zero on the target what the source reads as zeros); a client
 * write landing between them would be overwritten on the target with what the copy saw before
 * it, and the replicas would differ (test/engine/rebuild.test.ts provokes exactly this). A verify
 * hashes a region on every replica: a write landing between two of the hashes would look like a
 * difference.
 *
 *   copy of [a, b):  claim(a, b) — new overlapping writes wait — wait for overlapping writes in
 *                    flight — read source — write target — release() — the waiting writes go.
 *
 * Writes that do not overlap a claimed range never wait. Claims never overlap each other: a
 * claim overlapping another one (a rebuild and a verify at once) waits for it.
 */
import { assert } from '../errors.ts';

interface InFlightWrite {
  start: number;
  end: number;
}

interface Claim {
  start: number;
  end: number;
  /** Wakes the claimer once no write overlapping the claim is in flight. */
  waiter: (() => void) | null;
  id: number;
  /** A lease (a rebuild's copy): a write that waits for it recalls it, once. Null: a plain claim. */
  onRecall: ((id: number) => void) | null;
  recalled: boolean;
}

/** How far a rebuild got (the engine shows it per replica). */
export interface RebuildProgress {
  copiedBytes: number;
  totalBytes: number;
  /** Only the regions it missed are copied (it was in the volume before). */
  delta: boolean;
}

/**
 * Claims on ranges, and the client writes in flight. A claim is granted once no other claim and
 * no client write in flight overlaps it; while it is held, overlapping client writes wait. A
 * *lease* is a claim that gives way: the first write that waits for it recalls it (onRecall),
 * and its holder releases it soon (or the engine revokes it). When a claim ends, the writes that
 * waited for it go before any claim that asked meanwhile, so a lease taken again at once cannot
 * starve them.
 */
export class RangeClaims {
  private readonly claims = new Map<number, Claim>();
  private readonly writes = new Map<number, InFlightWrite>();
  private nextToken: number;
  private waiting: { start: number; end: number; fn: () => void }[] = [];
  /** Claims waiting for an overlapping claim (or waiting write) to end, in arrival order. */
  private waitingClaims: { start: number; end: number; grant: () => void }[] = [];

  /**
   * `firstId`: where ids start. Lease ids go to the target replica, which keeps the revoked ones
   * for the whole epoch: an engine that uses claims again must not hand out an id again.
   */
  constructor(firstId = 1) {
    assert(Number.isSafeInteger(firstId) && firstId >= 1, 'range claims: first id');
    this.nextToken = firstId;
  }

  /** The next id this object would hand out. */
  get nextId(): number {
    return this.nextToken;
  }

  private overlappingClaims(start: number, end: number): Claim[] {
    const out: Claim[] = [];
    for (const c of this.claims.values()) if (start < c.end && c.start < end) out.push(c);
    return out;
  }

  /** Runs `fn` now, or once no range being claimed overlaps [offset, offset+length); recalls the leases in its way. */
  whenRangeFree(offset: number, length: number, fn: () => void): void {
    const end = offset + length;
    const blocking = this.overlappingClaims(offset, end);
    // Behind an earlier waiting write to the same blocks too: overlapping writes keep their order.
    if (blocking.length === 0 && !this.waiting.some((w) => offset < w.end && w.start < end)) return fn();
    this.waiting.push({ start: offset, end, fn });
    for (const c of blocking) this.recall(c);
  }

  private recall(c: Claim): void {
    if (c.onRecall === null || c.recalled) return;
    c.recalled = true;
    const notify = c.onRecall;
    const id = c.id;
    queueMicrotask(() => notify(id));
  }

  /** Whether lease `id` was recalled (false once it ended). */
  recalled(id: number): boolean {
    return this.claims.get(id)?.recalled === true;
  }

  /** Whether claim `id` is still held (a revoked lease is not). */
  holds(id: number): boolean {
    return this.claims.has(id);
  }

  /** The leases held now (a rebuild's copies), for the engine's INFO. */
  leases(): { id: number; start: number; end: number; recalled: boolean }[] {
    const out: { id: number; start: number; end: number; recalled: boolean }[] = [];
    for (const c of this.claims.values()) if (c.onRecall !== null) out.push({ id: c.id, start: c.start, end: c.end, recalled: c.recalled });
    return out;
  }

  /** An id from the same counter that names no claim (never granted, never revoked). */
  takeId(): number {
    return this.nextToken++;
  }

  writeStarted(offset: number, length: number): number {
    const token = this.nextToken++;
    this.writes.set(token, { start: offset, end: offset + length });
    return token;
  }

  writeDone(token: number): void {
    const w = this.writes.get(token);
    assert(w !== undefined, 'range claims: a write finished twice');
    this.writes.delete(token);
    for (const c of this.claims.values()) {
      if (c.waiter !== null && w.start < c.end && c.start < w.end && !this.anyWriteOverlaps(c.start, c.end)) {
        const wake = c.waiter;
        c.waiter = null;
        wake();
      }
    }
  }

  private wake(claim: Claim): void {
    if (claim.waiter === null) return;
    const wake = claim.waiter;
    claim.waiter = null;
    wake();
  }

  private anyWriteOverlaps(start: number, end: number): boolean {
    for (const w of this.writes.values()) if (w.start < end && start < w.end) return true;
    return false;
  }

  /**
   * Claims [start, end); resolves with its id once no other claim and no client write overlaps
   * it. With `onRecall`, a lease: called (once) when a client write waits for it.
   */
  claim(start: number, end: number, onRecall: ((id: number) => void) | null = null): Promise<number> {
    assert(start >= 0 && end > start, 'range claims: claimed range');
    if (this.overlappingClaims(start, end).length > 0 || this.waitingClaims.some((w) => start < w.end && w.start < end)
      || this.waiting.some((w) => start < w.end && w.start < end)) {
      return new Promise((resolve) => {
        this.waitingClaims.push({ start, end, grant: () => void this.claim(start, end, onRecall).then(resolve) });
      });
    }
    const id = this.nextToken++;
    const claim: Claim = { id, start, end, waiter: null, onRecall, recalled: false };
    this.claims.set(id, claim);
    if (!this.anyWriteOverlaps(start, end)) return Promise.resolve(id);
    return new Promise((resolve) => {
      claim.waiter = () => resolve(id);
    });
  }

  /** Ends a claim (again: nothing); the writes that waited for it go first, then waiting claims, in arrival order. */
  release(id: number): void {
    const claim = this.claims.get(id);
    if (claim === undefined) return;
    this.claims.delete(id);
    // Revoked before its holder got it (it waited for writes in flight): the holder gets it
    // already ended, and finds so (holds() is false; the target refuses its writes).
    this.wake(claim);
    const waiting = this.waiting;
    this.waiting = [];
    for (const w of waiting) this.whenRangeFree(w.start, w.end - w.start, w.fn);
    const waitingClaims = this.waitingClaims;
    this.waitingClaims = [];
    for (const w of waitingClaims) w.grant();
  }

  /** Ends every claim (nobody claims any more): nothing waits any more. */
  releaseAll(): void {
    for (const claim of this.claims.values()) this.wake(claim);
    this.claims.clear();
    const waiting = this.waiting;
    this.waiting = [];
    for (const w of waiting) w.fn();
    const waitingClaims = this.waitingClaims;
    this.waitingClaims = [];
    for (const w of waitingClaims) w.grant();
  }
}

/** The state of one rebuild: its target, its progress, and whether it must stop. */
export class Rebuild<Target> {
  readonly target: Target;
  readonly progress: RebuildProgress;
  /** Set when the rebuild must stop (target failed or removed, engine closing). */
  cancelled: string | null = null;

  constructor(target: Target, progress: RebuildProgress) {
    this.target = target;
    this.progress = progress;
  }
}
