/**
 * The copier: copies one region of the live volume from a source replica to the rebuild's
 * target in chunks, under a region lease from the engine, so that client writes to the region
 * wait at most for one chunk instead of for the whole region.
 *
 *   acquire a lease on [committed, end) → ask the source what it holds there → for each chunk:
 *   read the source, write the target with the lease id, advance `committed` → release.
 *
 * - Recall (a client write waits for the lease): the copier finishes the chunk under way — at
 *   least one chunk since the lease was granted, so it always progresses — releases, and takes
 *   a new lease on what is left. The client write goes meanwhile; it reaches the target too
 *   (the target is WO), so what lies before `committed` stays right.
 * - Revoke (the copier did not release within the recall timeout): the engine told the target,
 *   and the client write went on. The target refuses the copier's next write with LEASE_REVOKED:
 *   that chunk was read before the client write. The copier replays from `committed`. A region
 *   revoked more than `maxRetries` times fails the rebuild, naming the region and the cause.
 *
 * Progress that survives restarts is kept by the RW replicas for the target (rebuild-sequence.ts):
 * a missed-write map naming the regions still to copy, which a region copied to its end leaves
 * (regionCopied), and for a region under way how far its copy got (chunkCopied, once durable on
 * the target). A rebuild that stops midway goes on as a delta rebuild from those: a region under
 * way from the last chunk noted, unless it was written since.
 */
import { ZebuError, ErrorCode, assert, toZebuError } from '../errors.ts';
import type { WireExtent } from '../protocol/frames.ts';
import type { RegionCopy } from './rebuild-plan.ts';
import { isAllZero } from '../os/zeros.ts';

/** Bytes copied per chunk (default): what a client write to a leased region waits for at most. */
export const COPY_CHUNK_BYTES = 256 * 1024;

/** The counters of the lease protocol (the engine shows them in its info and stats). */
export interface LeaseCounters {
  /** Leases granted. */
  grants: number;
  /** Leases a client write recalled. */
  recalls: number;
  /** Leases revoked after the recall timeout. */
  revokes: number;
  /** Chunks copied again from the committed offset after a revoke. */
  replays: number;
  /** Copier processes that died (or were killed) while they copied: their regions were copied again. */
  copiersLost: number;
}

export function emptyLeaseCounters(): LeaseCounters {
  return { grants: 0, recalls: 0, revokes: 0, replays: 0, copiersLost: 0 };
}

/** What the copier uses of the engine: the lease authority, the source and the target. */
export interface CopierHost {
  /** A lease on [start, end), granted once no client write to it is in flight. */
  acquireLease(start: number, end: number): Promise<number>;
  /** Whether a client write waits for lease `id` (or it was revoked: it is no longer held). */
  leaseWanted(id: number): boolean;
  releaseLease(id: number): void;
  /** A turn to copy a region (fewer at once while clients are busy); resolves with the function that ends it. */
  copyTurn(): Promise<() => void>;
  /** Whether clients use the volume now (no read-ahead then: it would take a turn's worth more). */
  clientsBusy(): boolean;
  /** Where the source's view may hold data in the range (`how` says against what). */
  sourceExtents(how: RegionCopy, offset: number, length: number): Promise<WireExtent[]>;
  readSource(offset: number, length: number): Promise<Buffer>;
  /** A copy write to the target under the lease (data null: zeros). */
  writeTarget(leaseId: number, offset: number, data: Buffer | null, length: number): Promise<void>;
  /**
   * The target pulls the chunk from a source replica itself under the lease (COPY_FROM; `zeros`:
   * a chunk of zeros is marked zero). False: not done — the target cannot pull, or the source
   * failed — and the copier reads and writes the chunk itself. Null: never pull.
   */
  pullChunk: ((leaseId: number, offset: number, length: number, zeros: boolean) => Promise<boolean>) | null;
  /** Throws when the rebuild must stop (target failed, rebuild cancelled, volume faulted). */
  check(): void;
  /**
   * The whole region is on the target: once durable there it leaves the target's missed-write
   * maps, so that a rebuild that stops later goes on without it. Not waited for.
   */
  regionCopied(offset: number, length: number): void;
  /** The copy reached `end` (every chunk before it is on the target); not waited for. */
  chunkCopied(end: number): void;
  readonly counters: LeaseCounters;
  readonly maxRetries: number;
  /** Bytes per chunk, a multiple of 4 KiB (a whole region: the region is held as one lock, the old way). */
  readonly chunkBytes: number;
}

