/**
 * The write-intent (activity) log of one replica (docs/crash-consistency.md).
 *
 * The volume is cut in regions of INTENT_REGION_BYTES. A region is *active* from before the
 * first write to it until a flush that covers its last write has completed on every replica.
 * After an unclean stop, the union of all replicas' active regions is where they may differ.
 *
 * Persistence: two slot files (intent.0, intent.1) written alternately, each one checksummed
 * record {seq, regionBytes, active, missed}; the newest intact one wins, a torn one is ignored.
 * Invariant: the persisted active set is always a superset of the in-memory one. So:
 * - a region that is not in the persisted set is added and a record made durable BEFORE the
 *   data write (concurrent activations share one record write);
 * - a region leaves in memory at once, on disk lazily (with the next record).
 * While a record is being written, "persisted" is taken as old ∩ new (the disk holds either).
 *
 * Leaving: the engine numbers its FLUSHes (seq >= 1) and sends with each one `confirmed`: every
 * FLUSH <= confirmed completed on every replica. A region's *target* is the seq of the first
 * numbered FLUSH that arrived after its last write completed (that flush covers the write here);
 * it leaves at the arrival of a FLUSH with confirmed >= target, when no write to it is in flight
 * and it is not pinned. (Targets rather than "highest seq so far + 1": the same rule for a new
 * engine numbering from 1, and still safe if an engine re-OPENs without renumbering.)
 *
 * Missed-write maps (key = a missing replica): every region that becomes persisted-active while
 * a map exists is added to it in the same record, so a map always covers the persisted set.
 * A layer-tree change (snapshot create, delete, revert) makes every map *invalid* rather than
 * removing it: "no map" means the replica never left, "invalid map" means it left and no delta
 * can bring it back (after a revert its chain may still look the same).
 * A region of a map may be *partly copied*: a rebuild copied its first `upTo` bytes to the
 * replica (durably) and the rest is still to copy. The note holds only while no write to the
 * region may have been missed: a region that becomes active here, or is merged into the map,
 * is whole again (missedClear says why that is enough).
 */
import path from 'node:path';
import { crc32 } from 'node:zlib';
import { ZebuError, ErrorCode, toZebuError } from '../errors.ts';
import type { Disk, DiskFile } from './disk.ts';
import { systemClock, type Clock, type ClockTimer } from '../os/clock.ts';

/** What INTENT_GET reports of a replica's log. */
export interface IntentSummary {
  regionBytes: number;
  /** In-memory active regions (pinned ones included), ascending. */
  active: number[];
  pinned: number[];
  /** Missed-write map key -> number of regions. */
  missed: Record<string, number>;
  /** Keys whose maps a snapshot create/delete/revert invalidated: those replicas need a full rebuild. */
  invalidMissed: string[];
}

export const INTENT_REGION_BYTES = 4 * 1024 * 1024;
/**
 * A confirmed region leaves only after this long without a write (or at once on an EVICT flush):
 * a hot region would otherwise leave and be activated again (a durable record) at every flush.
 * The engine applies the same rule to count active regions against its bound, so both read it
 * from here; ZEBU_INTENT_IDLE_MS overrides it (tests that watch regions leave set it to 0).
 */
export const INTENT_IDLE_MS = idleMsFromEnv(process.env.ZEBU_INTENT_IDLE_MS, 2000);

/**
 * The one rule by which a region leaves the write-intent set, here and in the engine's count of
 * active regions: no write to it in flight, a flush numbered `target` or later confirmed (target
 * 0: no flush has covered its last write yet), and idle since `idleBeforeMs` (Infinity: evict).
 */
export function regionMayLeave(writesInFlight: number, target: number, confirmed: number, doneAtMs: number, idleBeforeMs: number): boolean {
  return writesInFlight === 0 && target !== 0 && confirmed >= target && doneAtMs <= idleBeforeMs;
}

