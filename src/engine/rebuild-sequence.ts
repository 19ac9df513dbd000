/**
 * The rebuild sequences: how a replica joining the volume is brought up to date while clients
 * write — a full copy (the snapshots of the chain, oldest first, then the live volume) or a delta
 * (only the regions a missed-write map, the target's and the source's active regions name) —
 * each ending in the same hand-over to RW. What to copy is decided in rebuild-plan.ts; here are
 * the steps, the requests to the replicas, and when client I/O is paused. The engine hands in
 * what a rebuild needs of it (`RebuildHost`), and starts, tracks and reports the run itself.
 */
import { createHash } from 'node:crypto';
import { ZebuError, ErrorCode, assert, toZebuError } from '../errors.ts';
import type { DataClient } from '../protocol/client.ts';
import { Op, decodeExtents } from '../protocol/frames.ts';
import { copiedFronts, deltaRegions, liveRegionCopy, snapshotCopyPlan, type RegionCopy, type SnapshotCopyPlan } from './rebuild-plan.ts';
import type { SnapshotInfo } from '../replica/replica.ts';
import { isAllZero } from '../os/zeros.ts';
import { ReplicaMode, type ReplicaSet, type EngineReplica as SetMember } from './replica-set.ts';
import type { Rebuild, RangeClaims } from './rebuild.ts';
import { copyRegionLeased, type CopierHost, type LeaseCounters } from './leased-copy.ts';
import { CopierGaveUp, CopierLost, type CopyEndpoint, type RegionCopier, type RegionCopyHooks } from './copier-process.ts';
import { COPIERS, REGION_BYTES, forEachIndex, isUnsupported, regionRange } from './recovery.ts';

type EngineReplica = SetMember<DataClient>;

/**
 * Regions of the live volume copied at once under leases while clients are quiet (while they are
 * busy, the engine's copy turns allow two). Each has one chunk in flight (through the engine: and
 * the next one's read): more of them keep both replicas busy, and a client write still waits for
 * at most one chunk of the region it hits. 16 measured 224 MiB/s idle against 187 with 8, with
 * the targets pulling (bench:rebuild, 2 cores).
 */
const LEASED_COPIERS = 16;

/**
 * Makes the regions a rebuild copied durable on the target, then takes them out of the target's
 * missed-write maps on the RW replicas — so that a rebuild that stops later does not copy them
 * again. Copy writes are not in the target's write-intent log (replica.ts copyWrite): until a
 * region leaves the maps, the maps are what says it is still to copy. One target flush at a
 * time, at most every COPY_FLUSH_MS (COPY_FLUSH_BUSY_MS while clients use the volume: a fsync
 * on the target competes with their writes); regions copied meanwhile wait for the next.
 *
 * Sending a clear while the copy is durable is safe at any later moment the target is still
 * healthy: a holder keeps every region it holds active (a write to it in flight or not yet
 * confirmed by a flush on every replica, the target among them), and a write sent after the
 * clear reaches the holder after it and puts the region back (IntentLog.missedClear).
 */
const COPY_FLUSH_MS = 50;
const COPY_FLUSH_BUSY_MS = 500;
/**
 * While snapshots are copied the target is flushed at most this often (RebuildHost's
 * snapshotCopyFlushMs), so that what it holds of the snapshot under way survives a stop: the
 * copy then goes on over it (runFullRebuild) instead of starting the snapshot over. Without a
 * flush, a restarted target knows none of it.
 */
export const DEFAULT_SNAPSHOT_COPY_FLUSH_MS = 1000;

class CopyFlusher {
  private readonly host: RebuildHost;
  private readonly target: EngineReplica;
  private readonly check: () => void;
  private running: Promise<void> | null = null;
  private pending: number[] = [];
  /** Regions copied in part since the last flush: region -> bytes copied from its start. */
  private pendingProgress = new Map<number, number>();
  private lastStartMs = -Infinity;

  constructor(host: RebuildHost, target: EngineReplica, check: () => void) {
    this.host = host;
    this.target = target;
    this.check = check;
  }

  regionCopied(region: number): void {
    this.pending.push(region);
    this.pendingProgress.delete(region);
    this.kick();
  }

  /**
   * The copy of a region reached `end` (its chunks before `end` are on the target): once durable
   * there, the maps note the region copied up to it, so that a rebuild that stops midway copies
   * the region from there, not from its start (unless it is written meanwhile).
   */
  chunkCopied(end: number): void {
    const region = Math.floor((end - 1) / REGION_BYTES);
    const upTo = end - region * REGION_BYTES;
    if (upTo >= REGION_BYTES || end >= this.host.sizeBytes) return; // whole: regionCopied follows
    if ((this.pendingProgress.get(region) ?? 0) < upTo) this.pendingProgress.set(region, upTo);
    this.kick();
  }

