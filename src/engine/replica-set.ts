/**
 * The engine's replicas and their modes: pure state, no I/O. The engine (the shell) owns the
 * links; this module decides who is in the write set, who may serve a read, when a replica is
 * taken out and what follows from it, and when the volume is faulted. It hands back what the
 * shell must do (close this link, start these missed-write maps) instead of doing it.
 *
 * Modes:
 * - RW: in sync, takes every write, serves reads.
 * - WO: being rebuilt; takes every write once it joined the write set, serves no read.
 * - ERR: out for good in this engine (a replica that comes back is added again, as a new member).
 *
 * Invariants (asserted at every transition):
 * - once serving, no RW replica means faulted;
 * - a RW replica is in the write set and not being rebuilt, and only RW replicas serve reads —
 *   so a replica that missed a write (out, or still being copied) is never read from;
 * - a replica's epoch, as it reports it, is never below the engine's (it was opened with it) and
 *   never goes down, and it never wrote in an epoch above it.
 */
import { assert, ErrorCode, type ZebuError } from '../errors.ts';
import type { ReplicaInfo } from '../replica/replica.ts';
import type { RebuildProgress } from './rebuild.ts';

export const ReplicaMode = { RW: 'RW', WO: 'WO', ERR: 'ERR' } as const;
export type ReplicaMode = (typeof ReplicaMode)[keyof typeof ReplicaMode];

/** What the set needs of a link: how busy it is (reads go to the least busy). */
export interface LinkLoad {
  readonly inflight: number;
}

export interface EngineReplica<L extends LinkLoad = LinkLoad> {
  address: string;
  key: string;
  /** The key was given (KEY=HOST:PORT): a replica that reports another name is the wrong one. */
  named: boolean;
  host: string;
  port: number;
  local: boolean;
  /** The connection to it, or null (not open yet, or out). */
  client: L | null;
  mode: ReplicaMode;
  reason: string | null;
  info: ReplicaInfo | null;
  rebuild: RebuildProgress | null;
  /** Whether writes go to it: false for a replica being rebuilt until it joins. */
  inWriteSet: boolean;
}

/** What the shell must do after a replica was taken out (fail()). */
export interface ReplicaFailure<L> {
  /** The link to close, or null. */
  close: L | null;
  /** It was serving (RW or WO) until now. */
  wasActive: boolean;
  /** Start a missed-write map for this key on every replica of the write set, in this tick. */
  startMapFor: string | null;
  /** A newer engine fenced this one: the volume stops serving. */
  superseded: boolean;
  /** The volume became faulted with this failure: why. */
  faulted: string | null;
}

export class ReplicaSet<L extends LinkLoad> {
  readonly members: EngineReplica<L>[];
  private readonly epoch: number;
  /** Why the volume serves nothing any more (no RW replica, fenced, recovery failed), or null. */
  faultedReason: string | null = null;
  /** A newer engine owns the volume. */
  superseded = false;
  /** Start-up assigned the modes: from now on, no RW replica means faulted. */
  private serving = false;
  /** The highest epoch each replica reported (epochs never go down). */
  private readonly epochSeen = new WeakMap<EngineReplica<L>, number>();

  constructor(members: EngineReplica<L>[], epoch: number) {
    this.members = members;
    this.epoch = epoch;
  }

  // ---- queries ---------------------------------------------------------------------------------

  /** The replicas a write goes to: RW and WO, connected, in the write set. */
  writeTargets(): EngineReplica<L>[] {
    return this.members.filter((r) => r.mode !== ReplicaMode.ERR && r.client !== null && r.inWriteSet);
  }

  /** RW and connected. */
  healthy(): EngineReplica<L>[] {
    return this.members.filter((r) => r.mode === ReplicaMode.RW && r.client !== null);
  }

  /** RW or WO, connected (control requests: snapshots, expansion). */
  active(): EngineReplica<L>[] {
    return this.members.filter((r) => r.mode !== ReplicaMode.ERR && r.client !== null);
  }

  hasRw(): boolean {
    return this.members.some((r) => r.mode === ReplicaMode.RW);
  }

  /** Whether `r` is the only RW replica. */
  isLastRw(r: EngineReplica<L>): boolean {
    return r.mode === ReplicaMode.RW && !this.members.some((x) => x !== r && x.mode === ReplicaMode.RW);
  }

  /** A RW replica for a read: local first, then least outstanding; null when none is left. */
  pickReader(exclude: ReadonlySet<EngineReplica<L>> | null): EngineReplica<L> | null {
    let best: EngineReplica<L> | null = null;
    for (const r of this.members) {
      if (r.mode !== ReplicaMode.RW || r.client === null || (exclude !== null && exclude.has(r))) continue;
      if (best === null) {
        best = r;
        continue;
      }
      if (r.local !== best.local) {
        if (r.local) best = r;
        continue;
      }
      if (r.client.inflight < best.client!.inflight) best = r;
    }
    if (best !== null) assert(best.inWriteSet && best.rebuild === null, `replica ${best.address} would serve a read while it may miss writes`);
    return best;
  }

  // ---- transitions -----------------------------------------------------------------------------

  /** What a replica reported about itself (open, info, a rebuild's end). */
  noteInfo(r: EngineReplica<L>, info: ReplicaInfo): void {
    const seen = this.epochSeen.get(r) ?? 0;
    // Reports come after this engine's OPEN, which a replica persists before it answers.
    assert(!(info.epoch < this.epoch), `replica ${r.address} reported epoch ${info.epoch} below the epoch ${this.epoch} it was opened with`);
    assert(!(info.epoch < seen), `replica ${r.address} reported epoch ${info.epoch} after ${seen}: epochs never go down`);
    assert(!(info.writeEpoch > info.epoch), `replica ${r.address} wrote in epoch ${info.writeEpoch} above its epoch ${info.epoch}`);
    this.epochSeen.set(r, Math.max(seen, info.epoch));
    r.info = info;
  }