/** The idle cut-off of regionMayLeave at `nowMs`: everything with `evict`. */
export function leaveIdleBefore(nowMs: number, idleMs: number, evict: boolean): number {
  return evict ? Infinity : nowMs - idleMs;
}

function idleMsFromEnv(raw: string | undefined, fallback: number): number {
  if (raw === undefined || raw === '') return fallback;
  const value = Number(raw);
  if (!Number.isSafeInteger(value) || value < 0) throw new Error(`ZEBU_INTENT_IDLE_MS must be a whole number of milliseconds, got ${JSON.stringify(raw)}`);
  return value;
}
export const INTENT_SLOTS = ['intent.0', 'intent.1'] as const;

const MAGIC = 0x5a494e54; // "ZINT"
const HEADER_BYTES = 24;
/** Region leaves are written to disk at most this often when nothing else writes a record. */
const LAZY_WRITE_MS = 100;

/** [first region, count] runs, ascending. */
type Runs = [number, number][];

export interface IntentRecord {
  seq: number;
  regionBytes: number;
  active: number[];
  missed: Map<string, number[]>;
  /** Per map, regions of it copied in part: region -> bytes copied from its start (0 < upTo < regionBytes). */
  partial: Map<string, Map<number, number>>;
  /** Keys whose maps a layer-tree change invalidated. */
  invalid: string[];
}

interface RegionState {
  /** Writes/zeroes to the region that have entered and not yet completed. */
  inflight: number;
  /** A write to it failed: it stays active until the next OPEN. */
  pinned: boolean;
  /** Seq of the first numbered FLUSH that arrived after the last write completed; 0: none yet. */
  target: number;
  /** `target` is taken from the numbered FLUSH whose arrival count reaches this. */
  needArrival: number;
  /** this.clock.nowMs() when its last write completed. */
  doneAt: number;
}

interface Waiter {
  resolve: () => void;
  reject: (err: unknown) => void;
}

function toRuns(sorted: number[]): Runs {
  const runs: Runs = [];
  for (const r of sorted) {
    const last = runs[runs.length - 1];
    if (last !== undefined && last[0] + last[1] === r) last[1]++;
    else runs.push([r, 1]);
  }
  return runs;
}

function fromRuns(runs: Runs, regionBytes: number): number[] {
  const out: number[] = [];
  for (const [start, count] of runs) {
    if (regionBytes === INTENT_REGION_BYTES) {
      for (let i = 0; i < count; i++) out.push(start + i);
    } else {
      // A record written with another region size: cover the same bytes with our regions.
      const first = Math.floor((start * regionBytes) / INTENT_REGION_BYTES);
      const end = Math.ceil(((start + count) * regionBytes) / INTENT_REGION_BYTES);
      for (let r = first; r < end; r++) out.push(r);
    }
  }
  return [...new Set(out)].sort((a, b) => a - b);
}

function sorted(set: Iterable<number>): number[] {
  return [...set].sort((a, b) => a - b);
}

export function encodeIntentRecord(record: IntentRecord): Buffer {
  const missed: Record<string, Runs> = {};
  for (const [key, regions] of record.missed) missed[key] = toRuns(regions);
  const partial: Record<string, [number, number][]> = {};
  for (const [key, notes] of record.partial) if (notes.size > 0) partial[key] = [...notes].sort((a, b) => a[0] - b[0]);
  const body = Buffer.from(JSON.stringify({ regionBytes: record.regionBytes, active: toRuns(record.active), missed, invalid: record.invalid, partial }));
  const buf = Buffer.allocUnsafe(HEADER_BYTES + body.length);
  buf.writeUInt32BE(MAGIC, 0);
  buf.writeUInt32BE(Math.floor(record.seq / 2 ** 32), 4);
  buf.writeUInt32BE(record.seq >>> 0, 8);
  buf.writeUInt32BE(body.length, 12);
  buf.writeUInt32BE(crc32(body), 16);
  buf.writeUInt32BE(crc32(buf.subarray(0, 20)), 20);
  body.copy(buf, HEADER_BYTES);
  return buf;
}