  private kick(): void {
    if (this.running !== null || (this.pending.length === 0 && this.pendingProgress.size === 0)) return;
    this.running = this.flushThenClear().finally(() => {
      this.running = null;
      this.kick();
    });
  }

  private async flushThenClear(): Promise<void> {
    const waitMs = this.lastStartMs + (this.host.clientsBusy() ? COPY_FLUSH_BUSY_MS : COPY_FLUSH_MS) - this.host.nowMs();
    if (waitMs > 0) await this.host.sleep(waitMs);
    this.lastStartMs = this.host.nowMs();
    const regions = this.pending;
    this.pending = [];
    const progress = [...this.pendingProgress];
    this.pendingProgress = new Map();
    const client = this.target.client;
    if (client === null) return;
    try {
      await client.flush();
      this.check();
    } catch {
      // The target failed, or the rebuild stops: the regions stay in the maps (copied again).
      return;
    }
    const target = this.target;
    for (const r of this.host.replicas) {
      if (r !== target && r.mode === ReplicaMode.RW && r.client !== null) void this.host.controlOn(r, (c) => c.missedClear(target.key, regions, progress));
    }
  }

  /** Waits for the flushes under way and due (the rebuild's end makes everything durable itself). */
  async settle(): Promise<void> {
    while (this.running !== null) await this.running;
  }
}

/** Targets that answered COPY_FROM with UNSUPPORTED (an older replica): copied through the engine. */
const cannotPull = new WeakSet<EngineReplica>();

/** What a rebuild uses of its engine. */
export interface RebuildHost {
  readonly sizeBytes: number;
  /** Write-intent regions in the volume. */
  readonly regionCount: number;
  readonly replicas: readonly EngineReplica[];
  readonly set: ReplicaSet<DataClient>;
  /** The rebuild under way (cleared when it ends). */
  rebuilding: Rebuild<EngineReplica> | null;
  /** Range claims, while a rebuild or verify uses them. */
  readonly claims: RangeClaims | null;
  /** A lease on [start, end) of the live volume for a copy to `target` (recalled by client writes, revoked after the recall timeout). */
  acquireLease(target: EngineReplica, start: number, end: number, onRecall?: (id: number) => void, onRevoke?: (id: number) => void): Promise<number>;
  leaseWanted(id: number): boolean;
  releaseLease(id: number): void;
  /** Revokes a lease now (its copier is gone): the target refuses copy writes with it before the waiting client writes go on. */
  revokeLease(target: EngineReplica, id: number): void;
  /** Where regions are copied: a copier process (null: here, on the engine's event loop). */
  readonly copier: RegionCopier | null;
  readonly epoch: number;
  /**
   * A lease id no lease has, for pulls of snapshot layers: the target is out of the write set
   * then (no client write to recall it for), and the id is never revoked.
   */
  unleasedCopyId(): number;
  /** A turn to copy a region under a lease (fewer at once while clients are busy); resolves with its end. */
  copyTurn(): Promise<() => void>;
  clientsBusy(): boolean;
  readonly leaseCounters: LeaseCounters;
  /** Revokes one region may take before the rebuild fails. */
  readonly maxRegionRetries: number;
  /** Bytes a rebuild copies per chunk under a lease. */
  readonly copyChunkBytes: number;
  /** The target pulls each chunk from a source replica itself (COPY_FROM), not through the engine. */
  readonly copyPull: boolean;
  /** How often the target is flushed at most while snapshots are copied. */
  readonly snapshotCopyFlushMs: number;
  /** Client requests in flight. */
  readonly inflight: number;
  readonly faultedReason: string | null;
  faultError(): ZebuError;
  pickReader(exclude: Set<EngineReplica>): EngineReplica | null;
  setErr(r: EngineReplica, err: ZebuError): void;
  /** Runs `fn` on the replica's connection; a failure sets it ERR (an older replica's UNSUPPORTED is ignored). */
  controlOn(r: EngineReplica, fn: (client: DataClient) => Promise<unknown>): Promise<void>;
  /** Holds new client requests and waits until none is in flight; resume() lets them go. */
  pauseAndDrain(): Promise<void>;
  resume(): void;
  useClaims(): void;
  dropClaims(): void;
  flushNumbered(): Promise<void>;
  /** A flush of every replica with client I/O going on: nothing is held for it. */
  flushUnheld(): Promise<void>;
  handOverMissedMaps(target: EngineReplica): Promise<void>;
  alignCounters(): Promise<void>;
  /** A region is being written (as client writes count it: it stays in the write-intent logs); a verify's repair uses these. */
  regionsStarted(offset: number, length: number): void;
  regionsWritten(offset: number, length: number): void;
  /**
   * Runs one region's copy (resolving with the bytes it wrote to the target) under the rebuild's
   * bandwidth limit (rebuild-pacer.ts): without one, at once.
   */
  pacedCopy(copy: () => Promise<number>): Promise<number>;
  nowMs(): number;
  sleep(ms: number): Promise<void>;
  log(event: Record<string, unknown>): void;
}

