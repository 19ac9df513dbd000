/**
 * Rebuild and delta planning: which kind of rebuild a joining replica gets, what a delta copies,
 * in which order a full rebuild recreates the snapshot tree, and what the target already holds
 * where a region is copied. Pure: the engine asks the replicas, this module decides.
 *
 * - A new, empty replica gets a full copy.
 * - A replica that was in the volume before (it took writes: writeEpoch > 0 or active regions)
 *   comes back by a delta when its snapshot chain and backing image are the volume's and a RW
 *   replica holds a missed-write map for it: the map's regions, its own active regions (writes
 *   the others may not have) and the map holder's are copied.
 * - A non-empty replica with no possible delta is refused (it is not overwritten by surprise).
 */
import { assert } from '../errors.ts';
import type { ReplicaInfo, SnapshotInfo } from '../replica/replica.ts';

/** What a rebuild's target holds where a region is copied (see the engine's copyRegion). */
export type RegionCopy =
  | { kind: 'status'; zeroIfEmpty: boolean }
  | { kind: 'image'; zeroIfEmpty: boolean }
  | { kind: 'since'; snapshot: string };

export interface SnapshotCopyPlan {
  /** Every snapshot by name with its parent snapshot's name (null: none), parents first. */
  order: { name: string; parent: string | null }[];
  /** The snapshot the live volume sits on (the newest of its chain), or null. */
  headParent: string | null;
}

/** How a replica that asks to join can be brought in, before any map is looked for. */
export interface JoinKind {
  /** Nothing in it: a full copy will do. */
  empty: boolean;
  /** It was in the volume before (took writes): a delta is tried first, even when it looks empty. */
  served: boolean;
}

export function joinKind(info: ReplicaInfo): JoinKind {
  const empty = info.revision === 0 && info.layerCount === (info.hasBase ? 2 : 1) && !info.rebuilding;
  // Revision 0 is also a replica that took writes and lost them all before its first flush
  // (killed, power cut): it was in the set (writeEpoch) or logged regions it wrote. A map for it
  // brings it back by a delta, as any replica behind; only a new one is copied whole.
  const served = info.writeEpoch > 0 || info.activeRegions > 0;
  return { empty, served };
}

/**
 * Why a delta rebuild of a replica cannot be done from the volume as the RW replicas have it, or
 * null when it can (a map holder is still needed). `ours`/`theirs`: snapshot chains by name.
 */
export function deltaRefusal(info: ReplicaInfo, ours: string[], theirs: string[], volumeHasBase: boolean): string | null {
  const unfinished = unfinishedFullRebuild(info);
  if (unfinished !== null) return unfinished;
  if (ours.length !== theirs.length || ours.some((name, i) => name !== theirs[i])) return `its snapshot chain [${theirs.join(', ')}] is not the volume's [${ours.join(', ')}]`;
  if (info.hasBase !== volumeHasBase) return 'its backing image differs';
  return null;
}

/** A delta rebuild that stopped midway is copied again from the same maps; a full one is not. */
export function unfinishedFullRebuild(info: ReplicaInfo): string | null {
  return info.rebuilding && info.rebuildKind !== 'delta' ? 'its last (full) rebuild stopped midway' : null;
}

/** Why a replica's backing image is not the volume's (`want`: a RW replica's info), or null. */
export function imageMismatch(info: ReplicaInfo, want: ReplicaInfo | null): string | null {
  if (want === null) return null;
  if (info.hasBase !== want.hasBase) return want.hasBase ? 'the volume is on a backing image and the replica has none' : 'the replica has a backing image and the volume has none';
  if (info.hasBase && info.baseSizeBytes != null && want.baseSizeBytes != null && info.baseSizeBytes !== want.baseSizeBytes) {
    return `its backing image has ${info.baseSizeBytes} bytes, the volume's ${want.baseSizeBytes}`;
  }
  return null;
}

/**
 * The regions a delta rebuild copies, ascending: what the map says the target missed, the
 * target's own active regions (it may have written them alone before it went out) and the map
 * holder's (in flight when it went out), within the volume.
 */