/** Decodes a slot file; null when empty, torn or corrupt. */
export function decodeIntentRecord(buf: Buffer): IntentRecord | null {
  if (buf.length < HEADER_BYTES || buf.readUInt32BE(0) !== MAGIC) return null;
  if (crc32(buf.subarray(0, 20)) !== buf.readUInt32BE(20)) return null;
  const bodyBytes = buf.readUInt32BE(12);
  if (buf.length < HEADER_BYTES + bodyBytes) return null;
  const body = buf.subarray(HEADER_BYTES, HEADER_BYTES + bodyBytes);
  if (crc32(body) !== buf.readUInt32BE(16)) return null;
  let parsed: { regionBytes: number; active: Runs; missed: Record<string, Runs>; invalid?: string[]; partial?: Record<string, unknown> };
  try {
    parsed = JSON.parse(body.toString('utf8'));
  } catch {
    return null;
  }
  if (!Number.isSafeInteger(parsed.regionBytes) || parsed.regionBytes <= 0) return null;
  const missed = new Map<string, number[]>();
  for (const [key, runs] of Object.entries(parsed.missed ?? {})) missed.set(key, fromRuns(runs, parsed.regionBytes));
  // Notes of partly copied regions hold only in the region size they were made with; anything
  // malformed is dropped (the region is then copied whole: never less than needed).
  const partial = new Map<string, Map<number, number>>();
  if (parsed.regionBytes === INTENT_REGION_BYTES && typeof parsed.partial === 'object' && parsed.partial !== null) {
    for (const [key, notes] of Object.entries(parsed.partial)) {
      const regions = missed.get(key);
      if (regions === undefined || !Array.isArray(notes)) continue;
      const inMap = new Set(regions);
      const kept = new Map<number, number>();
      for (const note of notes) {
        if (!Array.isArray(note) || note.length !== 2) continue;
        const [region, upTo] = note as unknown[];
        if (typeof region !== 'number' || typeof upTo !== 'number' || !inMap.has(region) || !validUpTo(upTo)) continue;
        kept.set(region, upTo);
      }
      if (kept.size > 0) partial.set(key, kept);
    }
  }
  return {
    seq: buf.readUInt32BE(4) * 2 ** 32 + buf.readUInt32BE(8),
    regionBytes: INTENT_REGION_BYTES,
    active: fromRuns(parsed.active, parsed.regionBytes),
    missed,
    partial,
    invalid: Array.isArray(parsed.invalid) ? parsed.invalid.filter((k) => typeof k === 'string') : [],
  };
}

/** A partly-copied note's offset: whole 4 KiB blocks, inside the region. */
function validUpTo(upTo: number): boolean {
  return Number.isSafeInteger(upTo) && upTo > 0 && upTo < INTENT_REGION_BYTES && upTo % 4096 === 0;
}

export class IntentLog {
  private readonly dir: string;
  private readonly slots: DiskFile[];
  private readonly onFailure: (err: ZebuError) => void;
  private readonly idleMs: number;
  private seq: number;
  /** In-memory active set (regions being activated included: their writes wait). */
  private readonly active = new Map<number, RegionState>();
  /** What the disk is known to hold (old ∩ new while a record is being written). */
  private persisted: Set<number>;
  /** The active set of the record being written, if any. */
  private recordInFlight: Set<number> | null = null;
  private readonly missed = new Map<string, Set<number>>();
  /** Regions of a map copied in part (see the header comment); keys and regions are in `missed`. */
  private readonly partial = new Map<string, Map<number, number>>();
  /** Keys whose maps were invalidated by a layer-tree change (see the header comment). */
  private readonly invalidMissed = new Set<string>();
  /** Numbered FLUSHes arrived since the log was opened. */
  private arrivals = 0;

