/**
 * Pieces of start-up recovery, delta rebuilds and verify that need no engine state: region
 * geometry, chains by snapshot name, a bounded worker pool, and the reports they produce.
 */
import type { SnapshotInfo } from '../replica/replica.ts';
import { ErrorCode, type ZebuError } from '../errors.ts';
import { INTENT_REGION_BYTES } from '../replica/intent-log.ts';

/** Rebuilds, recovery and verify work in the write-intent log's regions. */
export const REGION_BYTES = INTENT_REGION_BYTES;
/** Regions copied (or compared) at once: a copy is round trips to two replicas, several keep both busy. */
export const COPIERS = 4;

/** What start-up recovery did (engine info `recovery`, event `recovery`). */
export interface RecoveryReport {
  at: string;
  /** Every replica opened, had closed cleanly, and held the source's counters. */
  clean: boolean;
  /** Address of the source replica (null: none usable, the volume is faulted). */
  source: string | null;
  /** Regions compared (the union of the replicas' active regions) before serving. */
  checkedRegions: number;
  /** Of those, regions that differed and were copied from the source into the other RW replicas. */
  regions: number;
  /** Bytes copied. */
  bytes: number;
  durationMs: number;
  /** Replicas behind the source that come back by a delta rebuild (addresses). */
  deltaReplicas: string[];
  /** Replicas that start ERR, with the reason. */
  erredReplicas: { address: string; reason: string }[];
}

export interface VerifyDifference {
  region: number;
  offset: number;
  length: number;
  /** SHA-256 (hex) of the region on each RW replica compared, by address. */
  hashes: Record<string, string>;
}

export interface VerifyReport {
  at: string;
  repair: boolean;
  /** Regions compared. */
  regions: number;
  /** Replicas compared (the RW ones when the verify started). */
  replicas: string[];
  /** Address of the replica the others were compared with (and repaired from). */
  source: string | null;
  differing: VerifyDifference[];
  /** Regions copied from the source into the replicas that differed. */
  repaired: number;
  durationMs: number;
}

/** Byte range of region `region`, clipped to the volume. */
export function regionRange(region: number, regionBytes: number, sizeBytes: number): { offset: number; length: number } {
  const offset = region * regionBytes;
  return { offset, length: Math.min(regionBytes, sizeBytes - offset) };
}

/** Snapshot names of the live chain, oldest first: what a delta rebuild requires to be equal. */
export function chainNames(snapshots: SnapshotInfo[]): string[] {
  const byId = new Map(snapshots.map((x) => [x.id, x]));
  const inChain = snapshots.filter((x) => x.inChain);
  // The tip is the in-chain snapshot no other in-chain snapshot has as its parent.
  const parents = new Set(inChain.map((x) => x.parent));
  let at = inChain.find((x) => !parents.has(x.id)) ?? null;
  const names: string[] = [];
  while (at !== null && names.length <= snapshots.length) {
    names.push(at.name);
    at = at.parent !== null ? byId.get(at.parent) ?? null : null;
  }
  return names.reverse();
}

/**
 * Runs fn(0) … fn(count-1), `concurrency` at a time (each is round trips to replicas: several in
 * flight keep them busy). The first failure stops the rest and is thrown.
 */
export async function forEachIndex(count: number, concurrency: number, fn: (i: number) => Promise<unknown>): Promise<void> {
  let next = 0;
  let failure: unknown = null;
  const worker = async (): Promise<void> => {
    while (failure === null && next < count) {
      const i = next++;
      try {
        await fn(i);
      } catch (err) {
        failure ??= err;
      }
    }
  };
  await Promise.all(Array.from({ length: Math.min(concurrency, Math.max(count, 1)) }, worker));
  if (failure !== null) throw failure;
}

/** An error from a replica that does not know an op (an older replica): the engine goes on without it. */
export function isUnsupported(err: ZebuError): boolean {
  return err.code === ErrorCode.UNSUPPORTED;
}
