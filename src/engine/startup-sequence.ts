/**
 * The engine's start-up sequence: probe every replica (waiting a while for those that are not up
 * yet), read what the missed-write maps say of the others, decide with startup.ts which replicas
 * serve, which wait for a delta rebuild and which are out, then recover before the first
 * request: maps for the replicas out, the regions where the replicas may differ (the union of
 * their write-intent logs) compared and copied from the source, the counters aligned. The
 * decisions are in startup.ts; here are the requests and their order. The engine hands in what
 * start-up needs of it (`StartupHost`).
 */
import { ZebuError, ErrorCode, toZebuError } from '../errors.ts';
import type { DataClient } from '../protocol/client.ts';
import type { ReplicaInfo } from '../replica/replica.ts';
import { ReplicaMode, type ReplicaSet, type EngineReplica as SetMember } from './replica-set.ts';
import { planStartup, chooseSource, furthestAhead, mapHolders, NO_MISSED, type MissedStatus, type StartupCandidate, type StartupPlan } from './startup.ts';
import { COPIERS, REGION_BYTES, chainNames, forEachIndex, isUnsupported, regionRange, type RecoveryReport } from './recovery.ts';
import type { Clock } from '../os/clock.ts';

type EngineReplica = SetMember<DataClient>;

/** Start-up retries unreachable replicas this often at most (it starts faster, then backs off). */
const REPLICA_RETRY_MS_MAX = 1000;
/** A start-up still waiting says so in its log this often. */
const WAIT_LOG_EVERY_MS = 5000;
/**
 * A start-up resync of more regions than this goes in batches, each made durable and released:
 * a batch ends after this many regions, or after RESYNC_BATCH_MS, whichever comes first (an
 * engine killed every second must still keep some of its work).
 */
const RESYNC_BATCH_REGIONS = 16;
const RESYNC_BATCH_MS = 300;

/** What start-up uses of its engine. */
export interface StartupHost {
  readonly name: string;
  readonly sizeBytes: number;
  readonly clock: Clock;
  readonly replicas: readonly EngineReplica[];
  readonly set: ReplicaSet<DataClient>;
  /** How long start-up waits for replicas that cannot be reached yet. */
  readonly replicaWaitMs: number;
  /** Keys of replicas known to be out: probed along, not waited for. */
  readonly outReplicas: readonly string[];
  readonly closed: boolean;
  readonly faultedReason: string | null;
  /** While start-up waits: the keys it waits for, and since when (shown by info()). */
  waitingFor: string[];
  waitingSince: string | null;
  /** When each step ended (ms from the start), for the log. */
  readonly phaseTimes: Record<string, number>;
  /** Replicas that wait for their delta rebuild once the engine serves (start-up appends). */
  readonly pendingDeltas: EngineReplica[];
  recoveryReport: RecoveryReport | null;
  connect(host: string, port: number): Promise<DataClient>;
  /** OPEN, and a check that the replica is the one asked for. */
  openChecked(client: DataClient, key: string, keyIsName: boolean): Promise<ReplicaInfo>;
  setErr(r: EngineReplica, err: ZebuError): void;
  controlOn(r: EngineReplica, fn: (client: DataClient) => Promise<unknown>): Promise<void>;
  /** Counts `region` active with the flush stamp `stamp` (the bound on active regions). */
  markActive(region: number, stamp: number): void;
  flushNumbered(options?: { evict?: boolean }): Promise<void>;
  alignCounters(): Promise<void>;
  /** The replicas as info() shows them (for the log). */
  replicaStatus(): readonly object[];
  log(event: Record<string, unknown>): void;
}

/**
 * Errors after which a replica may still turn up during start-up: nothing listens there yet (its
 * process is starting), the connection broke, or another replica answered at its address (its
 * own address is about to be handed over).
 */
function mayStillCome(err: ZebuError): boolean {
  return err.code === ErrorCode.DISCONNECTED || err.code === ErrorCode.TIMEOUT || err.code === ErrorCode.CLOSED || err.code === ErrorCode.WRONG_REPLICA;
}