  private writing = false;
  private kickQueued = false;
  private waiters: Waiter[] = [];
  /** Memory and disk differ (a region left, a map changed): write a record when convenient. */
  private stale = false;
  private lazyTimer: ClockTimer | null = null;
  private readonly clock: Clock;
  private failure: ZebuError | null = null;
  private closed = false;
  /** Records written since open (tests: batching). */
  recordWrites = 0;

  private constructor(dir: string, slots: DiskFile[], record: IntentRecord | null, onFailure: (err: ZebuError) => void, idleMs: number, clock: Clock) {
    this.dir = dir;
    this.clock = clock;
    this.idleMs = idleMs;
    this.slots = slots;
    this.onFailure = onFailure;
    this.seq = record?.seq ?? 0;
    const active = record?.active ?? [];
    this.persisted = new Set(active);
    for (const r of active) this.active.set(r, { inflight: 0, pinned: false, target: 0, needArrival: 1, doneAt: 0 });
    for (const [key, regions] of record?.missed ?? []) this.missed.set(key, new Set(regions));
    for (const [key, notes] of record?.partial ?? []) {
      const kept = new Map([...notes].filter(([r]) => this.missed.get(key)?.has(r) === true && !this.active.has(r)));
      if (kept.size > 0) this.partial.set(key, kept);
    }
    for (const key of record?.invalid ?? []) {
      this.missed.delete(key);
      this.partial.delete(key);
      this.invalidMissed.add(key);
    }
  }

  /**
   * Opens the log of replica directory `dir` (creating empty slot files when missing: a replica
   * of the previous format). `onFailure` is told when a record cannot be written: the replica
   * must then refuse further I/O, as after a failed flush.
   */
  static async open(dir: string, disk: Disk, onFailure: (err: ZebuError) => void, idleMs = INTENT_IDLE_MS, clock: Clock = systemClock): Promise<IntentLog> {
    let best: IntentRecord | null = null;
    let created = false;
    for (const slot of INTENT_SLOTS) {
      const p = path.join(dir, slot);
      if (await disk.exists(p)) {
        const record = decodeIntentRecord(await disk.readFile(p));
        if (record !== null && (best === null || record.seq > best.seq)) best = record;
      } else {
        const file = await disk.open(p, 'create');
        await file.datasync();
        await file.close();
        created = true;
      }
    }
    if (created) await disk.syncDir(dir);
    const slots: DiskFile[] = [];
    try {
      for (const slot of INTENT_SLOTS) slots.push(await disk.open(path.join(dir, slot), 'readwrite'));
    } catch (err) {
      for (const file of slots) await file.close().catch(() => {});
      throw err;
    }
    return new IntentLog(dir, slots, best, onFailure, idleMs, clock);
  }

  // ---- data path ------------------------------------------------------------------------------

  /**
   * A write/zero of [offset, offset+length) starts (length > 0). Returns null when all its
   * regions are already persisted-active (no allocation), else a promise that resolves once they
   * are durably active. The caller must call exit() with the same range in every case.
   */
  enter(offset: number, length: number): Promise<void> | null {
    const first = Math.floor(offset / INTENT_REGION_BYTES);
    const last = Math.floor((offset + length - 1) / INTENT_REGION_BYTES);
    let needRecord = false;
    // A write the copied part of a region may now miss: the whole region is to copy again.
    if (this.partial.size > 0) this.forgetPartial(first, last);
    for (let r = first; r <= last; r++) {
      let state = this.active.get(r);
      if (state === undefined) {
        state = { inflight: 0, pinned: false, target: 0, needArrival: 0, doneAt: 0 };
        this.active.set(r, state);
      }
      state.inflight++;
      if (!this.persisted.has(r)) needRecord = true;
    }
    return needRecord ? this.requestRecord() : null;
  }

  /** The write entered with this range completed (ok) or failed (its regions are pinned). */
  exit(offset: number, length: number, ok: boolean): void {
    const first = Math.floor(offset / INTENT_REGION_BYTES);
    const last = Math.floor((offset + length - 1) / INTENT_REGION_BYTES);
    const now = this.clock.nowMs();
    for (let r = first; r <= last; r++) {
      const state = this.active.get(r)!;
      state.inflight--;
      if (ok) {
        state.target = 0;
        state.needArrival = this.arrivals + 1;
        state.doneAt = now;
      } else {
        state.pinned = true;
      }
    }
  }

