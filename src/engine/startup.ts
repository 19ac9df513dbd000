/**
 * The start-up decision (docs/crash-consistency.md, "Start-up recovery"). Pure: what the replicas said in, a plan out.
 *
 * - The source is the best usable replica by (writeEpoch, revision, flushedRevision): the one that
 *   holds the most writes of the newest epoch (a live process's unflushed ones count). Unusable: unopenable, wrong size, or a rebuild
 *   that stopped midway (its counters say nothing about its data).
 * - A replica that made the same writes durable as the source (same writeEpoch and
 *   flushedRevision, same chain) starts RW: it can differ from the source only in regions some
 *   replica logged as active, and the union of those is resynced from the source before the first
 *   request. (A replica without a write-intent log gives no such bound: it must also have the same
 *   revision.)
 * - writeEpoch is also a membership mark: every replica that is RW after a start-up or at the end
 *   of a rebuild is given the engine's epoch (SET_REVISION). Within that epoch, a replica that
 *   went out got a missed-write map on the others (at once, before any later flush; at start-up,
 *   before serving; and a rebuild hands the maps over to the replica it makes).
 * - Only the maps of the source and of the replicas in sync with it count (mapHolders): a replica
 *   that is behind may hold maps that are stale.
 * - So for a replica with the source's chain that is not equal to it:
 *   - some replica holds an *invalid* map for it (a snapshot changed while it was out): ERR;
 *   - some replica holds a map for it: delta rebuild of the maps ∪ its active ∪ the source's;
 *   - nobody holds one and its writeEpoch is the source's: it never left the write set of that
 *     epoch (it only missed the unflushed tail), and the union resync is all it needs: RW;
 *   - nobody holds one and its writeEpoch is older: it missed a whole epoch: ERR (full rebuild).
 */
import type { ReplicaInfo } from '../replica/replica.ts';

export interface StartupCandidate {
  /** The replica's key (missed-write maps are kept per key). */
  key: string;
  info: ReplicaInfo | null;
  error: string | null;
  /** Snapshot names of the live chain, oldest first (null when unknown). */
  chain: string[] | null;
  /** Active regions of its write-intent log; null when it has none (an older replica). */
  active: number[] | null;
  /** Keys it holds missed-write maps for, valid or invalid (absent or null: none known). */
  mapsFor?: string[] | null;
}

export type StartupMode = 'RW' | 'DELTA' | 'ERR';

export interface StartupDecision {
  mode: StartupMode;
  reason: string;
  /** DELTA: the regions to copy from the source. */
  regions: number[];
  /**
   * ERR, and only a full rebuild can bring it back (it never held the volume's data, or its map
   * was invalidated, or another chain, or no log to bound it): it gets an invalid mark, not a map
   * — a map started now would later make a delta of it look possible.
   */
  fullRebuildOnly?: boolean;
}

/** What the other replicas hold for a replica's key. */
export interface MissedStatus {
  /** Some replica's map for it was invalidated by a snapshot create, delete or revert. */
  invalid: boolean;
  /** The union of the valid maps held for it; null when nobody holds one. */
  regions: number[] | null;
}

export const NO_MISSED: MissedStatus = { invalid: false, regions: null };

export interface StartupPlan {
  /** Index of the source, null when no replica is usable. */
  source: number | null;
  decisions: StartupDecision[];
  /** Regions to copy from the source into every other RW replica before serving, ascending. */
  resyncRegions: number[];
  /** Every replica opened, closed cleanly, and equal to the source (revision included). */
  clean: boolean;
}

/** writeEpoch came with the write-intent log; a replica without it last wrote in "epoch 0". */
export function writeEpochOf(info: ReplicaInfo): number {
  return (info as ReplicaInfo & { writeEpoch?: number }).writeEpoch ?? 0;
}

function unusableReason(sizeBytes: number, c: StartupCandidate): string | null {
  if (c.info === null) return `cannot open replica: ${c.error}`;
  if (c.info.rebuilding) return `incomplete ${c.info.rebuildKind === 'delta' ? 'delta ' : ''}rebuild: its copy stopped midway`;
  if (c.info.sizeBytes !== sizeBytes) return `replica size ${c.info.sizeBytes} differs from the volume size ${sizeBytes}`;
  return null;
}