/** What start-up needs of one replica: opened (grown if the volume grew), its log and chain. */
async function probe(host: StartupHost, r: EngineReplica): Promise<StartupCandidate & { retry: boolean }> {
  let client: DataClient | null = null;
  try {
    const address = r.address;
    client = await host.connect(r.host, r.port);
    let info = await host.openChecked(client, r.key, r.named);
    if (host.closed) throw new ZebuError(ErrorCode.CLOSED, `volume ${host.name}: the engine closed during its start-up`);
    // An address handed over while this one was being opened (setStartupAddresses) is where
    // the replica is: the next probe goes there.
    if (r.address !== address) throw new ZebuError(ErrorCode.WRONG_REPLICA, `${r.key} moved to ${r.address} while ${address} was being opened`);
    // Only now is it the replica asked for: until here an address handed over applies to it.
    r.client = client;
    if (info.sizeBytes < host.sizeBytes && !info.rebuilding) {
      // The volume grew while this replica was away (or offline): grow it before the
      // modes are chosen, so that a complete replica is not failed for its size alone.
      try {
        info = await client.expand(host.sizeBytes);
      } catch (err) {
        throw new ZebuError(toZebuError(err).code, `cannot grow from ${info.sizeBytes} to ${host.sizeBytes} bytes: ${(err as Error).message}`);
      }
      host.log({ event: 'replica-expanded', replica: r.address, sizeBytes: host.sizeBytes });
    }
    host.set.noteInfo(r, info);
    let active: number[] | null = null;
    let mapsFor: string[] | null = null;
    try {
      const intent = await client.intentGet();
      if (intent.regionBytes !== REGION_BYTES) throw new ZebuError(ErrorCode.EINVAL, `write-intent regions of ${intent.regionBytes} bytes, the engine uses ${REGION_BYTES}`);
      active = intent.active;
      mapsFor = [...Object.keys(intent.missed), ...(intent.invalidMissed ?? [])];
    } catch (err) {
      if (!isUnsupported(toZebuError(err))) throw err;
    }
    const chain = chainNames(await client.snapshotList());
    return { key: r.key, info, error: null, chain, active, mapsFor, retry: false };
  } catch (err) {
    const e = toZebuError(err);
    if (r.client === client) r.client = null;
    client?.close();
    return { key: r.key, info: null, error: e.message, chain: null, active: null, retry: mayStillCome(e) };
  }
}

/**
 * Probes every replica; those that cannot be reached yet (mayStillCome) are probed again, a
 * little less often each time, until every replica start-up waits for has answered or
 * replicaWaitMs has passed. A replica known to be out (options.outReplicas) is probed along but
 * not waited for. An opened replica whose connection drops meanwhile is probed again.
 */
async function probeAll(host: StartupHost): Promise<StartupCandidate[]> {
  const out = new Set(host.outReplicas);
  const results: ((StartupCandidate & { retry: boolean }) | null)[] = host.replicas.map(() => null);
  const deadline = host.clock.nowMs() + host.replicaWaitMs;
  let delayMs = 50;
  let loggedAt = -Infinity;
  for (;;) {
    await Promise.all(host.replicas.map(async (r, i) => {
      const known = results[i];
      if (known !== null && known.info !== null && r.client !== null && !r.client.closed) return;
      if (known !== null && known.info === null && !known.retry) return;
      results[i] = await probe(host, r);
    }));
    if (host.closed) break;
    const missing = host.replicas.filter((r, i) => results[i]!.info === null && results[i]!.retry && !out.has(r.key));
    const leftMs = deadline - host.clock.nowMs();
    if (missing.length === 0 || leftMs <= 0) {
      if (missing.length > 0) host.log({ event: 'replica-wait-over', waitedMs: host.replicaWaitMs, missing: missing.map((r) => `${r.key}: ${results[host.replicas.indexOf(r)]!.error}`) });
      break;
    }
    host.waitingFor = missing.map((r) => r.key);
    host.waitingSince ??= new Date().toISOString();
    if (host.clock.nowMs() - loggedAt >= WAIT_LOG_EVERY_MS) {
      loggedAt = host.clock.nowMs();
      host.log({ event: 'waiting-for-replicas', leftMs, missing: missing.map((r) => `${r.key} at ${r.address}: ${results[host.replicas.indexOf(r)]!.error}`) });
    }
    await host.clock.sleep(Math.min(delayMs, leftMs));
    delayMs = Math.min(REPLICA_RETRY_MS_MAX, delayMs * 2);
  }
  host.waitingFor = [];
  host.waitingSince = null;
  // A connection that dropped after its probe: that replica is out like an unreachable one.
  return results.map((c, i) => {
    const r = host.replicas[i];
    if (c!.info !== null && (r.client === null || r.client.closed)) {
      r.client = null;
      return { key: c!.key, info: null, error: 'connection lost during start-up', chain: null, active: null };
    }
    return { key: c!.key, info: c!.info, error: c!.error, chain: c!.chain, active: c!.active, mapsFor: c!.mapsFor };
  });
}