  /** At the arrival of a FLUSH (see the header comment), before it runs. */
  flushArrived(seq: number, confirmed: number, evict = false): void {
    if (seq > 0) {
      this.arrivals++;
      for (const state of this.active.values()) {
        if (state.target === 0 && state.needArrival !== 0 && state.needArrival <= this.arrivals) state.target = seq;
      }
    }
    if (confirmed <= 0) return;
    let left = false;
    const idleBefore = leaveIdleBefore(this.clock.nowMs(), this.idleMs, evict);
    for (const [region, state] of this.active) {
      if (!state.pinned && regionMayLeave(state.inflight, state.target, confirmed, state.doneAt, idleBefore)) {
        this.active.delete(region);
        left = true;
      }
    }
    if (left) this.markStale();
  }

  /**
   * A new engine opened the replica: its FLUSH numbers start again, so every region waits for a
   * FLUSH arriving from now on; pinned regions become ordinary active ones.
   */
  engineOpened(): void {
    for (const state of this.active.values()) {
      state.pinned = false;
      state.target = 0;
      state.needArrival = this.arrivals + 1;
    }
  }

  /**
   * Regions an engine found the same on every replica and made durable (its start-up compared
   * them, then flushed) leave at once: no write in flight, not pinned. On disk with the next
   * record (lazily): until then they are still active there, which only costs a compare.
   */
  release(regions: number[]): void {
    let left = false;
    for (const region of regions) {
      const state = this.active.get(region);
      if (state === undefined || state.inflight !== 0 || state.pinned) continue;
      this.active.delete(region);
      left = true;
    }
    if (left) this.markStale();
  }

  // ---- missed-write maps ------------------------------------------------------------------------

  /** Creates (or extends) key's map with every region that may be active; synchronous in memory. */
  missedStart(key: string): Promise<void> {
    return this.missedMerge(key, [], false);
  }

  /**
   * Adds `regions` to key's map (creating it with the active set, as missedStart does), or, with
   * `invalid`, marks it invalid: how a rebuild hands the source's maps to the replica it made.
   */
  missedMerge(key: string, regions: number[], invalid: boolean): Promise<void> {
    if (invalid) {
      this.missed.delete(key);
      this.partial.delete(key);
      this.invalidMissed.add(key);
      return this.requestRecord();
    }
    if (this.invalidMissed.has(key)) return Promise.resolve();
    let map = this.missed.get(key);
    if (map === undefined) this.missed.set(key, (map = new Set()));
    const notes = this.partial.get(key);
    const add = (r: number): void => {
      map.add(r);
      notes?.delete(r);
    };
    for (const r of regions) add(r);
    for (const r of this.persisted) add(r);
    for (const r of this.active.keys()) add(r);
    for (const r of this.recordInFlight ?? []) add(r);
    if (notes !== undefined && notes.size === 0) this.partial.delete(key);
    return this.requestRecord();
  }

  /** Regions first..last are written: every note that they were copied in part goes. */
  private forgetPartial(first: number, last: number): void {
    for (const [key, notes] of this.partial) {
      let changed = false;
      for (let r = first; r <= last; r++) changed = notes.delete(r) || changed;
      if (changed) {
        if (notes.size === 0) this.partial.delete(key);
        // A note is made only for a region not active, and its record leaves the region out of
        // the persisted set: so this write asks for a record (enter), which drops the note on
        // disk before the write is done.
        this.markStale();
      }
    }
  }

