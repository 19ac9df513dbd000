/**
 * The verify sequence: every region hashed on every RW replica under a claim against client
 * writes (so it runs under live I/O), compared with the source's hash, and with `repair` copied
 * from the source into the replicas that differ. Which replica is the source, and which differ,
 * is decided in verify.ts; here are the steps and the requests. The engine hands in what a
 * verify needs of it (`VerifyHost`), refuses a second one, and keeps the last report.
 */
import { ErrorCode, ZebuError, toZebuError } from '../errors.ts';
import type { DataClient } from '../protocol/client.ts';
import type { RebuildHost } from './rebuild-sequence.ts';
import { ReplicaMode, type EngineReplica as SetMember } from './replica-set.ts';
import { COPIERS, REGION_BYTES, forEachIndex, isUnsupported, regionRange, type VerifyReport } from './recovery.ts';
import { VerifyTally, differingFromSource, verifySource } from './verify.ts';

type EngineReplica = SetMember<DataClient>;

/** What a verify uses of its engine (the engine hands in the host its rebuilds use). */
export type VerifyHost = Pick<RebuildHost,
  'sizeBytes' | 'replicas' | 'claims' | 'faultedReason' | 'faultError' | 'pickReader' | 'setErr' | 'controlOn' |
  'pauseAndDrain' | 'resume' | 'useClaims' | 'dropClaims' | 'flushNumbered' | 'regionsStarted' | 'regionsWritten' | 'nowMs' | 'log'>;

/** REGION_HASH on one replica (hex), null when the replica failed (it is set ERR). */
async function regionHashOn(host: VerifyHost, r: EngineReplica, offset: number, length: number): Promise<string | null> {
  const client = r.client;
  if (client === null) return null;
  try {
    return (await client.regionHash(offset, length)).toString('hex');
  } catch (err) {
    const e = toZebuError(err);
    if (isUnsupported(e) || e.code === ErrorCode.EINVAL) throw new ZebuError(e.code, `replica ${r.address} cannot hash regions: ${e.message}`);
    if (r.client === client) host.setErr(r, e);
    return null;
  }
}

/** Compares (and with `repair` mends) every region of the volume; the engine's checks come first. */
export async function runVerify(host: VerifyHost, repair: boolean): Promise<VerifyReport> {
  const started = host.nowMs();
  let claimed = false;
  try {
    await host.pauseAndDrain();
    try {
      host.useClaims();
      claimed = true;
    } finally {
      host.resume();
    }
    const claims = host.claims!;
    const first = host.pickReader(new Set());
    if (first === null) throw host.faultError();
    let source: EngineReplica = first;
    const compared = host.replicas.filter((r) => r.mode === ReplicaMode.RW && r.client !== null);
    const tally = new VerifyTally();
    const regionCount = Math.ceil(host.sizeBytes / REGION_BYTES);
    await forEachIndex(regionCount, COPIERS, async (region) => {
      const { offset, length } = regionRange(region, REGION_BYTES, host.sizeBytes);
      const claim = await claims.claim(offset, offset + length);
      try {
        let now: EngineReplica[];
        let hashes: (string | null)[];
        for (;;) {
          if (host.faultedReason !== null) throw host.faultError();
          now = compared.filter((r) => r.mode === ReplicaMode.RW && r.client !== null);
          const next = verifySource(source, now);
          if (next !== source) host.log({ event: 'verify-source-changed', from: source.address, to: next.address, reason: source.reason });
          source = next;
          hashes = await Promise.all(now.map((r) => regionHashOn(host, r, offset, length)));
          // A source that failed while hashing: hash again against the next one.
          if (source.mode === ReplicaMode.RW) break;
        }
        const bad = differingFromSource(now, hashes, source);
        if (bad.length === 0) return;
        tally.differs(region, offset, length, now, hashes);
        host.log({ event: 'verify-difference', region, offset, length, replicas: bad.map((r) => r.address) });
        if (!repair) return;
        const data = await source.client!.read(offset, length);
        // Counted as a write to the region, as the replicas count it.
        host.regionsStarted(offset, length);
        try {
          await Promise.all(bad.map((r) => host.controlOn(r, (c) => c.write(offset, data))));
        } finally {
          host.regionsWritten(offset, length);
        }
        tally.repaired++;
      } finally {
        claims.release(claim);
      }
    });
    if (tally.repaired > 0) await host.flushNumbered();
    const report = tally.report(new Date(), repair, regionCount, compared.map((r) => r.address), source.address, host.nowMs() - started);
    host.log({ event: 'verify', repair, regions: regionCount, differing: tally.differingCount, repaired: tally.repaired, durationMs: report.durationMs });
    return report;
  } finally {
    if (claimed) host.dropClaims();
  }
}