/** Reads from a RW replica (not the target); a failing one is set ERR and the next one tried. */
async function readSource<T>(host: RebuildHost, target: EngineReplica, check: () => void, fn: (client: DataClient) => Promise<T>): Promise<T> {
  for (;;) {
    check();
    const source = host.pickReader(new Set([target]));
    if (source === null) throw host.faultError();
    const client = source.client!;
    try {
      return await fn(client);
    } catch (err) {
      const e = toZebuError(err);
      if (e.code === ErrorCode.EINVAL || e.code === ErrorCode.NOT_FOUND || isUnsupported(e)) throw e;
      if (source.client === client) host.setErr(source, e);
    }
  }
}

function rebuildCheck(host: RebuildHost, rebuild: Rebuild<EngineReplica>, target: EngineReplica): () => void {
  return () => {
    if (target.mode === ReplicaMode.ERR || target.client === null) throw new ZebuError(ErrorCode.EIO, `target failed: ${target.reason}`);
    if (rebuild.cancelled !== null) throw new ZebuError(ErrorCode.CLOSED, rebuild.cancelled);
    if (host.faultedReason !== null) throw host.faultError();
  };
}

/** The target joins the write set (no write in flight while it does); claims start with it. */
async function joinWriteSet(host: RebuildHost, target: EngineReplica, check: () => void): Promise<void> {
  await host.pauseAndDrain();
  try {
    check();
    // Nothing in flight: a write sent before it joined and acknowledged after would miss it.
    assert(host.inflight === 0, 'a replica joins the write set with a request in flight');
    host.set.join(target);
    host.useClaims();
  } finally {
    host.resume();
  }
}

/**
 * Copies region [offset, offset+length) of the live volume from a RW replica to the target, in
 * chunks under a region lease (leased-copy.ts), as `how` says what the target already holds:
 *
 * - `status`: a range the source holds nothing of (BLOCK_STATUS) is skipped when the target
 *   holds nothing there either (`zeroIfEmpty` false), else zeroed;
 * - `image`: the target has the volume's backing image; a range where the source holds only
 *   the image's bytes is skipped when the target does too (`zeroIfEmpty` false), else copied;
 * - `since`: the target reads as snapshot `snapshot` of the source, and a range the live
 *   volume has not changed since that snapshot is skipped.
 */
async function copyRegion(host: RebuildHost, target: EngineReplica, check: () => void, flusher: CopyFlusher, offset: number, length: number, how: RegionCopy): Promise<number> {
  if (host.copier !== null) {
    const copied = await copyRegionInCopier(host, host.copier, target, check, flusher, offset, length, how);
    if (copied !== null) return copied;
  }
  const copier: CopierHost = {
    acquireLease: (start, end) => host.acquireLease(target, start, end),
    leaseWanted: (id) => host.leaseWanted(id),
    releaseLease: (id) => host.releaseLease(id),
    copyTurn: () => host.copyTurn(),
    clientsBusy: () => host.clientsBusy(),
    sourceExtents: (kind, at, bytes) => kind.kind === 'status'
      ? readSource(host, target, check, (c) => c.request(Op.BLOCK_STATUS, 0, at, bytes)).then(decodeExtents)
      : readSource(host, target, check, (c) => c.snapshotChanges(null, kind.kind === 'since' ? kind.snapshot : null, at, bytes, kind.kind === 'image')),
    readSource: (at, bytes) => readSource(host, target, check, (c) => c.read(at, bytes)),
    writeTarget: (lease, at, data, bytes) => {
      check();
      return target.client!.copyWrite(lease, at, data, bytes);
    },
    pullChunk: !host.copyPull ? null : (lease, at, bytes, zeros) => pullFrom(host, target, check, lease, at, bytes, zeros, null),
    check,
    regionCopied: (at, bytes) => regionCopied(host, flusher, at, bytes),
    chunkCopied: (end) => flusher.chunkCopied(end),
    counters: host.leaseCounters,
    maxRetries: host.maxRegionRetries,
    chunkBytes: host.copyChunkBytes,
  };
  return copyRegionLeased(copier, offset, length, how);
}