/**
 * The start-up: every replica probed (waited for a while), the plan made (startup.ts), each
 * replica's mode set, then the recovery; the engine serves once this returns.
 */
export async function runStartup(host: StartupHost): Promise<void> {
  const started = host.clock.nowMs();
  const candidates = await probeAll(host);
  host.phaseTimes.probed = host.clock.nowMs() - started;
  if (host.closed) return;
  // The missed-write maps the others hold say which replicas went out, and what they missed.
  const sourceIndex = chooseSource(host.sizeBytes, candidates);
  const holders = mapHolders(host.sizeBytes, candidates).filter((i) => host.replicas[i].client !== null);
  const missed: MissedStatus[] = await Promise.all(
    candidates.map(async (c, i) => {
      if (sourceIndex === null || i === sourceIndex || c.info === null) return NO_MISSED;
      const status: MissedStatus = { invalid: false, regions: null };
      await Promise.all(holders.filter((h) => h !== i).map(async (h) => {
        try {
          const regions = await host.replicas[h].client!.missedGet(c.key);
          status.regions = [...new Set([...(status.regions ?? []), ...regions])];
        } catch (err) {
          // NOT_FOUND: none; UNSUPPORTED: an older replica; CONFLICT: invalidated.
          if (toZebuError(err).code === ErrorCode.CONFLICT) status.invalid = true;
        }
      }));
      return status;
    }),
  );
  const plan = planStartup(host.sizeBytes, REGION_BYTES, candidates, (i) => missed[i]);
  host.phaseTimes.planned = host.clock.nowMs() - started;
  // Every mode is set before any close handler is registered: a connection that closed during
  // the planning runs its handler at registration, and with the replicas after it still
  // unassigned (ERR) that handler would find no RW replica and fault the volume.
  const watches: (() => void)[] = [];
  for (const [i, r] of host.replicas.entries()) {
    const decision = plan.decisions[i];
    const client = r.client;
    if (decision.mode === 'RW') {
      host.set.startRw(r);
      watches.push(() => client!.onClose((err) => {
        if (r.client === client) host.setErr(r, err);
      }));
    } else if (decision.mode === 'DELTA') {
      // Out of the write set, connection kept: its delta rebuild starts once serving.
      host.set.startWaiting(r, `waiting for a delta rebuild: ${decision.reason}`);
      host.pendingDeltas.push(r);
      watches.push(() => client!.onClose((err) => {
        // Only while it still waits: once its delta rebuild has begun, the rebuild's own close
        // handling marks it ERR (this one, registered first, used to run first and clear
        // r.client, so a replica lost after its rebuild stayed RW, unnoticed and unhealed).
        if (r.client === client && r.mode === ReplicaMode.ERR && r.rebuild === null) {
          r.client = null;
          r.reason = `disconnected before its delta rebuild: ${err.message}`;
        }
      }));
    } else {
      host.set.startOut(r, decision.reason)?.close();
    }
  }
  host.set.startServing();
  for (const watch of watches) watch();
  if (host.faultedReason !== null) {
    host.log({ event: 'faulted', reason: host.faultedReason });
  } else {
    await recover(host, plan, started);
  }
  host.log({ event: 'started', replicas: host.replicaStatus() });
}

