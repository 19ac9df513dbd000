/**
 * Verify's decisions: which replicas differ in a region, and the report. Pure: the engine hashes
 * each region on every RW replica (REGION_HASH) under a claim against client writes and hands
 * the hashes here.
 *
 * - The source (a local RW replica, else the first) is the reference; a replica that differs from
 *   it is reported, and with `repair` the region is copied from the source into it.
 * - A replica that failed while hashing (null) is out (ERR) and compared no more. A source that
 *   failed hands over to another replica still compared (the region is hashed again); with none
 *   left the verify fails — there is nothing left to compare with.
 */
import { assert, ErrorCode, ZebuError } from '../errors.ts';
import type { VerifyDifference, VerifyReport } from './recovery.ts';
import { ReplicaMode } from './replica-set.ts';

/** At most this many differences are kept in a report (all are counted). */
export const MAX_REPORTED_DIFFERENCES = 1000;

/**
 * The source to compare against: the current one while it serves (RW), else the first of the
 * replicas still compared. Throws when none is left.
 */
export function verifySource<M extends { address: string; reason: string | null; mode: ReplicaMode; client: unknown }>(current: M, compared: M[]): M {
  if (current.mode === ReplicaMode.RW && current.client !== null) return current;
  const next = compared.find((m) => m.mode === ReplicaMode.RW && m.client !== null);
  if (next === undefined) throw new ZebuError(ErrorCode.EIO, `verify source ${current.address} failed: ${current.reason}`);
  return next;
}

/** The members whose hash differs from the source's; throws when the source has none. */
export function differingFromSource<M extends { address: string; reason: string | null }>(members: M[], hashes: (string | null)[], source: M): M[] {
  assert(members.length === hashes.length, 'one hash per replica compared');
  const at = members.indexOf(source);
  const sourceHash = at < 0 ? null : hashes[at];
  if (sourceHash === null) throw new ZebuError(ErrorCode.EIO, `verify source ${source.address} failed: ${source.reason}`);
  return members.filter((_, i) => hashes[i] !== null && hashes[i] !== sourceHash);
}

/** Collects a verify's differences and repairs into its report. */
export class VerifyTally {
  private readonly differing: VerifyDifference[] = [];
  /** Regions that differed (the report keeps the first MAX_REPORTED_DIFFERENCES). */
  differingCount = 0;
  repaired = 0;

  /** Region `region` differs; `hashes` by address of every replica that answered. */
  differs(region: number, offset: number, length: number, members: { address: string }[], hashes: (string | null)[]): void {
    this.differingCount++;
    if (this.differing.length >= MAX_REPORTED_DIFFERENCES) return;
    const byAddress: Record<string, string> = {};
    for (const [i, m] of members.entries()) if (hashes[i] !== null) byAddress[m.address] = hashes[i]!;
    this.differing.push({ region, offset, length, hashes: byAddress });
  }

  report(at: Date, repair: boolean, regions: number, replicas: string[], source: string, durationMs: number): VerifyReport {
    assert(this.repaired <= this.differingCount, 'more regions repaired than differed');
    const differing = [...this.differing].sort((a, b) => a.region - b.region);
    return { at: at.toISOString(), repair, regions, replicas, source, differing, repaired: this.repaired, durationMs };
  }
}