/** The rest of a region, from where its copy began (its start, or where a stopped one got) to its end, is on the target. */
function regionCopied(host: RebuildHost, flusher: CopyFlusher, at: number, bytes: number): void {
  const region = Math.floor(at / REGION_BYTES);
  const end = Math.min(host.sizeBytes, (region + 1) * REGION_BYTES);
  assert(at + bytes === end, 'copier: only a region copied to its end leaves a missed-write map');
  flusher.regionCopied(region);
}

/**
 * The target pulls [offset, offset+length) from a source replica itself (COPY_FROM under
 * `leaseId`; with `snapshot`, that snapshot of the source). False: not done — an older target
 * (the engine copies through itself from then on), or the target could not read the source (the
 * engine reads it itself, and takes the source out if it fails, then reads from another).
 */
async function pullFrom(host: RebuildHost, target: EngineReplica, check: () => void, leaseId: number, offset: number, length: number, zeros: boolean, snapshot: string | null): Promise<boolean> {
  if (cannotPull.has(target)) return false;
  check();
  const source = host.pickReader(new Set([target]));
  if (source === null) throw host.faultError();
  try {
    await target.client!.copyFrom(leaseId, `${source.host}:${source.port}`, source.named ? source.key : null, offset, length, zeros, snapshot);
    return true;
  } catch (err) {
    const e = toZebuError(err);
    if (isUnsupported(e)) {
      cannotPull.add(target);
      return false;
    }
    if (e.code === ErrorCode.SOURCE_FAILED) return false;
    throw e;
  }
}

/**
 * A snapshot's region pulled by the target (pullFrom), under an id no lease has: the target is
 * out of the write set while snapshots are copied.
 */
function pullSnapshotRegion(host: RebuildHost, target: EngineReplica, check: () => void, name: string, offset: number, length: number): Promise<boolean> {
  let id = snapshotCopyIds.get(target);
  if (id === undefined) snapshotCopyIds.set(target, (id = host.unleasedCopyId()));
  return pullFrom(host, target, check, id, offset, length, true, name);
}

/** The id a target's snapshot pulls carry (one per target: never a lease, never revoked). */
const snapshotCopyIds = new WeakMap<EngineReplica, number>();

/** The RW replicas a copy to `target` reads from now, best first; the volume's fault when none. */
function copySources(host: RebuildHost, target: EngineReplica): EngineReplica[] {
  const first = host.pickReader(new Set([target]));
  if (first === null) throw host.faultError();
  return [first, ...host.replicas.filter((r) => r !== first && r !== target && r.mode === ReplicaMode.RW && r.client !== null)];
}

function endpoint(r: EngineReplica): CopyEndpoint {
  return { address: r.address, host: r.host, port: r.port, key: r.key, named: r.named };
}

/**
 * Copies the region in the copier process (copier-process.ts). A copier that died (or was
 * killed) costs a retry of the region, from its start, with a new one; past the retry limit the
 * rebuild fails. Null: the copier could not copy it for another reason (it could read no source,
 * could not reach the target): the region is copied here, where a failing replica is taken out.
 */
async function copyRegionInCopier(host: RebuildHost, copier: RegionCopier, target: EngineReplica, check: () => void, flusher: CopyFlusher, offset: number, length: number, how: RegionCopy): Promise<number | null> {
  const hooks: RegionCopyHooks = {
    acquireLease: async (start, end, onRecall, onRevoke) => {
      const id = await host.acquireLease(target, start, end, onRecall, onRevoke);
      host.leaseCounters.grants++;
      let sources: CopyEndpoint[];
      try {
        sources = copySources(host, target).map(endpoint);
      } catch (err) {
        host.releaseLease(id);
        throw err;
      }
      return { id, sources };
    },
    releaseLease: (id) => host.releaseLease(id),
    revokeLease: (id) => host.revokeLease(target, id),
    copyTurn: () => host.copyTurn(),
    clientsBusy: () => host.clientsBusy(),
    check,
    regionCopied: (at, bytes) => regionCopied(host, flusher, at, bytes),
    chunkCopied: (end) => flusher.chunkCopied(end),
    replayed: () => {
      host.leaseCounters.replays++;
    },
  };
  for (let lost = 0; ;) {
    check();
    const sources = copySources(host, target);
    try {
      return await copier.copy({
        epoch: host.epoch, target: endpoint(target), sources: sources.map(endpoint), offset, length, how,
        chunkBytes: host.copyChunkBytes, maxRetries: host.maxRegionRetries, pull: host.copyPull && !cannotPull.has(target),
      }, hooks);
    } catch (err) {
      if (err instanceof CopierGaveUp) throw err;
      check();
      const e = toZebuError(err);
      if (err instanceof CopierLost) {
        lost++;
        host.leaseCounters.copiersLost++;
        host.log({ event: 'rebuild-copier-lost', replica: target.address, offset, tries: lost, reason: e.message });
        if (lost > host.maxRegionRetries) {
          throw new ZebuError(ErrorCode.EIO, `region at offset ${offset} (${length} bytes): the copier process was lost ${lost} times while it copied it (${e.message}); gave up after ${host.maxRegionRetries} retries`);
        }
        continue;
      }
      host.log({ event: 'rebuild-copier-fallback', replica: target.address, offset, reason: e.message });
      return null;
    }
  }
}