/**
 * Before the first request: missed-write maps for the replicas that are out, then the union of
 * active regions made equal on the RW replicas, then two numbered flushes (the second confirms
 * the first, with EVICT) so the regions leave the logs again.
 *
 * Each active region is compared first (REGION_HASH, each replica hashing its own bytes at once)
 * and copied from the source only into the replicas where it differs: after a crash most active
 * regions are the same everywhere (only the writes in flight at the crash can differ), and a
 * copy is a read and N writes over the network where a compare is a local read.
 */
async function recover(host: StartupHost, plan: StartupPlan, started: number): Promise<void> {
  const healthy = (): EngineReplica[] => host.set.healthy();
  // Maps first, while the sources' active sets still hold the regions of the last run: a map
  // starts from them. Maps of the replicas that serve now (RW: in sync with the source) are
  // stale — left by a rebuild that ended just before a crash could drop them, say — and go: a
  // snapshot would invalidate them, and the next time that replica went out it could not
  // come back by a delta rebuild.
  const keep = host.replicas.filter((r) => r.mode !== ReplicaMode.RW).map((r) => r.key);
  await Promise.all(healthy().map((r) => host.controlOn(r, (c) => c.missedPrune(keep))));
  // One that only a full rebuild can bring back (a new replica whose first rebuild never began,
  // say) gets an invalid mark instead: a map started now would hold only what it misses from now
  // on, and would pass for a complete record at a later start-up — one it is not reached at
  // included (a map is started for those: they may have been in sync when they went), which
  // leaves an invalid mark as it is.
  const out = host.replicas.filter((r) => r.mode !== ReplicaMode.RW);
  for (const r of out) {
    const fullRebuildOnly = plan.decisions[host.replicas.indexOf(r)].fullRebuildOnly === true;
    await Promise.all(healthy().map((x) => host.controlOn(x, (c) => (fullRebuildOnly ? c.missedMerge(r.key, [], true) : c.missedStart(r.key)))));
  }

  host.phaseTimes.mapsStarted = host.clock.nowMs() - started;
  let bytes = 0;
  let copied = 0;
  const regions = plan.resyncRegions;
  const checked = healthy().length > 1 ? regions.length : 0;
  // Released regions leave the logs (and this engine's count) as soon as they are done.
  const released = new Set<number>();
  let source = host.replicas[plan.source!];
  while (checked > 0) {
    try {
      await resyncFrom(host, source, regions.filter((region) => !released.has(region)), released, (length) => {
        bytes += length;
        copied++;
      });
      break;
    } catch (err) {
      const e = toZebuError(err);
      if (source.mode === ReplicaMode.RW) host.setErr(source, e);
      // The source failed (its disk, its link): another RW replica can be the source. What the
      // old one copied is a state the volume might have been in at the crash as well as the new
      // source's, region by region (nothing was served yet), so the regions not yet released
      // are compared and copied again from the new one.
      const next = furthestAhead(healthy());
      if (next !== null) {
        host.log({ event: 'recovery-source-changed', from: source.address, to: next.address, reason: e.message });
        source = next;
        continue;
      }
      // No one holds the answer: serve nothing (salvage restarts the volume; their logs still
      // name the regions).
      host.set.fault(`recovery failed: ${e.message}`);
      for (const r of healthy()) host.setErr(r, new ZebuError(ErrorCode.EIO, `recovery failed: ${e.message}`));
      host.log({ event: 'faulted', reason: host.faultedReason });
      break;
    }
  }
  host.phaseTimes.resynced = host.clock.nowMs() - started;
  // The replicas count these regions as active (stamp 0) until a flush confirming #1 arrives.
  for (const region of regions) if (!released.has(region)) host.markActive(region, 0);
  if (host.faultedReason === null) {
    await host.flushNumbered().catch(() => {});
    await host.alignCounters().catch((err) => host.log({ event: 'align-counters-failed', reason: (err as Error).message }));
    // Confirms the first, with EVICT: the resynced regions are the same and durable everywhere,
    // and no client wrote them yet, so they leave the logs now (not after the idle time). An
    // engine killed again soon after it started then has nothing of this start to resync.
    await host.flushNumbered({ evict: true }).catch(() => {});
  }
  const report: RecoveryReport = {
    at: new Date().toISOString(),
    clean: plan.clean,
    source: host.replicas[plan.source!].address,
    checkedRegions: checked,
    regions: copied,
    bytes,
    durationMs: host.clock.nowMs() - started,
    deltaReplicas: host.pendingDeltas.map((r) => r.address),
    erredReplicas: host.replicas.filter((r) => r.mode === ReplicaMode.ERR && !host.pendingDeltas.includes(r)).map((r) => ({ address: r.address, reason: r.reason ?? '' })),
  };
  host.recoveryReport = report;
  // Where the time went (ms since the start-up began, cumulative), for the log only.
  host.log({ event: 'recovery', ...report, phasesMs: host.phaseTimes });
}

