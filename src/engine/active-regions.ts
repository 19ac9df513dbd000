/**
 * Flush numbering and the engine's count of active regions: pure state, no I/O, no clock (the
 * caller passes the time).
 *
 * The replicas' write-intent logs keep the regions written since their confirming flush; after a
 * crash those regions are compared and copied (recovery). The engine bounds how many there are
 * (maxActiveRegions) so that a start-up never resyncs more than that: it counts them by the same
 * rule as the logs (regionMayLeave), with conservative targets — a region's target here is the
 * flush sent after its last write completed as the engine heard of it, never earlier than the
 * replica's own. So the engine never lets a region go that a replica still keeps.
 *
 * Flushes are numbered from 1; `confirmed` is the highest number below which every flush has
 * completed on every replica. It only ever grows.
 */
import { assert } from '../errors.ts';
import { regionMayLeave } from '../replica/intent-log.ts';

/** The engine's flush numbers: the last one sent, and the last one confirmed (all up to it done). */
export class FlushSequence {
  /** The last number sent. */
  sent = 0;
  /** Every flush <= confirmed completed everywhere. */
  confirmed = 0;
  /** Flushes completed out of order, above `confirmed`. */
  private readonly doneAhead = new Set<number>();

  /** The number of a new flush; `confirmed` as it goes out with it. */
  next(): number {
    return ++this.sent;
  }

  /** Flush `seq` completed on every replica of the write set. */
  completed(seq: number): void {
    assert(seq >= 1 && seq <= this.sent, `flush ${seq} completed, but ${this.sent} were sent`);
    assert(seq > this.confirmed && !this.doneAhead.has(seq), `flush ${seq} completed twice`);
    if (seq !== this.confirmed + 1) {
      this.doneAhead.add(seq);
      return;
    }
    this.confirmed = seq;
    while (this.doneAhead.delete(this.confirmed + 1)) this.confirmed++;
    assert(this.confirmed <= this.sent, 'confirmed flush numbers never pass the sent ones');
  }
}

/** The regions written since their confirming flush, as the replicas count them, to bound them. */
export class ActiveRegions {
  readonly regionBytes: number;
  readonly maxActive: number;
  private active = new Uint8Array(0);
  private writes = new Uint32Array(0);
  /** Flush number sent last when the region's latest write completed. */
  private stamp = new Float64Array(0);
  /** When the region's latest write completed (the idle rule). */
  private doneAt = new Float64Array(0);
  private readonly members = new Set<number>();

  constructor(regionBytes: number, maxActive: number, sizeBytes: number) {
    assert(Number.isInteger(regionBytes) && regionBytes > 0, 'region size');
    assert(Number.isInteger(maxActive) && maxActive >= 1, 'active-region bound');
    this.regionBytes = regionBytes;
    this.maxActive = maxActive;
    this.resize(sizeBytes);
  }

  get size(): number {
    return this.members.size;
  }

  get regionCount(): number {
    return this.active.length;
  }

  /** The tables follow the volume's size (an online expansion); nothing active is lost. */
  resize(sizeBytes: number): void {
    const count = Math.ceil(sizeBytes / this.regionBytes);
    if (count === this.active.length) return;
    assert(count > this.active.length || [...this.members].every((region) => region < count), 'active regions outside a shrunk volume');
    const active = new Uint8Array(count);
    const writes = new Uint32Array(count);
    const stamp = new Float64Array(count);
    const doneAt = new Float64Array(count);
    active.set(this.active.subarray(0, count));
    writes.set(this.writes.subarray(0, count));
    stamp.set(this.stamp.subarray(0, count));
    doneAt.set(this.doneAt.subarray(0, count));
    this.active = active;
    this.writes = writes;
    this.stamp = stamp;
    this.doneAt = doneAt;
  }

  /** A region the replicas hold active with a stamp (start-up: the resynced ones, stamp 0). */
  markActive(region: number, stamp: number): void {
    if (region >= this.active.length) return;
    if (this.active[region] === 0) {
      this.active[region] = 1;
      this.members.add(region);
    }
    this.stamp[region] = Math.max(this.stamp[region], stamp);
  }

  /** Whether a write to these bytes may go now without passing the bound. */
  fits(offset: number, length: number): boolean {
    if (length === 0 || this.members.size === 0) return true;
    // Per write: plain arithmetic, no objects.
    const first = Math.floor(offset / this.regionBytes);
    const last = Math.floor((offset + length - 1) / this.regionBytes);
    let fresh = 0;
    for (let region = first; region <= last; region++) if (this.active[region] === 0) fresh++;
    return fresh === 0 || this.members.size + fresh <= this.maxActive;
  }

  /** A write to these bytes was sent. */
  started(offset: number, length: number): void {
    const first = Math.floor(offset / this.regionBytes);
    const last = Math.floor((offset + length - 1) / this.regionBytes);
    assert(last < this.active.length, `write ${offset}+${length} outside the region table`);
    for (let region = first; region <= last; region++) {
      if (this.active[region] === 0) {
        this.active[region] = 1;
        this.members.add(region);
      }
      this.writes[region]++;
    }
  }

  /** A write sent with started() completed (or failed) everywhere; `lastSent`: the last flush number sent. */
  written(offset: number, length: number, lastSent: number, nowMs: number): void {
    const first = Math.floor(offset / this.regionBytes);
    const last = Math.floor((offset + length - 1) / this.regionBytes);
    for (let region = first; region <= last; region++) {
      assert(this.writes[region] > 0 && this.active[region] === 1, `region ${region} written without being started`);
      this.writes[region]--;
      this.stamp[region] = lastSent;
      this.doneAt[region] = nowMs;
    }
  }

  /**
   * At the sending of a flush carrying `confirmed`: the regions the replicas let go with it leave
   * here too. The replicas finish their writes before the engine hears of them, so they never
   * keep a region the engine let go.
   */
  prune(confirmed: number, idleBeforeMs: number): void {
    for (const region of this.members) {
      if (regionMayLeave(this.writes[region], this.stamp[region] + 1, confirmed, this.doneAt[region], idleBeforeMs)) {
        this.active[region] = 0;
        this.members.delete(region);
      }
    }
  }
}