export function deltaRegions(missed: number[], targetActive: number[], holderActive: number[], regionCount: number): number[] {
  const all = new Set<number>();
  for (const list of [missed, targetActive, holderActive]) for (const region of list) if (region >= 0 && region < regionCount) all.add(region);
  return [...all].sort((a, b) => a - b);
}

/**
 * Where a delta goes on in regions a stopped copy got partway through (the map holder's notes:
 * region -> bytes copied from its start, durable on the target): not in a region active on the
 * target or the holder (a write to it may be missing from the copied front), nor a note that is
 * not whole 4 KiB blocks inside the region.
 */
export function copiedFronts(partial: [number, number][], targetActive: number[], holderActive: number[], regionBytes: number): Map<number, number> {
  const whole = new Set([...targetActive, ...holderActive]);
  const out = new Map<number, number>();
  for (const [region, upTo] of partial) {
    if (whole.has(region) || !Number.isSafeInteger(upTo) || upTo <= 0 || upTo % 4096 !== 0 || upTo >= regionBytes) continue;
    out.set(region, upTo);
  }
  return out;
}

/**
 * Why a replica whose full rebuild stopped midway cannot go on with it over the snapshots it
 * completed, or null when it can: each of its snapshots must be one of the volume's, on the same
 * parent (their bytes are compared by hash during the rebuild). `theirs`: the target's.
 */
export function fullResumeRefusal(info: ReplicaInfo, theirs: SnapshotInfo[], ours: SnapshotInfo[]): string | null {
  if (!info.rebuilding || info.rebuildKind !== 'full') return 'it holds data and no full rebuild of it stopped midway';
  const parentNames = (list: SnapshotInfo[]): Map<string, string | null> => {
    const byId = new Map(list.map((x) => [x.id, x.name]));
    return new Map(list.map((x) => [x.name, x.parent !== null ? byId.get(x.parent) ?? null : null]));
  };
  const volume = parentNames(ours);
  for (const [name, parent] of parentNames(theirs)) {
    if (!volume.has(name)) return `its snapshot ${name} is not in the volume`;
    if (volume.get(name) !== parent) return `its snapshot ${name} sits on ${parent ?? 'nothing'}, the volume's on ${volume.get(name) ?? 'nothing'}`;
  }
  return null;
}

/** How the live volume is copied over a target whose head sits on `tip` (a snapshot) or on nothing. */
export function liveRegionCopy(tip: string | null, aboveImage: boolean, zeroIfEmpty: boolean): RegionCopy {
  if (tip !== null) return { kind: 'since', snapshot: tip };
  return aboveImage ? { kind: 'image', zeroIfEmpty } : { kind: 'status', zeroIfEmpty };
}

/** The order in which a rebuild recreates a snapshot tree: depth first, oldest child first. */
export function snapshotCopyPlan(snapshots: SnapshotInfo[]): SnapshotCopyPlan {
  const byId = new Map(snapshots.map((x) => [x.id, x]));
  const parentOf = (x: SnapshotInfo): string | null => (x.parent !== null ? byId.get(x.parent)?.name ?? null : null);
  const children = new Map<string | null, SnapshotInfo[]>();
  for (const x of snapshots) {
    const p = parentOf(x);
    if (!children.has(p)) children.set(p, []);
    children.get(p)!.push(x);
  }
  for (const list of children.values()) list.sort((a, b) => a.createdAt.localeCompare(b.createdAt) || a.id.localeCompare(b.id));
  const order: SnapshotCopyPlan['order'] = [];
  const visit = (parent: string | null): void => {
    for (const x of children.get(parent) ?? []) {
      order.push({ name: x.name, parent });
      visit(x.name);
    }
  };
  visit(null);
  assert(order.length === snapshots.length, 'every snapshot is reached from a root');
  // The head's parent is the in-chain snapshot none of whose children is in the chain.
  const inChain = snapshots.filter((x) => x.inChain);
  const headParent = inChain.find((x) => !inChain.some((y) => parentOf(y) === x.name))?.name ?? null;
  return { order, headParent };
}