/** The end of a rebuild: quiesce, make the copy durable with the source's write counter, RW. */
async function finishRebuild(host: RebuildHost, target: EngineReplica, check: () => void): Promise<void> {
  // What is not yet on disk — the copy's last writes on the target, client writes on every
  // replica — is written back first, with client I/O going on: the flush under the pause then
  // has only the last few milliseconds' writes to make durable. (Measured under fio 4k random
  // writes: the paused flush held client I/O 300-350 ms without this.)
  check();
  await host.flushUnheld();
  check();
  await host.pauseAndDrain();
  try {
    check();
    await host.flushNumbered();
    check();
    await host.handOverMissedMaps(target);
    check();
    await host.alignCounters();
    check();
    host.set.noteInfo(target, await target.client!.setRebuilding(null));
    check();
    // Whole again: no map may say otherwise. A map left behind (an invalid one above all) would
    // fail this replica again at every later start-up, and each time cost a full rebuild. Only
    // after the mark is cleared: a crash between the two leaves a complete replica with maps (a
    // redundant delta next time; the next start-up drops them), never a marked one without the
    // maps to finish its delta. The drops are sent now and not waited for: the replica is RW
    // from this moment, so were it lost while they are under way, it is lost as a RW replica and
    // new maps start behind the drops on the same connections — it comes back by a delta.
    // (Waited for before RW, a replica lost in between came back to no map: a full rebuild.)
    for (const r of host.replicas) if (r !== target && r.mode === ReplicaMode.RW) void host.controlOn(r, (c) => c.missedDrop(target.key));
    host.set.promote(target);
  } finally {
    host.rebuilding = null;
    host.resume();
  }
}

/**
 * A full rebuild that goes on over what its target completed before it stopped (its snapshots;
 * the engine checked that each is the volume's, on the same parent: fullResumeRefusal).
 */
export interface FullResume {
  /** The target's snapshots when it was added again. */
  snapshots: SnapshotInfo[];
  /** Snapshots found whole (every region hashing as the source's) and not copied again. */
  kept: string[];
  /**
   * The snapshot whose copy the stop cut short, gone on over what the target's head held of it:
   * its regions that hash as the source's were not copied again.
   */
  within: { snapshot: string; regionsKept: number; regionsCopied: number } | null;
  /** A snapshot of the target differs from the source's: it cannot go on (a new replica will). */
  refuse(why: string): void;
}

/** SHA-256 of `length` zero bytes, by length (a region's, the last one's). */
const zeroHashes = new Map<number, Buffer>();
function zeroHash(length: number): Buffer {
  let h = zeroHashes.get(length);
  if (h === undefined) {
    h = createHash('sha256').update(Buffer.alloc(length)).digest();
    zeroHashes.set(length, h);
  }
  return h;
}