/** A replica whose delta rebuild stopped midway: no source, but it may get its delta again. */
function resumableDelta(sizeBytes: number, c: StartupCandidate): boolean {
  return c.info !== null && c.info.rebuilding && c.info.rebuildKind === 'delta' && c.info.sizeBytes === sizeBytes;
}

/**
 * -1, 0, 1 as `a` is behind, equal to, ahead of `b` by (writeEpoch, revision, flushedRevision).
 * Within an epoch the revision comes before the flushed revision: a replica whose process kept
 * running holds every write it acknowledged (in its page cache), and the recovery makes them
 * durable before serving; one that lost power and reopened has only what it flushed
 * (revision = flushedRevision). Compared the other way round, a replica that had flushed one more
 * write before it lost power won over one that lived on with all of them, and the acknowledged
 * writes it lost were copied over the live one's (found by the simulator).
 */
export function compareCounters(a: ReplicaInfo, b: ReplicaInfo): number {
  return Math.sign(writeEpochOf(a) - writeEpochOf(b) || a.revision - b.revision || a.flushedRevision - b.flushedRevision);
}

/**
 * Of replicas that all serve (a recovery whose source failed), the one the others copy from: the
 * furthest ahead by the same counters as chooseSource. Ties go to the first; null when none.
 */
export function furthestAhead<T extends { info: ReplicaInfo | null }>(replicas: T[]): T | null {
  let best: T | null = null;
  for (const r of replicas) {
    if (r.info === null) continue;
    if (best === null || compareCounters(r.info, best.info!) > 0) best = r;
  }
  return best;
}

/**
 * The best usable replica, or null. Among replicas with equal counters, one that another of them
 * holds a missed-write map for is not chosen: it went out while that one served on, and what it
 * missed need not show in the counters — a snapshot taken meanwhile counts no write (found by the
 * simulator: a replica that missed a snapshot became the source, and the snapshot was lost with
 * the replica that had it). Other ties go to the first.
 */
export function chooseSource(sizeBytes: number, candidates: StartupCandidate[]): number | null {
  let best: number | null = null;
  for (const [i, c] of candidates.entries()) {
    if (unusableReason(sizeBytes, c) !== null) continue;
    if (best === null || compareCounters(c.info!, candidates[best].info!) > 0) best = i;
  }
  if (best === null) return null;
  const tied = candidates.flatMap((c, i) => (unusableReason(sizeBytes, c) === null && compareCounters(c.info!, candidates[best!].info!) === 0 ? [i] : []));
  if (tied.length < 2) return best;
  const wentOut = new Set(tied.flatMap((i) => candidates[i].mapsFor ?? []));
  return tied.find((i) => !wentOut.has(candidates[i].key)) ?? best;
}

function sameChain(a: string[] | null, b: string[] | null): boolean {
  return a !== null && b !== null && a.length === b.length && a.every((name, i) => name === b[i]);
}

/**
 * The candidates whose missed-write maps count at start-up: the source and the usable replicas
 * that made the same writes durable as it (same writeEpoch and flushedRevision, same chain).
 * Their maps are complete: a replica in the write set starts a map the moment another leaves, and
 * a rebuilt one is handed the others' maps. A replica that is behind holds maps from before it
 * went out, and those may be stale (the replica they name was rebuilt since, its map dropped
 * everywhere else): asked, they would fail that replica again at every start.
 */
export function mapHolders(sizeBytes: number, candidates: StartupCandidate[]): number[] {
  const source = chooseSource(sizeBytes, candidates);
  if (source === null) return [];
  const best = candidates[source];
  return candidates.flatMap((c, i) => {
    if (unusableReason(sizeBytes, c) !== null) return [];
    const info = c.info!;
    const inSync = writeEpochOf(info) === writeEpochOf(best.info!) && info.flushedRevision === best.info!.flushedRevision && sameChain(c.chain, best.chain) && info.hasBase === best.info!.hasBase;
    return inSync ? [i] : [];
  });
}

