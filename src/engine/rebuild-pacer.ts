/**
 * The rebuild's bandwidth limit. Each region's copy runs through `paced`: what it wrote to the
 * target is charged when it ends, and it keeps its place until the rebuild is back under the
 * limit. With a limit, fewer regions are copied at once (enough for a quarter of a second at the
 * limit, at least one), so that the rebuild never runs ahead of the limit by more than that.
 * Time a rebuild spent idle or slower than the limit is not banked: after a pause it goes on at
 * the limit, not in a burst. 0 bytes per second: no limit (the default); the copies then run as
 * the caller starts them.
 */
import { ZebuError, ErrorCode } from '../errors.ts';

/** How far (in time at the limit) the copies in flight may run ahead of the limit. */
const AHEAD_MS = 250;

export class RebuildPacer {
  private bytesPerSecond = 0;
  /** When (nowMs) the bytes charged so far are paid for at the limit. */
  private paidUntilMs = 0;
  private inFlight = 0;
  private waiting: (() => void)[] = [];
  private readonly nowMs: () => number;
  private readonly sleep: (ms: number) => Promise<void>;
  private readonly regionBytes: number;

  constructor(bytesPerSecond: number, regionBytes: number, nowMs: () => number, sleep: (ms: number) => Promise<void>) {
    this.regionBytes = regionBytes;
    this.nowMs = nowMs;
    this.sleep = sleep;
    this.setLimit(bytesPerSecond);
  }

  get limit(): number {
    return this.bytesPerSecond;
  }

  /** A new limit applies from the next region on (a rebuild under way slows down or speeds up). */
  setLimit(bytesPerSecond: number): void {
    if (!Number.isSafeInteger(bytesPerSecond) || bytesPerSecond < 0) {
      throw new ZebuError(ErrorCode.EINVAL, `a rebuild's bandwidth limit must be a whole number of bytes per second >= 0, got ${bytesPerSecond}`);
    }
    this.bytesPerSecond = bytesPerSecond;
    // What was charged at the old limit is not repriced; lifted, nothing waits for it.
    if (bytesPerSecond === 0) this.paidUntilMs = 0;
    this.wake();
  }

  /** Runs one region's copy (it resolves with the bytes it wrote to the target) under the limit. */
  async paced(copy: () => Promise<number>): Promise<number> {
    if (this.bytesPerSecond === 0) return copy();
    while (this.bytesPerSecond !== 0 && this.inFlight >= this.slots()) await new Promise<void>((resolve) => this.waiting.push(resolve));
    this.inFlight++;
    const startedMs = this.nowMs();
    try {
      const written = await copy();
      const wait = this.charge(written, startedMs);
      if (wait > 0) await this.sleep(wait);
      return written;
    } finally {
      this.inFlight--;
      this.wake();
    }
  }

  /** Regions copied at once under the limit. */
  private slots(): number {
    return Math.max(1, Math.floor((this.bytesPerSecond * AHEAD_MS) / 1000 / this.regionBytes));
  }

  /** Charges `bytes` of a copy started at `startedMs`; returns how long (ms) to wait until they are paid for. */
  private charge(bytes: number, startedMs: number): number {
    if (this.bytesPerSecond === 0 || bytes <= 0) return 0;
    const now = this.nowMs();
    // Paid from when the copy began at the latest: its own time counts, a pause before it does not.
    this.paidUntilMs = Math.max(this.paidUntilMs, startedMs) + (bytes * 1000) / this.bytesPerSecond;
    const wait = this.paidUntilMs - now;
    return wait >= 1 ? Math.ceil(wait) : 0;
  }

  private wake(): void {
    const waiting = this.waiting;
    this.waiting = [];
    for (const resolve of waiting) resolve();
  }
}