  /**
   * A rebuild copied `regions` to replica `key` (the copy is in the target's own log until it is
   * durable there): they leave key's map. A region active here stays: a write to it is in flight
   * or not yet confirmed everywhere, and the target may miss it. (One only in the persisted set
   * left: its writes completed on every replica of the write set, the target's copy among them.
   * A record being written may still hold it in the map; the next one drops it.) No map (or an
   * invalid one): nothing.
   */
  missedClear(key: string, regions: number[], progress: [number, number][] = []): Promise<void> {
    const map = this.missed.get(key);
    if (map === undefined) return Promise.resolve();
    let changed = false;
    let notes = this.partial.get(key);
    for (const r of regions) {
      if (this.active.has(r)) continue;
      changed = map.delete(r) || changed;
      if (notes?.delete(r) === true) changed = true;
    }
    // Copied in part (`progress`: region, bytes from its start): the same rule, for the front of
    // the region. A note only grows while the region is not written (a write drops it).
    for (const [r, upTo] of progress) {
      if (this.active.has(r) || !map.has(r) || !validUpTo(upTo)) continue;
      if (notes === undefined) this.partial.set(key, (notes = new Map()));
      if ((notes.get(r) ?? 0) >= upTo) continue;
      notes.set(r, upTo);
      changed = true;
    }
    if (notes !== undefined && notes.size === 0) this.partial.delete(key);
    return changed ? this.requestRecord() : Promise.resolve();
  }

  /** Regions of key's map copied in part, with the bytes copied from each one's start. */
  missedPartial(key: string): [number, number][] {
    return [...(this.partial.get(key) ?? [])].sort((a, b) => a[0] - b[0]);
  }

  missedGet(key: string): number[] {
    if (this.invalidMissed.has(key)) {
      throw new ZebuError(ErrorCode.CONFLICT, `the missed-write map of ${key} was invalidated by a snapshot create, delete or revert: only a full rebuild brings it back`);
    }
    const map = this.missed.get(key);
    if (map === undefined) throw new ZebuError(ErrorCode.NOT_FOUND, `no missed-write map for ${key}`);
    return sorted(map);
  }

  missedDrop(key: string): Promise<void> {
    this.partial.delete(key);
    const had = this.missed.delete(key);
    if (!this.invalidMissed.delete(key) && !had) return Promise.resolve();
    return this.requestRecord();
  }

  missedPrune(keep: string[]): Promise<void> {
    const kept = new Set(keep);
    let changed = false;
    for (const key of [...this.missed.keys()]) {
      if (!kept.has(key)) {
        this.missed.delete(key);
        this.partial.delete(key);
        changed = true;
      }
    }
    for (const key of [...this.invalidMissed]) {
      if (!kept.has(key)) {
        this.invalidMissed.delete(key);
        changed = true;
      }
    }
    return changed ? this.requestRecord() : Promise.resolve();
  }

  /** The layer tree changes: no map stays valid. Durable when the promise resolves. */
  invalidateAllMissed(): Promise<void> {
    if (this.missed.size === 0) return Promise.resolve();
    for (const key of this.missed.keys()) this.invalidMissed.add(key);
    this.missed.clear();
    this.partial.clear();
    return this.requestRecord();
  }

  // ---- inspection -------------------------------------------------------------------------------

  get activeCount(): number {
    return this.active.size;
  }

  isActive(region: number): boolean {
    return this.active.has(region);
  }

  summary(): IntentSummary {
    const pinned: number[] = [];
    for (const [r, state] of this.active) if (state.pinned) pinned.push(r);
    const missed: Record<string, number> = {};
    for (const [key, map] of this.missed) missed[key] = map.size;
    return {
      regionBytes: INTENT_REGION_BYTES, active: sorted(this.active.keys()), pinned: pinned.sort((a, b) => a - b), missed, invalidMissed: [...this.invalidMissed].sort(),
    };
  }

  // ---- records ----------------------------------------------------------------------------------