/**
 * Makes `regions` the same on every RW replica as on `source` (compared by hash, copied where
 * they differ), a batch at a time; a long run releases each batch from the logs once durable.
 * Throws when the source fails; a target that fails is set ERR and left out.
 */
async function resyncFrom(host: StartupHost, source: EngineReplica, regions: number[], released: Set<number>, copiedRegion: (length: number) => void): Promise<void> {
  const healthy = (): EngineReplica[] => host.set.healthy();
  const sourceFailed = (): ZebuError => new ZebuError(ErrorCode.EIO, `source ${source.address} failed: ${source.reason}`);
  const resyncRegion = async (region: number): Promise<void> => {
    const { offset, length } = regionRange(region, REGION_BYTES, host.sizeBytes);
    const sourceClient = source.client;
    if (sourceClient === null || source.mode !== ReplicaMode.RW) throw sourceFailed();
    const differing = await replicasDiffering(host, sourceClient, healthy().filter((r) => r !== source), offset, length);
    if (differing.length === 0) return;
    const data = await sourceClient.read(offset, length);
    await Promise.all(differing.map((r) => host.controlOn(r, (c) => c.write(offset, data))));
    copiedRegion(length);
  };
  const batched = regions.length > RESYNC_BATCH_REGIONS;
  let batch: number[] = [];
  let batchStarted = host.clock.nowMs();
  for (let at = 0; at < regions.length; at += COPIERS) {
    const step = regions.slice(at, at + COPIERS);
    await forEachIndex(step.length, COPIERS, (i) => resyncRegion(step[i]));
    batch.push(...step);
    const last = at + COPIERS >= regions.length;
    if (!batched || !(last || batch.length >= RESYNC_BATCH_REGIONS || host.clock.nowMs() - batchStarted >= RESYNC_BATCH_MS)) continue;
    // A long resync keeps what it did should this engine be killed before it ends (a kill
    // storm must not make every start redo it all): the batch is made durable everywhere,
    // then released from every log.
    await host.flushNumbered();
    if (source.mode !== ReplicaMode.RW) throw sourceFailed();
    await Promise.all(healthy().map((r) => host.controlOn(r, (c) => c.intentRelease(batch))));
    for (const region of batch) released.add(region);
    host.log({ event: 'resync-batch', released: released.size, of: regions.length });
    batch = [];
    batchStarted = host.clock.nowMs();
  }
}

/**
 * The replicas of `others` whose bytes in the range differ from the source's, by hash. A replica
 * that cannot hash (an older one) counts as differing; a source that cannot hash makes them all
 * differ (the region is copied, as before there were hashes); one that fails, fails the recovery.
 */
async function replicasDiffering(host: StartupHost, sourceClient: DataClient, others: EngineReplica[], offset: number, length: number): Promise<EngineReplica[]> {
  let sourceHash: Buffer | null;
  try {
    sourceHash = await sourceClient.regionHash(offset, length);
  } catch (err) {
    if (!isUnsupported(toZebuError(err))) throw err;
    sourceHash = null;
  }
  if (sourceHash === null) return others;
  const hashes = await Promise.all(others.map(async (r) => {
    const client = r.client;
    if (client === null) return null;
    try {
      return await client.regionHash(offset, length);
    } catch (err) {
      const e = toZebuError(err);
      if (!isUnsupported(e) && r.client === client) host.setErr(r, e);
      return null;
    }
  }));
  return others.filter((r, i) => r.mode === ReplicaMode.RW && r.client !== null && (hashes[i] === null || !hashes[i]!.equals(sourceHash!)));
}