export async function runFullRebuild(host: RebuildHost, rebuild: Rebuild<EngineReplica>, target: EngineReplica, plan: SnapshotCopyPlan, resume: FullResume | null = null): Promise<void> {
  const progress = target.rebuild!;
  const regionBytes = REGION_BYTES;
  const check = rebuildCheck(host, rebuild, target);
  const fromSource = <T>(fn: (client: DataClient) => Promise<T>): Promise<T> => readSource(host, target, check, fn);
  // On a backing image (the target has it too: addReplica checked): "empty" is the image's bytes.
  const aboveImage = target.info?.hasBase === true;
  const everyRegion = new Set<number>(Array.from({ length: Math.ceil(host.sizeBytes / regionBytes) }, (_, i) => i));
  let joined = false;
  try {
    // 0. From now until the end the copy is incomplete, and says so durably.
    host.set.noteInfo(target, await target.client!.setRebuilding('full'));
    // A target that goes on: its head holds part of a copy that stopped. When the next snapshot
    // to copy sits on the head's parent (most likely the one whose copy stopped), the head is
    // kept, and the regions it holds as the source has them (hashed, below) are not copied
    // again. Else it goes (the head is put back onto its snapshot), and where it sits on none,
    // the first copy over it writes the zeros too (it may hold anything below).
    const have = new Set(resume?.snapshots.map((x) => x.name) ?? []);
    let tip: string | null = null;
    let headUnknown = false;
    let underWay: string | null = null;
    if (resume !== null) {
      const head = snapshotCopyPlan(resume.snapshots).headParent;
      const next = plan.order.find((x) => !have.has(x.name));
      if (next !== undefined && next.parent === head) underWay = next.name;
      else if (head !== null) await target.client!.snapshotRevert(head);
      tip = head;
      headUnknown = head === null;
    }
    // 1. Every snapshot, parents before children: the target's head is moved (revert) onto the
    //    snapshot's parent, what the snapshot changed since that parent is written over it, and
    //    the head is snapshotted under the snapshot's name. A snapshot without a parent is
    //    written whole over the current tip — zeroing what holds data below but reads as zeros
    //    in the snapshot (a second root: its parent deleted; same data, another parent) — or,
    //    on a backing image, what differs from the image. At the end the head goes back onto
    //    the live volume's parent snapshot.
    //    `mayDiffer`: by snapshot (null: none yet), the regions where the target's view may
    //    differ from an empty volume (zeros, or the image).
    //    A snapshot the target completed before it stopped is kept when every region of it
    //    hashes as the source's (checked where both are, only hashes travel).
    const mayDiffer = new Map<string | null, Set<number>>([[null, headUnknown ? everyRegion : new Set()]]);
    let lastFlushMs = host.nowMs();
    for (const { name, parent } of plan.order) {
      if (have.has(name)) {
        const differ = new Set<number>();
        let mismatch: number | null = null;
        await forEachRegion(host, regionBytes, COPIERS, async (offset, length) => {
          const [theirs, ours] = await Promise.all([target.client!.regionHash(offset, length, name), fromSource((c) => c.regionHash(offset, length, name))]);
          check();
          if (!theirs.equals(ours)) mismatch ??= offset / regionBytes;
          if (aboveImage || !theirs.equals(zeroHash(length))) differ.add(offset / regionBytes);
          progress.copiedBytes += length;
        });
        check();
        if (mismatch !== null) {
          const why = `its snapshot ${name} differs from the source's in region ${mismatch}`;
          resume!.refuse(why);
          throw new ZebuError(ErrorCode.EINVAL, `replica ${target.address}: ${why}; it cannot go on with its rebuild`);
        }
        mayDiffer.set(name, differ);
        resume!.kept.push(name);
        continue;
      }
      if (parent !== null && parent !== tip) {
        await target.client!.snapshotRevert(parent);
        tip = parent;
      }
      const below = mayDiffer.get(tip) ?? everyRegion;
      const differ = new Set<number>(parent !== null ? below : []);
      const within = name === underWay ? { snapshot: name, regionsKept: 0, regionsCopied: 0 } : null;
      // Each region's copy resolves with the bytes it wrote to the target (the bandwidth limit's charge).
      await forEachRegion(host, regionBytes, COPIERS, (offset, length) => host.pacedCopy(async () => {
        const region = offset / regionBytes;
        progress.copiedBytes += length;
        if (host.nowMs() - lastFlushMs >= host.snapshotCopyFlushMs) {
          // One region's copy waits for it; the others go on meanwhile.
          lastFlushMs = host.nowMs();
          await target.client!.flush();
          check();
        }
        // `force`: the head holds other bytes in the region than the snapshot (a part copied
        // when the stop came, or something else): the region is written whole.
        let force = false;
        if (within !== null) {
          // Where neither the head holds anything (it reads as the parent) nor the snapshot
          // changed anything since the parent, there is nothing to compare or copy.
          const [held, changes] = await Promise.all([
            target.client!.snapshotChanges(null, tip, offset, length, false),
            fromSource((c) => c.snapshotChanges(name, parent, offset, length, parent === null && aboveImage)),
          ]);
          check();
          const holds = held.some((extent) => extent.data);
          if (!holds && !changes.some((extent) => extent.data)) return 0;
          if (holds) {
            const [theirs, ours] = await Promise.all([target.client!.regionHash(offset, length, null), fromSource((c) => c.regionHash(offset, length, name))]);
            check();
            if (theirs.equals(ours)) {
              within.regionsKept++;
              if (aboveImage || !theirs.equals(zeroHash(length))) differ.add(region);
              return 0;
            }
            force = true;
            within.regionsCopied++;
          }
        }
        if (host.copyPull && !cannotPull.has(target)) {
          // Only what changed since the parent (the target holds the parent's view), since the
          // image, or (a root) from zeros; where the target's view may differ, zeros too. The
          // target pulls the region from a source replica itself.
          const changes = await fromSource((c) => c.snapshotChanges(name, parent, offset, length, parent === null && aboveImage));
          const changed = changes.some((extent) => extent.data);
          if (!changed && !force && !(parent === null && below.has(region))) return 0;
          if (await pullSnapshotRegion(host, target, check, name, offset, length)) {
            if (changed) differ.add(region);
            return length;
          }
        }
        if (parent !== null || aboveImage) {
          // Only what changed since the parent (the target holds the parent's view), or since
          // the image.
          const changes = await fromSource((c) => c.snapshotChanges(name, parent, offset, length, parent === null));
          const changed = changes.some((extent) => extent.data);
          if (!changed && !force && !(parent === null && below.has(region))) return 0;
          const data = await fromSource((c) => c.readSnapshot(name, offset, length));
          check();
          if (isAllZero(data)) {
            await target.client!.writeZeroes(offset, length);
            return 0;
          }
          await target.client!.write(offset, data);
          if (changed) differ.add(region);
          return length;
        }
        const data = await fromSource((c) => c.readSnapshot(name, offset, length));
        check();
        if (!isAllZero(data)) {
          await target.client!.write(offset, data);
          differ.add(region);
          return length;
        }
        if (below.has(region) || force) await target.client!.writeZeroes(offset, length);
        return 0;
      }));
      check();
      if (within !== null) {
        resume!.within = within;
        host.log({ event: 'rebuild-snapshot-went-on', replica: target.address, ...within });
      }
      await target.client!.snapshotCreate(name);
      mayDiffer.set(name, differ);
      tip = name;
    }
    if (plan.headParent !== null && plan.headParent !== tip) {
      await target.client!.snapshotRevert(plan.headParent);
      tip = plan.headParent;
    }
    const differ = mayDiffer.get(tip) ?? everyRegion;
    if (resume !== null) host.log({ event: 'rebuild-snapshots-kept', replica: target.address, kept: resume.kept });

    // Maps the target kept from an earlier life name replicas as out that may be in the volume
    // now (and the snapshots just recreated made them invalid): left there, one would later
    // stand for a replica that never left and deny it its delta rebuild (found by the
    // simulator). Only maps started from now (it joins next) and those handed over at the end
    // are whole. (An older replica without maps has none to drop.)
    await host.controlOn(target, (c) => c.missedPrune([]));
    check();

    // 2. From here on a stop is resumed, as a delta rebuild: every RW replica starts a
    //    missed-write map for the target naming every region, a region copied whole leaves the
    //    maps (regionCopied), and any write the target misses later adds its region again. Then
    //    the mark says "delta": the next engine, or this one when the target comes back, copies
    //    what the maps name (and the active regions) instead of starting over. The snapshots
    //    made above stay: the target's chain is the volume's from now on.
    await resumableFromHere(host, target, check);

    // 3. Join the write set, then copy the live volume: what changed since its parent snapshot
    //    (the target's head sits on it), or, without one, everything (over the image).
    await joinWriteSet(host, target, check);
    joined = true;
    const flusher = new CopyFlusher(host, target, check);
    await forEachRegion(host, regionBytes, LEASED_COPIERS, async (offset, length) => {
      const zeroIfEmpty = differ.has(offset / regionBytes);
      await host.pacedCopy(() => copyRegion(host, target, check, flusher, offset, length, liveRegionCopy(tip, aboveImage, zeroIfEmpty)));
      progress.copiedBytes += length;
    }).finally(() => flusher.settle());

    // 4. Quiesce, make the copy durable with the source's write counter, and serve reads from it.
    await finishRebuild(host, target, check);
  } finally {
    if (host.rebuilding === rebuild) host.rebuilding = null;
    if (joined) host.dropClaims();
  }
}