/** Errors of regions given up after too many revokes: the rebuild fails with them (nothing retries them). */
const givenUp = new WeakSet<object>();

export function regionGivenUp(err: unknown): boolean {
  return typeof err === 'object' && err !== null && givenUp.has(err);
}

/** Copies [offset, offset+length) of the live volume to the target; returns the bytes written to it. */
export async function copyRegionLeased(host: CopierHost, offset: number, length: number, how: RegionCopy): Promise<number> {
  const end = offset + length;
  let committed = offset;
  let written = 0;
  let revokes = 0;
  while (committed < end) {
    host.check();
    // Client I/O comes first: while clients are busy, few regions are copied at once. The turn is
    // taken before the lease, so that no lease is held while its copy waits for a turn.
    const endTurn = await host.copyTurn();
    let lease = 0;
    let progressed = false;
    try {
      host.check();
      lease = await host.acquireLease(committed, end);
      host.counters.grants++;
      host.check();
      const extents = await host.sourceExtents(how, committed, end - committed);
      const needsData = (at: number, to: number): boolean =>
        (how.kind === 'image' && how.zeroIfEmpty) || extents.some((e) => e.data && e.offset < to && at < e.offset + e.length);
      // While clients are quiet, the next chunk's source read goes out with this chunk's: under
      // the lease no client write changes the region, so what it returns is still right when it
      // is used. A read not used (recalled, failed) is dropped.
      const ahead: { at: number; data: Promise<Buffer> | null } = { at: -1, data: null };
      const sourceRead = (at: number, to: number): Promise<Buffer> | null => {
        if (ahead.at === at && ahead.data !== null) return ahead.data;
        if (!needsData(at, to)) return null;
        const data = host.readSource(at, to - at);
        data.catch(() => {});
        return data;
      };
      const readAhead = (at: number): void => {
        ahead.at = at;
        ahead.data = null;
        if (at >= end || host.clientsBusy()) return;
        ahead.data = sourceRead(at, Math.min(end, at + host.chunkBytes));
      };
      const copyChunk = async (at: number, to: number): Promise<void> => {
        // Replica to replica: the data does not pass through here.
        if (host.pullChunk !== null && needsData(at, to) && await host.pullChunk(lease, at, to - at, how.kind !== 'status')) {
          written += to - at;
          return;
        }
        const read = sourceRead(at, to);
        if (host.pullChunk === null) readAhead(to);
        if (read !== null) {
          const data = await read;
          assert(data.length === to - at, 'copier: the source returned a short read');
          host.check();
          // Zeros over an image, or zeroed since the snapshot, are marked, not written.
          const zeros = how.kind !== 'status' && isAllZero(data);
          await host.writeTarget(lease, at, zeros ? null : data, to - at);
          written += to - at;
        } else if (how.kind === 'status' && how.zeroIfEmpty) {
          await host.writeTarget(lease, at, null, to - at);
          written += to - at;
        }
      };
      let chunkWrote = false;
      while (committed < end) {
        // Recalled: give the region back after one chunk (progress is guaranteed per grant).
        if (progressed && host.leaseWanted(lease)) break;
        // Clients busy: one chunk that wrote something per turn, so that the turn's rest (the
        // engine's) comes between chunks and the copy's load on the replicas is spread out
        // instead of coming in region-long bursts. (Chunks with nothing to copy cost nothing: a
        // sparse region is still gone through in one turn.)
        if (chunkWrote && host.clientsBusy()) break;
        const chunkEnd = Math.min(end, committed + host.chunkBytes);
        const writtenBefore = written;
        await copyChunk(committed, chunkEnd);
        chunkWrote = written > writtenBefore;
        committed = chunkEnd;
        progressed = true;
        if (committed < end) host.chunkCopied(committed);
      }
      if (committed === end) {
        // Every client write to the region since the copy began reached the target too.
        host.check();
        host.regionCopied(offset, length);
      }
    } catch (err) {
      const e = toZebuError(err);
      if (e.code !== ErrorCode.LEASE_REVOKED) throw e;
      revokes++;
      host.counters.replays++;
      if (revokes > host.maxRetries) {
        const gaveUp = new ZebuError(ErrorCode.EIO, `region at offset ${offset} (${length} bytes): its lease was revoked ${revokes} times (the copy did not give it back within the recall timeout); gave up after ${host.maxRetries} retries`);
        givenUp.add(gaveUp);
        throw gaveUp;
      }
    } finally {
      if (lease !== 0) host.releaseLease(lease);
      endTurn();
    }
  }
  return written;
}