/** `missedFor(i)`: the missed-write maps the other usable replicas hold for candidate i's key. */
export function planStartup(sizeBytes: number, regionBytes: number, candidates: StartupCandidate[], missedFor: (i: number) => MissedStatus): StartupPlan {
  const regionCount = Math.ceil(sizeBytes / regionBytes);
  const source = chooseSource(sizeBytes, candidates);
  const src = source === null ? null : candidates[source];
  let clean = src !== null;
  const decisions = candidates.map((c, i): StartupDecision => {
    const unusable = unusableReason(sizeBytes, c);
    if (unusable !== null && !(src !== null && resumableDelta(sizeBytes, c))) {
      clean = false;
      return { mode: 'ERR', reason: unusable, regions: [] };
    }
    const info = c.info!;
    const best = src!.info!;
    // A delta rebuild that stopped midway (the only marked replica that gets here) is copied again,
    // from maps that grew all along: a map takes every region written while it exists, the
    // rebuild's own writes included, and the target's active regions were merged into it before
    // it joined.
    const resuming = info.rebuilding;
    // Without a write-intent log on both sides the unflushed tail is not bounded: the counters
    // must match exactly.
    const bounded = c.active !== null && src!.active !== null;
    const sameEpoch = writeEpochOf(info) === writeEpochOf(best);
    const equal = sameEpoch && info.flushedRevision === best.flushedRevision && (bounded || info.revision === best.revision);
    const chainMatches = sameChain(c.chain, src!.chain) && info.hasBase === best.hasBase;
    const missed = missedFor(i);
    if (!resuming) {
      if (!info.cleanShutdown || info.revision !== best.revision) clean = false;
      if (i === source) return { mode: 'RW', reason: 'source', regions: [] };
      if (equal && chainMatches && missed.regions === null && !missed.invalid) return { mode: 'RW', reason: 'up to date', regions: [] };
    }
    clean = false;
    const behind = resuming
      ? 'incomplete delta rebuild'
      : `replica is behind (writeEpoch ${writeEpochOf(info)}, flushed revision ${info.flushedRevision}, revision ${info.revision}; source ${writeEpochOf(best)}, ${best.flushedRevision}, ${best.revision})`;
    if (!chainMatches) return { mode: 'ERR', reason: `${equal && !resuming ? 'replica' : behind}: its snapshot chain differs from the source's`, regions: [], fullRebuildOnly: true };
    if (!bounded) return { mode: 'ERR', reason: `${behind}; no write-intent log to bound the difference`, regions: [], fullRebuildOnly: true };
    if (missed.invalid) return { mode: 'ERR', reason: `${behind}; its missed-write map was invalidated by a snapshot change while it was out`, regions: [], fullRebuildOnly: true };
    if (missed.regions === null) {
      if (resuming) return { mode: 'ERR', reason: `${behind}; no replica holds its missed-write map any more`, regions: [], fullRebuildOnly: true };
      // Never out in its writeEpoch (it would have a map): only the unflushed tail differs, and
      // that is in the union of the active sets, resynced before serving.
      if (sameEpoch) return { mode: 'RW', reason: 'in the write set until the stop; resynced from the write-intent logs', regions: [] };
      // One that never held the volume's data (written by no engine: a new replica whose first
      // rebuild never began) lacks everything; one that did gets a map from this start-up on, as
      // every replica that is out does, and the epochs it missed before are in no map.
      return { mode: 'ERR', reason: `${behind}; it missed epoch ${writeEpochOf(best)} and no replica kept a missed-write map for it`, regions: [], fullRebuildOnly: writeEpochOf(info) === 0 };
    }
    const regions = new Set<number>();
    for (const list of [missed.regions, c.active!, src!.active!]) for (const region of list) if (region < regionCount) regions.add(region);
    return { mode: 'DELTA', reason: `${behind}; delta rebuild of ${regions.size} region(s)${resuming ? ' again' : ''}`, regions: [...regions].sort((a, b) => a - b) };
  });
  // Where the replicas that serve may differ: the active regions of those replicas. A replica left
  // out or waiting for its delta rebuild adds nothing (its own active regions are in its delta):
  // were they counted, every start while it waits would compare them all again.
  const union = new Set<number>();
  for (const [i, c] of candidates.entries()) {
    if (decisions[i].mode !== 'RW' || c.active === null) continue;
    for (const region of c.active) if (region < regionCount) union.add(region);
  }
  return { source, decisions, resyncRegions: [...union].sort((a, b) => a - b), clean };
}