/**
 * A full rebuild whose snapshots are in place becomes resumable: maps on every RW replica name
 * every region for the target (durably), then the target's mark says "delta". A replica that
 * cannot keep a map (an older one) is skipped: the union of the others' maps still names every
 * region not copied. With no map anywhere the mark stays "full" (a stop starts over).
 */
async function resumableFromHere(host: RebuildHost, target: EngineReplica, check: () => void): Promise<void> {
  const every = Array.from({ length: host.regionCount }, (_, i) => i);
  let held = 0;
  await Promise.all(host.replicas.filter((r) => r !== target && r.mode === ReplicaMode.RW && r.client !== null).map(async (r) => {
    const client = r.client!;
    try {
      // A map left from an earlier life of this key (invalid, or stale) gives way to the new one.
      await client.missedDrop(target.key);
      await client.missedMerge(target.key, every, false);
      held++;
    } catch (err) {
      const e = toZebuError(err);
      if (!isUnsupported(e) && r.client === client) host.setErr(r, e);
    }
  }));
  check();
  if (held > 0) host.set.noteInfo(target, await target.client!.setRebuilding('delta'));
}

/**
 * A delta rebuild: the target held the volume until it went out; since then the RW replicas
 * recorded in a missed-write map which regions were written. Copied: the map (read once the
 * target is in the write set: nothing it misses from then on), the target's own active regions
 * (its writes that the others may not have) and the source's. Its maps are dropped at the end
 * (finishRebuild), as after a full rebuild.
 */