  /** Resolves once a record holding the current state (or newer) is durable. */
  private requestRecord(): Promise<void> {
    if (this.failure !== null) return Promise.reject(this.failure);
    if (this.closed) return Promise.reject(new ZebuError(ErrorCode.CLOSED, `write-intent log of ${this.dir} is closed`));
    const done = new Promise<void>((resolve, reject) => this.waiters.push({ resolve, reject }));
    // Deferred to a microtask: every request of this tick (one socket read) joins one record.
    if (!this.writing && !this.kickQueued) {
      this.kickQueued = true;
      queueMicrotask(() => {
        this.kickQueued = false;
        this.kick();
      });
    }
    return done;
  }

  private markStale(): void {
    this.stale = true;
    if (this.lazyTimer !== null || this.closed) return;
    this.lazyTimer = this.clock.setTimeout(() => {
      this.lazyTimer = null;
      this.kick();
    }, LAZY_WRITE_MS).unref();
  }

  /** Writes one record when one is wanted and none is being written. */
  private kick(): void {
    if (this.writing || this.failure !== null || this.closed) return;
    if (this.waiters.length === 0 && !this.stale) return;
    const waiters = this.waiters;
    this.waiters = [];
    this.writing = true;
    this.writeRecord().then(
      () => {
        this.writing = false;
        for (const w of waiters) w.resolve();
        this.kick();
      },
      (err: unknown) => {
        this.writing = false;
        const failure = this.fail(err);
        for (const w of [...waiters, ...this.waiters]) w.reject(failure);
        this.waiters = [];
      },
    );
  }

  private fail(err: unknown): ZebuError {
    if (this.failure === null) {
      const code = toZebuError(err).code === ErrorCode.ENOSPC ? ErrorCode.ENOSPC : ErrorCode.EIO;
      this.failure = new ZebuError(code, `replica ${this.dir}: write-intent log update failed: ${(err as Error).message}`, { cause: err });
      this.clock.clear(this.lazyTimer);
      this.lazyTimer = null;
      this.onFailure(this.failure);
    }
    return this.failure;
  }

  private async writeRecord(): Promise<void> {
    this.stale = false;
    const activeSet = sorted(this.active.keys());
    for (const map of this.missed.values()) for (const r of activeSet) map.add(r);
    for (const notes of this.partial.values()) for (const r of activeSet) notes.delete(r);
    const missed = new Map<string, number[]>();
    for (const [key, map] of this.missed) missed.set(key, sorted(map));
    const partial = new Map<string, Map<number, number>>();
    for (const [key, notes] of this.partial) if (notes.size > 0) partial.set(key, new Map(notes));
    const seq = this.seq + 1;
    const bytes = encodeIntentRecord({ seq, regionBytes: INTENT_REGION_BYTES, active: activeSet, missed, partial, invalid: [...this.invalidMissed] });
    const inRecord = new Set(activeSet);
    const kept = new Set<number>();
    for (const r of this.persisted) if (inRecord.has(r)) kept.add(r);
    this.persisted = kept;
    this.recordInFlight = inRecord;
    const slot = this.slots[seq % 2];
    try {
      await slot.write(bytes, 0, bytes.length, 0);
      await slot.datasync();
    } finally {
      this.recordInFlight = null;
    }
    this.seq = seq;
    this.persisted = inRecord;
    this.recordWrites++;
  }

  /** Writes what is still stale (a clean close keeps the disk exact), then closes the files. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.clock.clear(this.lazyTimer);
    this.lazyTimer = null;
    if (this.failure === null && (this.stale || this.waiters.length > 0 || this.writing)) {
      await this.requestRecord().catch(() => {});
    }
    await this.abandon();
  }

  /** Closes the files without writing anything (a crash, or after a failure). */
  async abandon(): Promise<void> {
    this.closed = true;
    this.clock.clear(this.lazyTimer);
    this.lazyTimer = null;
    // Activations still waiting for a record will not get one.
    const waiters = this.waiters;
    this.waiters = [];
    const closed = new ZebuError(ErrorCode.CLOSED, `write-intent log of ${this.dir} is closed`);
    for (const w of waiters) w.reject(closed);
    for (const file of this.slots) await file.close().catch(() => {});
  }
}