  /** Start-up: a replica in sync serves. */
  startRw(r: EngineReplica<L>): void {
    assert(!this.serving && r.client !== null, 'start-up modes are set once, on open replicas');
    r.mode = ReplicaMode.RW;
    r.reason = null;
  }

  /** Start-up: a replica behind waits, connection kept, for its delta rebuild (out of the write set). */
  startWaiting(r: EngineReplica<L>, reason: string): void {
    assert(!this.serving, 'start-up modes are set once');
    r.mode = ReplicaMode.ERR;
    r.reason = reason;
  }

  /** Start-up: a replica that cannot serve is out; returns its link to close. */
  startOut(r: EngineReplica<L>, reason: string): L | null {
    assert(!this.serving, 'start-up modes are set once');
    const link = r.client;
    r.mode = ReplicaMode.ERR;
    r.reason = reason;
    r.client = null;
    return link;
  }

  /** Start-up assigned every mode: faulted when no replica is RW. */
  startServing(): void {
    this.serving = true;
    if (!this.hasRw()) this.fault(`no replica could be opened: ${this.members.map((r) => `${r.address}: ${r.reason}`).join('; ')}`);
    this.check();
  }

  /** The volume serves nothing any more (the first reason stays). */
  fault(reason: string): void {
    this.faultedReason ??= reason;
  }

  /**
   * Takes a replica out for good: ERR, its link to be closed, never used again by this engine.
   * When it was RW, the replicas of the write set must start a missed-write map for it at once
   * (same tick: before any later flush lets a region it missed leave their active sets) — not
   * when it was removed (`missed` false), when the engine is closing, or when a newer engine
   * fenced us. Null when it was out already.
   */
  fail(r: EngineReplica<L>, err: ZebuError, options: { missed: boolean; closing: boolean }): ReplicaFailure<L> | null {
    if (r.mode === ReplicaMode.ERR && r.client === null) return null;
    const wasActive = r.mode !== ReplicaMode.ERR;
    const wasRw = r.mode === ReplicaMode.RW;
    const link = r.client;
    r.mode = ReplicaMode.ERR;
    r.reason = err.message;
    r.client = null;
    let superseded = false;
    let startMapFor: string | null = null;
    const faultedBefore = this.faultedReason;
    if (err.code === ErrorCode.FENCED) {
      superseded = true;
      this.superseded = true;
      this.faultedReason = `superseded by a newer epoch: ${err.message}`;
    } else if (wasRw && options.missed && !options.closing) {
      startMapFor = r.key;
    }
    if (this.serving && !this.hasRw()) this.fault(`no healthy replica left (last: ${r.address}: ${err.message})`);
    this.check();
    return { close: link, wasActive, startMapFor, superseded, faulted: faultedBefore === null ? this.faultedReason : null };
  }

  /** A new replica (or one coming back) enters as WO, out of the write set; it replaces `old` if given. */
  add(target: EngineReplica<L>, old: EngineReplica<L> | undefined): void {
    assert(target.mode === ReplicaMode.WO && !target.inWriteSet && target.rebuild !== null, 'a replica enters as WO, out of the write set, being rebuilt');
    assert(old === undefined || (old.mode === ReplicaMode.ERR && old.client === null), 'only a replica that is out is replaced');
    if (old !== undefined) this.members[this.members.indexOf(old)] = target;
    else this.members.push(target);
    this.check();
  }

  /** A replica waiting at start-up (ERR, connected) begins its delta rebuild: WO, out of the write set. */
  beginDelta(r: EngineReplica<L>, progress: RebuildProgress): void {
    assert(r.mode === ReplicaMode.ERR && r.client !== null, 'a delta rebuild starts on a waiting, connected replica');
    r.mode = ReplicaMode.WO;
    r.reason = 'rebuilding';
    r.inWriteSet = false;
    r.rebuild = progress;
    this.check();
  }

  /** A replica being rebuilt joins the write set (call with no write in flight). */
  join(r: EngineReplica<L>): void {
    assert(r.mode === ReplicaMode.WO && !r.inWriteSet, 'only a WO replica out of the write set joins it');
    r.inWriteSet = true;
  }

  /** The end of a rebuild: the copy is complete and durable, the replica serves. */
  promote(r: EngineReplica<L>): void {
    assert(r.mode === ReplicaMode.WO && r.inWriteSet && r.client !== null, `replica ${r.address} becomes RW only from WO in the write set`);
    r.mode = ReplicaMode.RW;
    r.reason = null;
    r.rebuild = null;
    this.check();
  }

  /** Takes an ERR replica off the list. */
  remove(r: EngineReplica<L>): void {
    assert(r.mode === ReplicaMode.ERR && r.client === null, 'only a replica that is out leaves the list');
    this.members.splice(this.members.indexOf(r), 1);
    this.check();
  }

  private check(): void {
    for (const r of this.members) {
      if (r.mode === ReplicaMode.RW) assert(r.inWriteSet && r.rebuild === null, `RW replica ${r.address} is out of the write set or being rebuilt`);
    }
    if (this.serving && !this.hasRw()) assert(this.faultedReason !== null, 'no RW replica left and the volume is not faulted');
  }
}