export async function runDeltaRebuild(host: RebuildHost, rebuild: Rebuild<EngineReplica>, target: EngineReplica, mapHolder: EngineReplica): Promise<void> {
  const progress = target.rebuild!;
  const check = rebuildCheck(host, rebuild, target);
  let joined = false;
  try {
    await target.client!.setRebuilding('delta');
    // Before it joins: once it takes this engine's flushes its old active regions may leave.
    // Into the maps with them, durably: if this copy stops midway, the next engine copies the
    // delta again from the maps, and must not miss what only the target wrote before it went out.
    const targetActive = (await target.client!.intentGet()).active;
    await Promise.all(host.replicas.filter((r) => r !== target && r.mode === ReplicaMode.RW && r.client !== null).map(async (r) => {
      const client = r.client!;
      const has = await client.missedGet(target.key).then(() => true, () => false);
      if (has) await host.controlOn(r, (c) => c.missedMerge(target.key, targetActive, false));
    }));
    // Maps it kept from before it went out missed writes: only maps started from now are whole.
    await target.client!.missedPrune([]);
    await joinWriteSet(host, target, check);
    joined = true;
    check();
    if (mapHolder.mode !== ReplicaMode.RW || mapHolder.client === null) throw new ZebuError(ErrorCode.EIO, `replica ${mapHolder.address} holding the missed-write map failed`);
    const [missed, holderIntent] = await Promise.all([mapHolder.client.missedMap(target.key), mapHolder.client.intentGet()]);
    const regions = deltaRegions(missed.regions, targetActive, holderIntent.active, host.regionCount);
    // Where a stopped copy of a region got (durably on the target, the region not written since):
    // it goes on from there. A region either side holds active is copied whole.
    const from = copiedFronts(missed.partial, targetActive, holderIntent.active, REGION_BYTES);
    let resumedBytes = 0;
    for (const region of regions) {
      progress.totalBytes += regionRange(region, REGION_BYTES, host.sizeBytes).length - (from.get(region) ?? 0);
      resumedBytes += from.get(region) ?? 0;
    }
    host.log({ event: 'delta-rebuild-regions', replica: target.address, regions: regions.length, bytes: progress.totalBytes, partlyCopied: from.size, bytesNotCopiedAgain: resumedBytes });
    const flusher = new CopyFlusher(host, target, check);
    await forEachIndex(regions.length, LEASED_COPIERS, async (i) => {
      const range = regionRange(regions[i], REGION_BYTES, host.sizeBytes);
      const noted = from.get(regions[i]) ?? 0;
      const skip = noted < range.length ? noted : 0;
      // The target may hold anything there: a region the source holds nothing of is zeroed
      // (or, on a backing image, given the image's bytes).
      await host.pacedCopy(() => copyRegion(host, target, check, flusher, range.offset + skip, range.length - skip, target.info?.hasBase === true ? { kind: 'image', zeroIfEmpty: true } : { kind: 'status', zeroIfEmpty: true }));
      progress.copiedBytes += range.length - skip;
    }).finally(() => flusher.settle());
    await finishRebuild(host, target, check);
  } finally {
    if (host.rebuilding === rebuild) host.rebuilding = null;
    if (joined) host.dropClaims();
  }
}

/**
 * Runs `fn` over the volume in regions, `parallel` at a time (a copy is round trips to two
 * replicas: several in flight keep both busy). The first failure stops the others.
 */
async function forEachRegion(host: RebuildHost, regionBytes: number, parallel: number, fn: (offset: number, length: number) => Promise<unknown>): Promise<void> {
  const count = Math.ceil(host.sizeBytes / regionBytes);
  await forEachIndex(count, parallel, (i) => {
    const { offset, length } = regionRange(i, regionBytes, host.sizeBytes);
    return fn(offset, length);
  });
}

