/**
 * The volume controller: one engine per attached volume, over N replica connections.
 * See docs/architecture.md and docs/crash-consistency.md.
 *
 * This file is the shell: links, timers, client requests, and the request sequences of start-up,
 * rebuilds and verify. What to decide is in pure modules: the replica set and modes
 * (replica-set.ts), when a write is acknowledged (write-ack.ts), flush numbers and the
 * active-region bound (active-regions.ts), the start-up plan (startup.ts), rebuild and delta
 * planning (rebuild-plan.ts), verify's comparison (verify.ts).
 *
 * - Writes, trims, zeroes and flushes go to every RW and WO replica and succeed when all
 *   succeed. A replica that fails or times out is set ERR, disconnected and never used again by
 *   this engine; the request still succeeds while at least one RW replica took it. With no RW
 *   replica left the volume is faulted and every request fails at once with EIO. The moment a RW
 *   replica goes ERR the others start a missed-write map for it (a later delta rebuild).
 * - Reads go to one RW replica (a local one first, then least outstanding); on error that
 *   replica is set ERR and the read is retried on another.
 * - Overlapping requests reach every replica in the same order (one connection each), and each
 *   replica applies overlapping writes in arrival order, so replicas cannot diverge.
 * - Flushes are numbered and carry `confirmed` (every flush up to it completed everywhere): the
 *   replicas' write-intent logs let regions go with it. The engine keeps the same bookkeeping to
 *   bound the active regions (maxActiveRegions): a write to a new region over the bound is held
 *   while the engine flushes until regions leave.
 * - Start-up: first every replica is opened, waiting (bounded: replicaWaitMs) for those that do
 *   not answer yet — after a crash of the whole volume they restart alongside the engine, maybe
 *   on new addresses that the agent then hands over (setStartupAddresses) — so that a start-up
 *   race never faults a volume. Then recovery (startup.ts plans it): the union of the replicas'
 *   active regions is copied from the source into the other RW replicas before the first request
 *   is served.
 */
import os from 'node:os';
import { ZebuError, ErrorCode, assert, toZebuError } from '../errors.ts';
import { DataClient } from '../protocol/client.ts';
import { netTransport, type Transport } from '../protocol/transport.ts';
import { systemClock, type Clock, type ClockTimer } from '../os/clock.ts';
import { Op, RequestFlag, decodeExtents, encodeFlushConfirmed, MISSED_KEY } from '../protocol/frames.ts';
import type { BlockBackend, BackendExtent } from '../protocol/backend.ts';
import type { ReplicaInfo, SnapshotInfo } from '../replica/replica.ts';
import { INTENT_REGION_BYTES, INTENT_IDLE_MS, leaveIdleBefore } from '../replica/intent-log.ts';
import { ActiveRegions, FlushSequence } from './active-regions.ts';
import { WriteAck } from './write-ack.ts';
import { differingFromSource, VerifyTally } from './verify.ts';
import { deltaRefusal, deltaRegions, imageMismatch, isAllZero, joinKind, liveRegionCopy, snapshotCopyPlan, unfinishedFullRebuild, type RegionCopy, type SnapshotCopyPlan } from './rebuild-plan.ts';
import { ReplicaSet, ReplicaMode, type EngineReplica as SetMember } from './replica-set.ts';
import { planStartup, chooseSource, furthestAhead, mapHolders, NO_MISSED, type MissedStatus, type StartupCandidate, type StartupPlan } from './startup.ts';
import { Rebuild, RangeClaims, type RebuildProgress } from './rebuild.ts';

export type { RebuildProgress };
import { ioBuffers } from '../protocol/buffer-pool.ts';
import { chainNames, forEachIndex, regionRange, type RecoveryReport, type VerifyReport, type VerifyDifference } from './recovery.ts';

export { ReplicaMode };

export interface EngineOptions {
  name: string;
  sizeBytes: number;
  /**
   * Each `HOST:PORT` or `KEY=HOST:PORT`; KEY (the manager's replica name, else the address)
   * names the replica's missed-write maps.
   */
  replicas: string[];
  secret: Buffer;
  epoch: number;
  requestTimeoutMs?: number;
  pingIntervalMs?: number;
  /** Bound on the regions written since their confirming flush (default 256 = 1 GiB). */
  maxActiveRegions?: number;
  /**
   * How long start-up waits for replicas that cannot be reached yet (default 30 s; 0: no wait).
   * Start-up goes on as soon as every replica it waits for answered.
   */
  replicaWaitMs?: number;
  /** Keys of replicas known to be out (the manager failed them): start-up does not wait for them. */
  outReplicas?: string[];
  log?: (event: Record<string, unknown>) => void;
  /** How replicas are reached, and time (defaults: the network and the system clock; the simulator's otherwise). */
  transport?: Transport;
  clock?: Clock;
}

/** Where the engine is in its life: opening its replicas and recovering, or serving. */
export type EnginePhase = 'starting' | 'serving';

export interface EngineReplicaStatus {
  address: string;
  key: string;
  mode: ReplicaMode;
  inflight: number;
  local: boolean;
  reason: string | null;
  revision: number | null;
  /** While this replica is being rebuilt (WO). */
  rebuild: RebuildProgress | null;
}

export interface EngineStats {
  reads: number;
  writes: number;
  zeroes: number;
  flushes: number;
  readBytes: number;
  writeBytes: number;
  errors: number;
  readLatencyMsTotal: number;
  writeLatencyMsTotal: number;
  /** Writes held because the active regions were at the bound. */
  heldWrites: number;
  /** Flushes the engine issued itself to let regions leave. */
  boundFlushes: number;
  /** Flushes the engine issued itself after the volume went quiet with regions active. */
  idleFlushes: number;
}

type EngineReplica = SetMember<DataClient>;

/** A write waiting for the active regions to drop below the bound. */
interface HeldWrite {
  offset: number;
  length: number;
  send: () => void;
}

type Done = (err: ZebuError | null) => void;

const EMPTY = Buffer.alloc(0);
const isOut = (r: EngineReplica): boolean => r.mode === ReplicaMode.ERR;
/** Rebuilds, recovery and verify work in the write-intent log's regions. */
const REGION_BYTES = INTENT_REGION_BYTES;
/** Regions copied (or compared) at once. */
const COPIERS = 4;
const MAX_QUEUED_WHILE_PAUSED = 4096;
const DEFAULT_MAX_ACTIVE_REGIONS = 256;
const DEFAULT_REPLICA_WAIT_MS = 30_000;
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
/**
 * With regions active, no write and no flush for this long, the engine flushes by itself: the
 * regions of a volume gone quiet then leave the write-intent logs (one or two flushes after the
 * replicas' idle time), so that a crash of an idle volume resyncs nothing and an engine restarts
 * fast. Never while writes go on: a flush under a stream of writes only stalls it.
 */
const IDLE_FLUSH_MS = Math.max(500, INTENT_IDLE_MS + 500);
/** Errors that blame the request, not the replica. */
const REQUEST_ERRORS: ErrorCode[] = [ErrorCode.EINVAL, ErrorCode.NOT_FOUND, ErrorCode.EXISTS];

function isLocalHost(host: string): boolean {
  if (host === 'localhost' || host.startsWith('127.') || host === '::1') return true;
  for (const list of Object.values(os.networkInterfaces())) {
    for (const a of list ?? []) if (a.address === host) return true;
  }
  return false;
}

function parseAddress(address: string): { host: string; port: number } {
  const at = address.lastIndexOf(':');
  const port = Number(address.slice(at + 1));
  if (at <= 0 || !Number.isInteger(port) || port <= 0 || port > 65535) throw new ZebuError(ErrorCode.EINVAL, `replica address must be HOST:PORT, got ${address}`);
  return { host: address.slice(0, at).replace(/^\[|\]$/g, ''), port };
}

/** `HOST:PORT` or `KEY=HOST:PORT`; a plain address is its own key. */
export function parseReplicaEntry(entry: string): { key: string; named: boolean; address: string; host: string; port: number } {
  const eq = entry.lastIndexOf('=');
  const address = eq < 0 ? entry : entry.slice(eq + 1);
  const { host, port } = parseAddress(address);
  const key = eq < 0 ? address.replace(/[^A-Za-z0-9._:@=-]/g, '_') : entry.slice(0, eq);
  if (!MISSED_KEY.test(key)) throw new ZebuError(ErrorCode.EINVAL, `replica key must be 1..200 of [A-Za-z0-9._:@=-], got ${JSON.stringify(key)}`);
  return { key, named: eq >= 0, address, host, port };
}

/**
 * Errors after which a replica may still turn up during start-up: nothing listens there yet (its
 * process is starting), the connection broke, or another replica answered at its address (its
 * own address is about to be handed over).
 */
function mayStillCome(err: ZebuError): boolean {
  return err.code === ErrorCode.DISCONNECTED || err.code === ErrorCode.TIMEOUT || err.code === ErrorCode.CLOSED || err.code === ErrorCode.WRONG_REPLICA;
}

/** An error from a replica that does not know a write-intent op (an older replica). */
function isUnsupported(err: ZebuError): boolean {
  return err.code === ErrorCode.UNSUPPORTED;
}

export class Engine implements BlockBackend {
  readonly name: string;
  /** Grows with an online expansion (expand()). */
  sizeBytes: number;
  readonly epoch: number;
  private readonly replicas: EngineReplica[];
  /** Modes, the write set, readers, faulted (replica-set.ts); `replicas` is its member list. */
  private readonly set: ReplicaSet<DataClient>;
  private readonly options: Required<Omit<EngineOptions, 'replicas'>>;
  private phase: EnginePhase = 'starting';
  /** While start-up waits: the keys of the replicas it waits for, and since when. */
  private waitingFor: string[] = [];
  private waitingSince: string | null = null;
  /** When each step of the start-up ended (ms from its start): probe, plan, maps, resync. */
  private readonly phaseTimes: Record<string, number> = {};
  private inflight = 0;
  /** Control operations holding I/O paused (snapshot, revert, expansion, a rebuild's join/end): nested. */
  private pauseDepth = 0;
  private queued: (() => void)[] = [];
  private drainWaiters: (() => void)[] = [];
  private pingTimer: ClockTimer | null = null;
  private idleFlushTimer: ClockTimer | null = null;
  private readonly clock: Clock;
  /** clock.nowMs() when the last numbered flush was sent, and when the last write completed. */
  private lastFlushSentMs = 0;
  private lastWriteDoneMs = 0;
  private closed = false;
  /** The rebuild under way, if any: at most one at a time. */
  private rebuilding: Rebuild<EngineReplica> | null = null;
  /** Settles (never rejects) when the rebuild's copy has stopped, whether done or failed. */
  private rebuildRun: Promise<void> = Promise.resolve();
  /** Ranges being copied or compared (rebuild, verify): writes to them wait. Null: none. */
  private claims: RangeClaims | null = null;
  private claimUsers = 0;
  private verifying = false;
  /** Replicas behind the source at start-up that wait for their delta rebuild (with their client). */
  private pendingDeltas: EngineReplica[] = [];
  private recoveryReport: RecoveryReport | null = null;
  private lastVerify: VerifyReport | null = null;
  private lastRebuild: { at: string; replica: string; delta: boolean; copiedBytes: number; totalBytes: number; durationMs: number; error: string | null } | null = null;

  /** Flush numbers: the last sent, and `confirmed` (every flush up to it completed everywhere). */
  private readonly flushes = new FlushSequence();
  /** The active regions as the replicas count them (same rule, conservative stamps), to bound them. */
  private readonly regions: ActiveRegions;
  private held: HeldWrite[] = [];
  private boundFlushRunning = false;

  readonly stats: EngineStats = {
    reads: 0, writes: 0, zeroes: 0, flushes: 0, readBytes: 0, writeBytes: 0, errors: 0, readLatencyMsTotal: 0, writeLatencyMsTotal: 0,
    heldWrites: 0, boundFlushes: 0, idleFlushes: 0,
  };

  private constructor(options: EngineOptions) {
    this.name = options.name;
    this.sizeBytes = options.sizeBytes;
    this.epoch = options.epoch;
    this.options = {
      requestTimeoutMs: 8000, pingIntervalMs: 2000, log: () => {}, maxActiveRegions: DEFAULT_MAX_ACTIVE_REGIONS, replicaWaitMs: DEFAULT_REPLICA_WAIT_MS, outReplicas: [],
      transport: netTransport, clock: systemClock,
      ...options,
    };
    // Explicit `undefined`s mean the defaults too.
    this.options.log = options.log ?? (() => {});
    this.options.transport = options.transport ?? netTransport;
    this.clock = this.options.clock = options.clock ?? systemClock;
    // Explicit `undefined`s (absent CLI flags) mean the defaults too.
    this.options.replicaWaitMs = options.replicaWaitMs ?? DEFAULT_REPLICA_WAIT_MS;
    this.options.outReplicas = options.outReplicas ?? [];
    if (!Number.isSafeInteger(this.options.replicaWaitMs) || this.options.replicaWaitMs < 0) {
      throw new ZebuError(ErrorCode.EINVAL, `replicaWaitMs must be a whole number of milliseconds >= 0, got ${this.options.replicaWaitMs}`);
    }
    // An explicit `undefined` in options (an absent CLI flag) means the default too.
    const maxActiveRegions = options.maxActiveRegions ?? DEFAULT_MAX_ACTIVE_REGIONS;
    if (!Number.isInteger(maxActiveRegions) || maxActiveRegions < 1) {
      throw new ZebuError(ErrorCode.EINVAL, `maxActiveRegions must be a positive integer, got ${maxActiveRegions}`);
    }
    this.regions = new ActiveRegions(REGION_BYTES, maxActiveRegions, this.sizeBytes);
    this.replicas = options.replicas.map((entry) => {
      const { key, named, address, host, port } = parseReplicaEntry(entry);
      return { address, key, named, host, port, local: isLocalHost(host), client: null, mode: ReplicaMode.ERR, reason: 'not connected', info: null, rebuild: null, inWriteSet: true };
    });
    this.set = new ReplicaSet(this.replicas, this.epoch);
  }

  /** Connects to every replica with the volume's epoch, recovers, and decides their modes. */
  static async start(options: EngineOptions): Promise<Engine> {
    const engine = Engine.create(options);
    await engine.startUp();
    return engine;
  }

  /**
   * An engine in its 'starting' phase: nothing opened yet. startUp() opens the replicas and
   * recovers; meanwhile info() and setStartupAddresses() work (the control socket serves them).
   */
  static create(options: EngineOptions): Engine {
    if (options.replicas.length === 0) throw new ZebuError(ErrorCode.EINVAL, 'a volume needs at least one replica');
    const engine = new Engine(options);
    if (new Set(engine.replicas.map((r) => r.address)).size !== engine.replicas.length) throw new ZebuError(ErrorCode.EINVAL, 'replica addresses must be distinct');
    if (new Set(engine.replicas.map((r) => r.key)).size !== engine.replicas.length) throw new ZebuError(ErrorCode.EINVAL, 'replica keys must be distinct');
    return engine;
  }

  async startUp(): Promise<void> {
    assert(this.phase === 'starting' && this.pingTimer === null, 'engine started twice');
    await this.connectAll();
    if (this.closed) throw new ZebuError(ErrorCode.CLOSED, `volume ${this.name}: the engine closed during its start-up`);
    this.phase = 'serving';
    this.pingTimer = this.clock.setInterval(() => this.pingAll(), this.options.pingIntervalMs).unref();
    this.idleFlushTimer = this.clock.setInterval(() => this.idleFlush(), Math.ceil(IDLE_FLUSH_MS / 2)).unref();
    if (this.pendingDeltas.length > 0) void this.runPendingDeltas();
  }

  get currentPhase(): EnginePhase {
    return this.phase;
  }

  /**
   * During start-up: where replicas are now (by key; others are ignored). A replica that restarted
   * listens on a new port, and its agent learns it after the engine was started. A replica already
   * opened keeps its connection. After start-up: BUSY (the set changes through addReplica).
   */
  setStartupAddresses(addresses: Record<string, string>): { changed: string[] } {
    if (this.phase !== 'starting') throw new ZebuError(ErrorCode.BUSY, `volume ${this.name}: the engine has started; add the replica instead`);
    // The whole batch at once: two replicas may swap addresses (ports reused after a restart).
    const next = new Map<EngineReplica, { address: string; host: string; port: number }>();
    for (const [key, address] of Object.entries(addresses)) {
      const r = this.replicas.find((x) => x.key === key);
      if (r === undefined || r.address === address || r.client !== null) continue; // unknown, unchanged, or opened: it is where it was
      next.set(r, { address, ...parseAddress(address) });
    }
    const after = this.replicas.map((r) => next.get(r)?.address ?? r.address);
    if (new Set(after).size !== after.length) throw new ZebuError(ErrorCode.EINVAL, `replica addresses would not be distinct: ${after.join(', ')}`);
    for (const [r, to] of next) {
      r.address = to.address;
      r.host = to.host;
      r.port = to.port;
      r.local = isLocalHost(to.host);
    }
    const changed = [...next.keys()].map((r) => r.key);
    if (changed.length > 0) this.log({ event: 'startup-addresses', changed: Object.fromEntries([...next].map(([r, to]) => [r.key, to.address])) });
    return { changed };
  }


  private get faultedReason(): string | null {
    return this.set.faultedReason;
  }

  private get superseded(): boolean {
    return this.set.superseded;
  }

  private log(event: Record<string, unknown>): void {
    this.options.log({ volume: this.name, ...event });
  }

  private connect(host: string, port: number): Promise<DataClient> {
    return DataClient.connect({
      host, port, secret: this.options.secret, epoch: this.epoch,
      requestTimeoutMs: this.options.requestTimeoutMs, connectTimeoutMs: this.options.requestTimeoutMs,
      transport: this.options.transport, clock: this.clock,
    });
  }

  /**
   * Opens a replica and checks it is the one asked for: a replica that reports a name (its
   * manager's) must report the key it was given as KEY=HOST:PORT.
   */
  private async openChecked(client: DataClient, key: string, keyIsName: boolean): Promise<ReplicaInfo> {
    const info = await client.open();
    const name = (info as ReplicaInfo & { name?: unknown }).name;
    if (keyIsName && typeof name === 'string' && name !== key) {
      throw new ZebuError(ErrorCode.WRONG_REPLICA, `${client.address} is replica ${name}, not ${key} (a stale address?)`);
    }
    return info;
  }

  /** What start-up needs of one replica: opened (grown if the volume grew), its log and chain. */
  private async probe(r: EngineReplica): Promise<StartupCandidate & { retry: boolean }> {
    let client: DataClient | null = null;
    try {
      const address = r.address;
      client = await this.connect(r.host, r.port);
      let info = await this.openChecked(client, r.key, r.named);
      if (this.closed) throw new ZebuError(ErrorCode.CLOSED, `volume ${this.name}: the engine closed during its start-up`);
      // An address handed over while this one was being opened (setStartupAddresses) is where
      // the replica is: the next probe goes there.
      if (r.address !== address) throw new ZebuError(ErrorCode.WRONG_REPLICA, `${r.key} moved to ${r.address} while ${address} was being opened`);
      // Only now is it the replica asked for: until here an address handed over applies to it.
      r.client = client;
      if (info.sizeBytes < this.sizeBytes && !info.rebuilding) {
        // The volume grew while this replica was away (or offline): grow it before the
        // modes are chosen, so that a complete replica is not failed for its size alone.
        try {
          info = await client.expand(this.sizeBytes);
        } catch (err) {
          throw new ZebuError(toZebuError(err).code, `cannot grow from ${info.sizeBytes} to ${this.sizeBytes} bytes: ${(err as Error).message}`);
        }
        this.log({ event: 'replica-expanded', replica: r.address, sizeBytes: this.sizeBytes });
      }
      this.set.noteInfo(r, info);
      let active: number[] | null = null;
      try {
        const intent = await client.intentGet();
        if (intent.regionBytes !== REGION_BYTES) throw new ZebuError(ErrorCode.EINVAL, `write-intent regions of ${intent.regionBytes} bytes, the engine uses ${REGION_BYTES}`);
        active = intent.active;
      } catch (err) {
        if (!isUnsupported(toZebuError(err))) throw err;
      }
      const chain = chainNames(await client.snapshotList());
      return { key: r.key, info, error: null, chain, active, retry: false };
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
  private async probeAll(): Promise<StartupCandidate[]> {
    const out = new Set(this.options.outReplicas);
    const results: ((StartupCandidate & { retry: boolean }) | null)[] = this.replicas.map(() => null);
    const deadline = this.clock.nowMs() + this.options.replicaWaitMs;
    let delayMs = 50;
    let loggedAt = -Infinity;
    for (;;) {
      await Promise.all(this.replicas.map(async (r, i) => {
        const known = results[i];
        if (known !== null && known.info !== null && r.client !== null && !r.client.closed) return;
        if (known !== null && known.info === null && !known.retry) return;
        results[i] = await this.probe(r);
      }));
      if (this.closed) break;
      const missing = this.replicas.filter((r, i) => results[i]!.info === null && results[i]!.retry && !out.has(r.key));
      const leftMs = deadline - this.clock.nowMs();
      if (missing.length === 0 || leftMs <= 0) {
        if (missing.length > 0) this.log({ event: 'replica-wait-over', waitedMs: this.options.replicaWaitMs, missing: missing.map((r) => `${r.key}: ${results[this.replicas.indexOf(r)]!.error}`) });
        break;
      }
      this.waitingFor = missing.map((r) => r.key);
      this.waitingSince ??= new Date().toISOString();
      if (this.clock.nowMs() - loggedAt >= WAIT_LOG_EVERY_MS) {
        loggedAt = this.clock.nowMs();
        this.log({ event: 'waiting-for-replicas', leftMs, missing: missing.map((r) => `${r.key} at ${r.address}: ${results[this.replicas.indexOf(r)]!.error}`) });
      }
      await this.clock.sleep(Math.min(delayMs, leftMs));
      delayMs = Math.min(REPLICA_RETRY_MS_MAX, delayMs * 2);
    }
    this.waitingFor = [];
    this.waitingSince = null;
    // A connection that dropped after its probe: that replica is out like an unreachable one.
    return results.map((c, i) => {
      const r = this.replicas[i];
      if (c!.info !== null && (r.client === null || r.client.closed)) {
        r.client = null;
        return { key: c!.key, info: null, error: 'connection lost during start-up', chain: null, active: null };
      }
      return { key: c!.key, info: c!.info, error: c!.error, chain: c!.chain, active: c!.active };
    });
  }

  private async connectAll(): Promise<void> {
    const started = this.clock.nowMs();
    const candidates = await this.probeAll();
    this.phaseTimes.probed = this.clock.nowMs() - started;
    if (this.closed) return;
    // The missed-write maps the others hold say which replicas went out, and what they missed.
    const sourceIndex = chooseSource(this.sizeBytes, candidates);
    const holders = mapHolders(this.sizeBytes, candidates).filter((i) => this.replicas[i].client !== null);
    const missed: MissedStatus[] = await Promise.all(
      candidates.map(async (c, i) => {
        if (sourceIndex === null || i === sourceIndex || c.info === null) return NO_MISSED;
        const status: MissedStatus = { invalid: false, regions: null };
        await Promise.all(holders.filter((h) => h !== i).map(async (h) => {
          try {
            const regions = await this.replicas[h].client!.missedGet(c.key);
            status.regions = [...new Set([...(status.regions ?? []), ...regions])];
          } catch (err) {
            // NOT_FOUND: none; UNSUPPORTED: an older replica; CONFLICT: invalidated.
            if (toZebuError(err).code === ErrorCode.CONFLICT) status.invalid = true;
          }
        }));
        return status;
      }),
    );
    const plan = planStartup(this.sizeBytes, REGION_BYTES, candidates, (i) => missed[i]);
    this.phaseTimes.planned = this.clock.nowMs() - started;
    // Every mode is set before any close handler is registered: a connection that closed during
    // the planning runs its handler at registration, and with the replicas after it still
    // unassigned (ERR) that handler would find no RW replica and fault the volume.
    const watches: (() => void)[] = [];
    for (const [i, r] of this.replicas.entries()) {
      const decision = plan.decisions[i];
      const client = r.client;
      if (decision.mode === 'RW') {
        this.set.startRw(r);
        watches.push(() => client!.onClose((err) => {
          if (r.client === client) this.setErr(r, err);
        }));
      } else if (decision.mode === 'DELTA') {
        // Out of the write set, connection kept: its delta rebuild starts once serving.
        this.set.startWaiting(r, `waiting for a delta rebuild: ${decision.reason}`);
        this.pendingDeltas.push(r);
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
        this.set.startOut(r, decision.reason)?.close();
      }
    }
    this.set.startServing();
    for (const watch of watches) watch();
    if (this.faultedReason !== null) {
      this.log({ event: 'faulted', reason: this.faultedReason });
    } else {
      await this.recover(plan, started);
    }
    this.log({ event: 'started', replicas: this.replicaStatus() });
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
  private async recover(plan: StartupPlan, started: number): Promise<void> {
    const healthy = (): EngineReplica[] => this.set.healthy();
    // Maps first, while the sources' active sets still hold the regions of the last run: a map
    // starts from them. Maps of the replicas that serve now (RW: in sync with the source) are
    // stale — left by a rebuild that ended just before a crash could drop them, say — and go: a
    // snapshot would invalidate them, and the next time that replica went out it could not
    // come back by a delta rebuild.
    const keep = this.replicas.filter((r) => r.mode !== ReplicaMode.RW).map((r) => r.key);
    await Promise.all(healthy().map((r) => this.controlOn(r, (c) => c.missedPrune(keep))));
    const out = this.replicas.filter((r) => r.mode !== ReplicaMode.RW);
    for (const r of out) await Promise.all(healthy().map((x) => this.controlOn(x, (c) => c.missedStart(r.key))));

    this.phaseTimes.mapsStarted = this.clock.nowMs() - started;
    let bytes = 0;
    let copied = 0;
    const regions = plan.resyncRegions;
    const checked = healthy().length > 1 ? regions.length : 0;
    // Released regions leave the logs (and this engine's count) as soon as they are done.
    const released = new Set<number>();
    let source = this.replicas[plan.source!];
    while (checked > 0) {
      try {
        await this.resyncFrom(source, regions.filter((region) => !released.has(region)), released, (length) => {
          bytes += length;
          copied++;
        });
        break;
      } catch (err) {
        const e = toZebuError(err);
        if (source.mode === ReplicaMode.RW) this.setErr(source, e);
        // The source failed (its disk, its link): another RW replica can be the source. What the
        // old one copied is a state the volume might have been in at the crash as well as the new
        // source's, region by region (nothing was served yet), so the regions not yet released
        // are compared and copied again from the new one.
        const next = furthestAhead(healthy());
        if (next !== null) {
          this.log({ event: 'recovery-source-changed', from: source.address, to: next.address, reason: e.message });
          source = next;
          continue;
        }
        // No one holds the answer: serve nothing (salvage restarts the volume; their logs still
        // name the regions).
        this.set.fault(`recovery failed: ${e.message}`);
        for (const r of healthy()) this.setErr(r, new ZebuError(ErrorCode.EIO, `recovery failed: ${e.message}`));
        this.log({ event: 'faulted', reason: this.faultedReason });
        break;
      }
    }
    this.phaseTimes.resynced = this.clock.nowMs() - started;
    // The replicas count these regions as active (stamp 0) until a flush confirming #1 arrives.
    for (const region of regions) if (!released.has(region)) this.regions.markActive(region, 0);
    if (this.faultedReason === null) {
      await this.flushNumbered().catch(() => {});
      await this.alignCounters().catch((err) => this.log({ event: 'align-counters-failed', reason: (err as Error).message }));
      // Confirms the first, with EVICT: the resynced regions are the same and durable everywhere,
      // and no client wrote them yet, so they leave the logs now (not after the idle time). An
      // engine killed again soon after it started then has nothing of this start to resync.
      await this.flushNumbered({ evict: true }).catch(() => {});
    }
    const report: RecoveryReport = {
      at: new Date().toISOString(),
      clean: plan.clean,
      source: this.replicas[plan.source!].address,
      checkedRegions: checked,
      regions: copied,
      bytes,
      durationMs: this.clock.nowMs() - started,
      deltaReplicas: this.pendingDeltas.map((r) => r.address),
      erredReplicas: this.replicas.filter((r) => r.mode === ReplicaMode.ERR && !this.pendingDeltas.includes(r)).map((r) => ({ address: r.address, reason: r.reason ?? '' })),
    };
    this.recoveryReport = report;
    // Where the time went (ms since the start-up began, cumulative), for the log only.
    this.log({ event: 'recovery', ...report, phasesMs: this.phaseTimes });
  }

  /**
   * Makes `regions` the same on every RW replica as on `source` (compared by hash, copied where
   * they differ), a batch at a time; a long run releases each batch from the logs once durable.
   * Throws when the source fails; a target that fails is set ERR and left out.
   */
  private async resyncFrom(source: EngineReplica, regions: number[], released: Set<number>, copiedRegion: (length: number) => void): Promise<void> {
    const healthy = (): EngineReplica[] => this.set.healthy();
    const sourceFailed = (): ZebuError => new ZebuError(ErrorCode.EIO, `source ${source.address} failed: ${source.reason}`);
    const resyncRegion = async (region: number): Promise<void> => {
      const { offset, length } = regionRange(region, REGION_BYTES, this.sizeBytes);
      const sourceClient = source.client;
      if (sourceClient === null || source.mode !== ReplicaMode.RW) throw sourceFailed();
      const differing = await this.replicasDiffering(sourceClient, healthy().filter((r) => r !== source), offset, length);
      if (differing.length === 0) return;
      const data = await sourceClient.read(offset, length);
      await Promise.all(differing.map((r) => this.controlOn(r, (c) => c.write(offset, data))));
      copiedRegion(length);
    };
    const batched = regions.length > RESYNC_BATCH_REGIONS;
    let batch: number[] = [];
    let batchStarted = this.clock.nowMs();
    for (let at = 0; at < regions.length; at += COPIERS) {
      const step = regions.slice(at, at + COPIERS);
      await forEachIndex(step.length, COPIERS, (i) => resyncRegion(step[i]));
      batch.push(...step);
      const last = at + COPIERS >= regions.length;
      if (!batched || !(last || batch.length >= RESYNC_BATCH_REGIONS || this.clock.nowMs() - batchStarted >= RESYNC_BATCH_MS)) continue;
      // A long resync keeps what it did should this engine be killed before it ends (a kill
      // storm must not make every start redo it all): the batch is made durable everywhere,
      // then released from every log.
      await this.flushNumbered();
      if (source.mode !== ReplicaMode.RW) throw sourceFailed();
      await Promise.all(healthy().map((r) => this.controlOn(r, (c) => c.intentRelease(batch))));
      for (const region of batch) released.add(region);
      this.log({ event: 'resync-batch', released: released.size, of: regions.length });
      batch = [];
      batchStarted = this.clock.nowMs();
    }
  }

  /**
   * The replicas of `others` whose bytes in the range differ from the source's, by hash. A replica
   * that cannot hash (an older one) counts as differing; a source that cannot hash makes them all
   * differ (the region is copied, as before there were hashes); one that fails, fails the recovery.
   */
  private async replicasDiffering(sourceClient: DataClient, others: EngineReplica[], offset: number, length: number): Promise<EngineReplica[]> {
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
        if (!isUnsupported(e) && r.client === client) this.setErr(r, e);
        return null;
      }
    }));
    return others.filter((r, i) => r.mode === ReplicaMode.RW && r.client !== null && (hashes[i] === null || !hashes[i]!.equals(sourceHash!)));
  }

  /**
   * Gives every RW/WO replica of the write set the same counters and this epoch as writeEpoch
   * (SET_REVISION flushes, then takes the revision and the epoch durably): start-up compares them,
   * and a resync or a rebuild copy counts as writes on some replicas only. It is also the mark
   * that the replica is a member in sync in this epoch (see startup.ts). Call with client I/O
   * quiet (paused, or before serving), after a flush.
   */
  private async alignCounters(): Promise<void> {
    const active = this.replicas.filter((r) => r.mode !== ReplicaMode.ERR && r.client !== null && r.inWriteSet);
    const infos = await Promise.all(active.map((r) => r.client!.info()));
    const highest = Math.max(0, ...infos.map((info) => info.revision));
    await Promise.all(active.map(async (r) => {
      this.set.noteInfo(r, await r.client!.setRevision(highest));
    }));
  }

  /**
   * Hands the missed-write maps of the RW replicas over to a replica about to become RW (the end
   * of a rebuild, I/O paused): it may be the source of a later start-up, and must know who went
   * out before it joined, or it would take them for replicas that never left.
   */
  private async handOverMissedMaps(target: EngineReplica): Promise<void> {
    const holders = this.replicas.filter((r) => r !== target && r.mode === ReplicaMode.RW && r.client !== null);
    const maps = new Map<string, Set<number>>();
    const invalid = new Set<string>();
    for (const h of holders) {
      let summary;
      try {
        summary = await h.client!.intentGet();
      } catch (err) {
        if (isUnsupported(toZebuError(err))) continue;
        throw err;
      }
      for (const key of summary.invalidMissed ?? []) if (key !== target.key) invalid.add(key);
      for (const key of Object.keys(summary.missed)) {
        if (key === target.key) continue;
        const regions = await h.client!.missedGet(key).catch((err) => {
          if (toZebuError(err).code === ErrorCode.CONFLICT) invalid.add(key);
          return [] as number[];
        });
        let set = maps.get(key);
        if (set === undefined) maps.set(key, (set = new Set()));
        for (const region of regions) set.add(region);
      }
    }
    for (const key of invalid) await target.client!.missedMerge(key, [], true);
    for (const [key, regions] of maps) if (!invalid.has(key)) await target.client!.missedMerge(key, [...regions], false);
  }

  /**
   * Runs a control request on one replica; an older replica that does not know it is left alone,
   * any other failure takes the replica out.
   */
  private async controlOn(r: EngineReplica, fn: (client: DataClient) => Promise<unknown>): Promise<void> {
    const client = r.client;
    if (client === null) return;
    try {
      await fn(client);
    } catch (err) {
      const e = toZebuError(err);
      if (isUnsupported(e)) return;
      if (r.client === client) this.setErr(r, e);
    }
  }

  replicaStatus(): EngineReplicaStatus[] {
    return this.replicas.map((r) => ({
      address: r.address,
      key: r.key,
      mode: r.mode,
      inflight: r.client?.inflight ?? 0,
      local: r.local,
      reason: r.reason,
      revision: r.info?.revision ?? null,
      rebuild: r.rebuild === null ? null : { ...r.rebuild },
    }));
  }

  get faulted(): boolean {
    return this.faultedReason !== null;
  }

  /**
   * Takes a replica out for good: ERR, disconnected, never used again by this engine. When it was
   * RW, the remaining RW/WO replicas start a missed-write map for it at once (same tick: before
   * any later flush lets a region it missed leave their active sets). Not when it was removed
   * (`missed` false) or when a newer engine fenced us.
   */
  private setErr(r: EngineReplica, err: ZebuError, missed = true): void {
    const failure = this.set.fail(r, err, { missed, closing: this.closed });
    if (failure === null) return;
    failure.close?.close();
    if (this.rebuilding !== null && this.rebuilding.target === r) {
      // The copy stops at its next step; from now on nothing says it is under way.
      this.rebuilding.cancelled ??= `target failed: ${err.message}`;
      r.rebuild = null;
    }
    if (failure.superseded) this.log({ event: 'superseded', replica: r.address, reason: err.message });
    if (failure.startMapFor !== null) this.startMissedMaps(failure.startMapFor);
    if (failure.wasActive) this.log({ event: 'replica-error', replica: r.address, reason: err.message });
    if (failure.faulted !== null && !failure.superseded) this.log({ event: 'faulted', reason: failure.faulted });
  }

  /** MISSED_START(key) to every RW/WO replica in the write set, sent now. */
  private startMissedMaps(key: string): void {
    const payload = Buffer.from(key);
    for (const x of this.set.writeTargets()) {
      const client = x.client!;
      client.send(Op.MISSED_START, 0, 0, 0, payload, (err) => {
        if (err === null || isUnsupported(err)) return;
        // Without the map a later delta rebuild from it would miss writes: it must not serve.
        if (x.client === client) this.setErr(x, new ZebuError(err.code, `cannot start the missed-write map of ${key}: ${err.message}`));
      });
    }
  }

  private faultError(): ZebuError {
    return new ZebuError(this.superseded ? ErrorCode.FENCED : ErrorCode.EIO, `volume ${this.name} is faulted: ${this.faultedReason}`);
  }

  private pingAll(): void {
    for (const r of this.replicas) {
      if (r.client === null || r.mode === ReplicaMode.ERR) continue;
      const client = r.client;
      client.send(Op.PING, 0, 0, 0, EMPTY, (err) => {
        if (err !== null && r.client === client) this.setErr(r, err);
      });
    }
  }

  // ---- request admission (pause for snapshots) ---------------------------------------------

  private get paused(): boolean {
    return this.pauseDepth > 0;
  }

  private admit(fn: () => void): void {
    if (this.pauseDepth === 0) {
      this.inflight++;
      fn();
      return;
    }
    if (this.queued.length >= MAX_QUEUED_WHILE_PAUSED) {
      // Bounded: callers see the error instead of memory growing without end.
      throw new ZebuError(ErrorCode.BUSY, `volume ${this.name}: too many requests queued behind a snapshot`);
    }
    this.queued.push(() => {
      this.inflight++;
      fn();
    });
  }

  private finished(): void {
    this.inflight--;
    assert(this.inflight >= 0, 'engine in-flight count');
    if (this.inflight === 0 && this.drainWaiters.length > 0) {
      const waiters = this.drainWaiters;
      this.drainWaiters = [];
      for (const w of waiters) w();
    }
  }

  /**
   * Holds new I/O and waits for what is in flight. Pauses nest: two control operations at once
   * (a snapshot and an expansion) each get a quiet volume, and I/O resumes after the last one.
   */
  private async pauseAndDrain(): Promise<void> {
    this.pauseDepth++;
    if (this.inflight > 0) await new Promise<void>((resolve) => this.drainWaiters.push(resolve));
  }

  private resume(): void {
    this.pauseDepth--;
    assert(this.pauseDepth >= 0, 'engine pause depth');
    if (this.pauseDepth > 0) return;
    const queued = this.queued;
    this.queued = [];
    for (const fn of queued) fn();
  }

  /** Range claims for a copy or a compare; call with I/O paused and drained, so every write from now on is tracked. */
  private useClaims(): RangeClaims {
    this.claims ??= new RangeClaims();
    this.claimUsers++;
    return this.claims;
  }

  private dropClaims(): void {
    this.claimUsers--;
    assert(this.claimUsers >= 0, 'engine claim users');
    if (this.claimUsers > 0 || this.claims === null) return;
    const claims = this.claims;
    this.claims = null;
    claims.releaseAll();
  }

  // ---- active regions (the write-intent bound) -----------------------------------------------

  /** A write was sent; counted until it completes (regionsWritten). */
  private regionsStarted(offset: number, length: number): void {
    this.regions.started(offset, length);
  }

  private regionsWritten(offset: number, length: number): void {
    const now = this.clock.nowMs();
    this.lastWriteDoneMs = now;
    this.regions.written(offset, length, this.flushes.sent, now);
  }

  /** Sends the held writes that fit now (all of them with `force`), in arrival order. */
  private admitHeld(force: boolean): void {
    while (this.held.length > 0) {
      const h = this.held[0];
      if (!force && !this.regions.fits(h.offset, h.length)) return;
      this.held.shift();
      h.send();
    }
  }

  /** While writes are held: one engine flush at a time, each letting the regions the previous confirmed go. */
  private pumpFlushes(): void {
    if (this.boundFlushRunning || this.held.length === 0) return;
    this.boundFlushRunning = true;
    this.inflight++;
    this.stats.boundFlushes++;
    this.fanOutFlush((err) => {
      this.boundFlushRunning = false;
      // Faulted: the held writes fail at once in fanOut.
      if (err !== null) this.admitHeld(true);
      this.finished();
      this.pumpFlushes();
    });
  }

  /** A numbered FLUSH to the write set, carrying `confirmed`; regions it lets go leave here too. */
  private fanOutFlush(done: Done, evictConfirmed = false): void {
    this.lastFlushSentMs = this.clock.nowMs();
    const seq = this.flushes.next();
    const confirmed = this.flushes.confirmed;
    // Writes held at the bound: let every confirmed region go, idle or not. (Not sooner: a working
    // set as large as the bound would then leave and come back at every flush.)
    const evict = evictConfirmed || this.held.length > 0;
    if (confirmed > 0) this.regions.prune(confirmed, leaveIdleBefore(this.lastFlushSentMs, INTENT_IDLE_MS, evict));
    this.fanOut(Op.FLUSH, evict ? RequestFlag.EVICT : 0, seq, 0, confirmed > 0 ? encodeFlushConfirmed(confirmed) : EMPTY, (err) => {
      if (err === null) this.flushes.completed(seq);
      done(err);
    });
    // Regions just left: held writes that fit go now, behind the flush on every connection.
    if (this.held.length > 0) this.admitHeld(false);
  }

  /** The engine's own flush once the volume went quiet with regions still active (IDLE_FLUSH_MS). */
  private idleFlush(): void {
    if (this.regions.size === 0 || this.faultedReason !== null || this.closed || this.paused || this.boundFlushRunning || this.inflight > 0) return;
    const now = this.clock.nowMs();
    if (now - this.lastFlushSentMs < IDLE_FLUSH_MS || now - this.lastWriteDoneMs < IDLE_FLUSH_MS) return;
    this.inflight++;
    this.stats.idleFlushes++;
    this.fanOutFlush(() => this.finished());
  }

  /** fanOutFlush as a promise, for control paths that hold I/O themselves. */
  /** `evict`: confirmed regions leave at once, idle or not (no client writes them: start-up). */
  private flushNumbered(options: { evict?: boolean } = {}): Promise<void> {
    return new Promise<void>((resolve, reject) => this.fanOutFlush((err) => (err ? reject(err) : resolve()), options.evict === true));
  }

  // ---- fan-out -------------------------------------------------------------------------------

  /** Sends one request to every RW and WO replica; `done` once all have answered (write-ack.ts). */
  private fanOut(op: number, flags: number, offset: number, length: number, payload: Buffer, done: Done): void {
    if (this.faultedReason !== null) return done(this.faultError());
    const targets = this.set.writeTargets();
    if (targets.length === 0) return done(this.faultError());
    const ack = new WriteAck<EngineReplica>(targets.length);
    for (const r of targets) {
      const client = r.client!;
      client.send(op, flags, offset, length, payload, (err) => {
        let last: boolean;
        if (err === null) {
          last = ack.applied(r.mode === ReplicaMode.RW && r.client === client);
        } else if (err.code === ErrorCode.EINVAL) {
          // The request itself is bad (the replica says so), not the replica's fault — unless
          // another replica took it, which is decided once all have answered.
          last = ack.refusedBy(r, err);
        } else {
          if (r.client === client) this.setErr(r, err);
          last = ack.failedOn(r);
        }
        if (!last) return;
        const verdict = ack.verdict(isOut);
        if (verdict.kind === 'ack') {
          for (const x of verdict.refusedBy) {
            // (A member's link never changes while it is in the set: not ERR means the same link.)
            if (x.member.mode !== ReplicaMode.ERR) this.setErr(x.member, new ZebuError(ErrorCode.EIO, `refused a request the other replicas applied: ${x.err.message}`));
          }
          done(null);
        } else if (verdict.kind === 'refused') {
          done(verdict.err);
        } else {
          done(this.faultedReason !== null ? this.faultError() : new ZebuError(ErrorCode.EIO, `volume ${this.name}: no RW replica accepted the request`));
        }
      });
    }
  }

  /** A RW replica for a read (replica-set.ts: local first, then least outstanding). */
  private pickReader(exclude: Set<EngineReplica>): EngineReplica | null {
    return this.set.pickReader(exclude);
  }

  private readFrom(op: number, offset: number, length: number, tried: Set<EngineReplica>, done: (err: ZebuError | null, data: Buffer) => void): void {
    if (this.faultedReason !== null) return done(this.faultError(), EMPTY);
    const r = this.pickReader(tried);
    if (r === null) return done(new ZebuError(ErrorCode.EIO, `volume ${this.name}: no RW replica could serve the read`), EMPTY);
    const client = r.client!;
    client.send(op, 0, offset, length, EMPTY, (err, data) => {
      if (err === null) return done(null, data);
      if (err.code === ErrorCode.EINVAL) return done(err, EMPTY);
      if (r.client === client) this.setErr(r, err);
      tried.add(r);
      this.readFrom(op, offset, length, tried, done);
    });
  }

  // ---- BlockBackend --------------------------------------------------------------------------

  checkEpoch(): Promise<void> {
    // The frontend talks to its engine over a private socket; fencing happens at the replicas.
    return Promise.resolve();
  }

  private checkRange(offset: number, length: number): void {
    if (!Number.isSafeInteger(offset) || offset < 0 || length < 0 || offset + length > this.sizeBytes) {
      throw new ZebuError(ErrorCode.EINVAL, `range ${offset}+${length} is outside the volume (${this.sizeBytes} bytes)`);
    }
  }

  read(offset: number, length: number, out: Buffer, outOffset: number): Promise<void> {
    this.checkRange(offset, length);
    const started = this.clock.nowMs();
    return new Promise((resolve, reject) => {
      this.admit(() =>
        this.readFrom(Op.READ, offset, length, new Set(), (err, data) => {
          this.finished();
          if (err !== null) {
            this.stats.errors++;
            return reject(err);
          }
          assert(data.length === length, `replica returned ${data.length} bytes for a ${length}-byte read`);
          data.copy(out, outOffset);
          ioBuffers.release(data);
          this.stats.reads++;
          this.stats.readBytes += length;
          this.stats.readLatencyMsTotal += this.clock.nowMs() - started;
          resolve();
        }),
      );
    });
  }

  readSnapshot(name: string, offset: number, length: number, out: Buffer, outOffset: number): Promise<void> {
    this.checkRange(offset, length);
    return this.askReplicas((client) => client.readSnapshot(name, offset, length)).then((data) => {
      assert(data.length === length, `replica returned ${data.length} bytes for a ${length}-byte snapshot read`);
      data.copy(out, outOffset);
      ioBuffers.release(data);
    });
  }

  snapshotChanges(name: string | null, base: string | null, offset: number, length: number, aboveImage = false): Promise<BackendExtent[]> {
    this.checkRange(offset, length);
    return this.askReplicas((client) => client.snapshotChanges(name, base, offset, length, aboveImage));
  }

  /**
   * A request any RW replica can answer (snapshot reads): tried on one, then on the next when it
   * fails for a reason of its own (the replica is set ERR as a failed read would). Bad input and
   * a missing snapshot are the answer, not a replica's fault.
   */
  private async askReplicas<T>(run: (client: DataClient) => Promise<T>): Promise<T> {
    const tried = new Set<EngineReplica>();
    for (;;) {
      if (this.faultedReason !== null) throw this.faultError();
      const r = this.pickReader(tried);
      if (r === null) throw new ZebuError(ErrorCode.EIO, `volume ${this.name}: no RW replica could serve the request`);
      const client = r.client!;
      try {
        return await run(client);
      } catch (err) {
        const e = toZebuError(err);
        if (e.code === ErrorCode.EINVAL || e.code === ErrorCode.NOT_FOUND) throw e;
        if (r.client === client) this.setErr(r, e);
        tried.add(r);
      }
    }
  }

  private fanOutPromise(op: number, flags: number, offset: number, length: number, payload: Buffer): Promise<void> {
    return new Promise((resolve, reject) => {
      // Zero-length requests touch no region; flushes none either.
      const tracked = op !== Op.FLUSH && length > 0;
      const done = (err: ZebuError | null): void => {
        if (tracked) this.regionsWritten(offset, length);
        this.finished();
        if (err !== null) {
          this.stats.errors++;
          return reject(err);
        }
        resolve();
      };
      this.admit(() => {
        if (op === Op.FLUSH) return this.fanOutFlush(done);
        if (tracked && (this.held.length > 0 || !this.regions.fits(offset, length))) {
          // Over the bound (or behind a held write: writes keep their order): wait for regions to leave.
          this.stats.heldWrites++;
          this.held.push({ offset, length, send: () => this.sendWrite(op, flags, offset, length, payload, tracked, done) });
          this.pumpFlushes();
          return;
        }
        this.sendWrite(op, flags, offset, length, payload, tracked, done);
      });
    });
  }

  private sendWrite(op: number, flags: number, offset: number, length: number, payload: Buffer, tracked: boolean, done: Done): void {
    if (tracked) this.regionsStarted(offset, length);
    const claims = this.claims;
    if (claims === null) return this.fanOut(op, flags, offset, length, payload, done);
    // A rebuild or verify works on ranges: a write must not fall between a copy's read and its write.
    claims.whenRangeFree(offset, length, () => {
      const token = claims.writeStarted(offset, length);
      this.fanOut(op, flags, offset, length, payload, (err) => {
        claims.writeDone(token);
        done(err);
      });
    });
  }

  async write(offset: number, data: Buffer, options: { fua?: boolean } = {}): Promise<void> {
    this.checkRange(offset, data.length);
    const started = this.clock.nowMs();
    await this.fanOutPromise(Op.WRITE, options.fua ? RequestFlag.FUA : 0, offset, data.length, data);
    this.stats.writes++;
    this.stats.writeBytes += data.length;
    this.stats.writeLatencyMsTotal += this.clock.nowMs() - started;
  }

  async zero(offset: number, length: number, options: { fua?: boolean; trim?: boolean } = {}): Promise<void> {
    this.checkRange(offset, length);
    await this.fanOutPromise(options.trim ? Op.TRIM : Op.WRITE_ZEROES, options.fua ? RequestFlag.FUA : 0, offset, length, EMPTY);
    this.stats.zeroes++;
  }

  async flush(): Promise<void> {
    await this.fanOutPromise(Op.FLUSH, 0, 0, 0, EMPTY);
    this.stats.flushes++;
  }

  blockStatus(offset: number, length: number): Promise<BackendExtent[]> {
    this.checkRange(offset, length);
    return new Promise((resolve, reject) => {
      this.admit(() =>
        this.readFrom(Op.BLOCK_STATUS, offset, length, new Set(), (err, data) => {
          this.finished();
          if (err !== null) return reject(err);
          resolve(decodeExtents(data));
        }),
      );
    });
  }

  info(): unknown {
    return {
      name: this.name,
      phase: this.phase,
      /** While start-up waits for replicas: their keys, and since when. */
      waitingForReplicas: this.waitingFor,
      waitingSince: this.waitingSince,
      sizeBytes: this.sizeBytes,
      epoch: this.epoch,
      faulted: this.faulted,
      faultedReason: this.faultedReason,
      superseded: this.superseded,
      rebuilding: this.rebuilding !== null && this.rebuilding.cancelled === null,
      verifying: this.verifying,
      activeRegions: this.regions.size,
      maxActiveRegions: this.regions.maxActive,
      recovery: this.recoveryReport,
      lastVerify: this.lastVerify,
      lastRebuild: this.lastRebuild,
      replicas: this.replicaStatus(),
      stats: this.stats,
    };
  }

  private refuseDuringRebuild(what: string): void {
    if (this.rebuilding !== null) {
      throw new ZebuError(ErrorCode.BUSY, `volume ${this.name}: cannot ${what} while replica ${this.rebuilding.target.address} is being rebuilt`);
    }
  }

  /** Drains in-flight I/O, flushes, snapshots every replica with the same name, resumes. */
  async snapshotCreate(name: string): Promise<SnapshotInfo> {
    if (this.faultedReason !== null) throw this.faultError();
    this.refuseDuringRebuild('create a snapshot');
    await this.pauseAndDrain();
    try {
      await this.flushNumbered();
      const results = await this.onEveryActive((client) => client.snapshotCreate(name), true);
      return results[0];
    } finally {
      this.resume();
    }
  }

  /** Lists the snapshots of the first RW replica. */
  async snapshotList(): Promise<SnapshotInfo[]> {
    const r = this.pickReader(new Set());
    if (r === null) throw this.faultError();
    return r.client!.snapshotList();
  }

  async snapshotDelete(name: string): Promise<void> {
    this.refuseDuringRebuild('delete a snapshot');
    await this.onEveryActive((client) => client.snapshotDelete(name), false);
  }

  async snapshotRevert(name: string): Promise<void> {
    this.refuseDuringRebuild('revert to a snapshot');
    // A verify compares the live volume region by region: a revert under it is a false difference.
    if (this.verifying) throw new ZebuError(ErrorCode.BUSY, `volume ${this.name}: cannot revert to a snapshot while a verify runs`);
    await this.pauseAndDrain();
    try {
      await this.onEveryActive((client) => client.snapshotRevert(name), true);
    } finally {
      this.resume();
    }
  }

  /**
   * Runs a control request on every RW/WO replica. A replica that fails it with an I/O-class
   * error is set ERR; request errors (bad name, not found, exists) are returned to the caller.
   */
  private async onEveryActive<T>(fn: (client: DataClient) => Promise<T>, allMustHaveIt: boolean): Promise<T[]> {
    if (this.faultedReason !== null) throw this.faultError();
    const active = this.set.active();
    const settled = await Promise.allSettled(active.map((r) => fn(r.client!)));
    const ok: T[] = [];
    let requestError: ZebuError | null = null;
    for (const [i, s] of settled.entries()) {
      if (s.status === 'fulfilled') {
        if (active[i].mode === ReplicaMode.RW) ok.push(s.value);
        continue;
      }
      const err = s.reason as ZebuError;
      if (REQUEST_ERRORS.includes(err.code)) {
        requestError ??= err;
        if (allMustHaveIt && settled.some((x) => x.status === 'fulfilled')) this.setErr(active[i], err);
      } else {
        this.setErr(active[i], err);
      }
    }
    if (ok.length === 0) throw requestError ?? this.faultError();
    return ok;
  }

  // ---- replica set changes: add (rebuild), remove, expand -----------------------------------

  /**
   * Adds a replica (`HOST:PORT` or `KEY=HOST:PORT`) and starts rebuilding it from the RW
   * replicas; returns at once (progress is in replicaStatus()). A replica entry of the same
   * address or key that is ERR is replaced (a replica coming back).
   *
   * - An empty replica gets a full copy: the snapshots of the current chain, oldest first, each
   *   then snapshotted under the same name on the new replica; then the replica joins the write
   *   set as WO and the live volume is copied region by region, each region claimed against
   *   client writes (rebuild.ts).
   * - A non-empty one gets a delta rebuild when a RW replica holds a missed-write map for its key
   *   and its chain is the volume's: it joins as WO and only the regions of the map, its own active
   *   regions and the source's are copied. Otherwise EINVAL "not empty".
   * At the end, with I/O paused: flush, the source's write counter, RW.
   */
  async addReplica(entry: string): Promise<EngineReplicaStatus[]> {
    if (this.closed) throw new ZebuError(ErrorCode.CLOSED, `volume ${this.name}: the engine is closing`);
    if (this.phase !== 'serving') throw new ZebuError(ErrorCode.BUSY, `volume ${this.name}: the engine is starting; try again`);
    if (this.faultedReason !== null) throw this.faultError();
    const { key, named, address, host, port } = parseReplicaEntry(entry);
    const previous = (): EngineReplica | undefined => this.replicas.find((r) => r.address === address || r.key === key);
    const replaceable = (r: EngineReplica | undefined): boolean => r === undefined || (r.mode === ReplicaMode.ERR && r.client === null);
    if (!replaceable(previous())) throw new ZebuError(ErrorCode.EXISTS, `replica ${address} is already in volume ${this.name}`);
    // A rebuild that was stopped (target failed or removed) ends at its next step: wait for it.
    if (this.rebuilding !== null && this.rebuilding.cancelled !== null) await this.rebuildRun;
    if (this.rebuilding !== null) throw new ZebuError(ErrorCode.BUSY, `volume ${this.name}: replica ${this.rebuilding.target.address} is being rebuilt; one rebuild at a time`);
    if (this.paused) throw new ZebuError(ErrorCode.BUSY, `volume ${this.name} is busy (snapshot or expansion); try again`);
    const client = await this.connect(host, port);
    let info: ReplicaInfo;
    let snapshots: SnapshotInfo[] = [];
    let mapHolder: EngineReplica | null = null;
    try {
      info = await this.openChecked(client, key, named);
      // A replica on a backing image must have the volume's image: a rebuild copies only what
      // differs from it. (That it is the same image, the manager checks: the file's SHA-512.)
      const imageProblem = this.imageMismatch(info);
      if (imageProblem !== null) throw new ZebuError(ErrorCode.EINVAL, `replica ${address} cannot join volume ${this.name}: ${imageProblem}`);
      const { empty, served } = joinKind(info);
      if (!empty || served) {
        const delta = await this.deltaSource(key, info, client);
        if (typeof delta === 'string') {
          if (!empty) throw new ZebuError(ErrorCode.EINVAL, `replica ${address} is not empty (revision ${info.revision}, ${info.layerCount} layer(s)) and no delta rebuild is possible: ${delta}`);
        } else mapHolder = delta;
      }
      if (info.sizeBytes < this.sizeBytes) info = await client.expand(this.sizeBytes);
      if (info.sizeBytes !== this.sizeBytes) throw new ZebuError(ErrorCode.EINVAL, `replica ${address} has ${info.sizeBytes} bytes, the volume ${this.sizeBytes}`);
      if (mapHolder === null) snapshots = await this.snapshotList();
      // Checked again, with no await until the rebuild is registered: the awaits above let other
      // control requests in (an expansion or a snapshot would leave the new replica behind).
      if (this.rebuilding !== null || this.paused || !replaceable(previous()) || this.closed || this.faultedReason !== null) {
        throw new ZebuError(ErrorCode.BUSY, `volume ${this.name} changed while replica ${address} was being opened; try again`);
      }
      if (mapHolder !== null && (mapHolder.mode !== ReplicaMode.RW || mapHolder.client === null)) {
        throw new ZebuError(ErrorCode.BUSY, `volume ${this.name}: replica ${mapHolder.address} failed while replica ${address} was being opened; try again`);
      }
    } catch (err) {
      client.close();
      throw err;
    }
    const target: EngineReplica = {
      address, key, named, host, port, local: isLocalHost(host), client, mode: ReplicaMode.WO, reason: 'rebuilding', info, inWriteSet: false,
      rebuild: { copiedBytes: 0, totalBytes: mapHolder === null ? this.sizeBytes * (snapshots.length + 1) : 0, delta: mapHolder !== null },
    };
    this.set.add(target, previous());
    client.onClose((err) => {
      if (target.client === client) this.setErr(target, err);
    });
    if (mapHolder === null) this.beginRebuild(target, (rebuild) => this.runRebuild(rebuild, target, snapshotCopyPlan(snapshots)), { snapshots: snapshots.map((x) => x.name) });
    else this.beginRebuild(target, (rebuild) => this.runDeltaRebuild(rebuild, target, mapHolder), { delta: true, mapHolder: mapHolder.address });
    return this.replicaStatus();
  }

  /** Why a replica's backing image is not the volume's (as the RW replicas have it), or null. */
  private imageMismatch(info: ReplicaInfo): string | null {
    return imageMismatch(info, this.replicas.find((r) => r.mode === ReplicaMode.RW && r.info !== null)?.info ?? null);
  }

  /** Registers the rebuild of `target` (already in the list, WO) and runs it in the background. */
  private beginRebuild(target: EngineReplica, run: (rebuild: Rebuild<EngineReplica>) => Promise<void>, details: Record<string, unknown>): void {
    // Not in the write set until it joins: `inWriteSet` says when it does.
    const rebuild = new Rebuild(target, target.rebuild!);
    this.rebuilding = rebuild;
    const started = this.clock.nowMs();
    const progress = target.rebuild!;
    const record = (error: string | null): void => {
      this.lastRebuild = { at: new Date().toISOString(), replica: target.address, delta: progress.delta, copiedBytes: progress.copiedBytes, totalBytes: progress.totalBytes, durationMs: this.clock.nowMs() - started, error };
    };
    this.log({ event: 'rebuild-started', replica: target.address, ...details });
    this.rebuildRun = run(rebuild).then(
      () => {
        record(null);
        this.log({ event: 'rebuild-done', ...this.lastRebuild });
      },
      (err) => {
        const e = toZebuError(err);
        record(e.message);
        this.log({ event: 'rebuild-failed', replica: target.address, reason: e.message });
        if (target.mode !== ReplicaMode.ERR) this.setErr(target, new ZebuError(e.code, `rebuild failed: ${e.message}`), false);
        target.rebuild = null;
      },
    );
  }

  /**
   * The RW replica to copy a delta from for replica `key`, or why there is none: the replica must
   * have finished its last rebuild, and have the volume's chain; a RW replica must hold a map for it.
   */
  private async deltaSource(key: string, info: ReplicaInfo, client: DataClient): Promise<EngineReplica | string> {
    const unfinished = unfinishedFullRebuild(info);
    if (unfinished !== null) return unfinished;
    const rw = this.set.healthy().filter((r) => r.key !== key);
    if (rw.length === 0) return 'no RW replica';
    const [ours, theirs] = await Promise.all([rw[0].client!.snapshotList(), client.snapshotList()]);
    const refusal = deltaRefusal(info, chainNames(ours), chainNames(theirs), rw[0].info?.hasBase ?? info.hasBase);
    if (refusal !== null) return refusal;
    for (const r of rw) {
      try {
        await r.client!.missedGet(key);
        return r;
      } catch {
        // NOT_FOUND (no map), an older replica, or a failure: ask the next one.
      }
    }
    return `no RW replica holds a missed-write map for ${key}`;
  }

  /** Reads from a RW replica (not the target); a failing one is set ERR and the next one tried. */
  private async readSource<T>(target: EngineReplica, check: () => void, fn: (client: DataClient) => Promise<T>): Promise<T> {
    for (;;) {
      check();
      const source = this.pickReader(new Set([target]));
      if (source === null) throw this.faultError();
      const client = source.client!;
      try {
        return await fn(client);
      } catch (err) {
        const e = toZebuError(err);
        if (e.code === ErrorCode.EINVAL || e.code === ErrorCode.NOT_FOUND || isUnsupported(e)) throw e;
        if (source.client === client) this.setErr(source, e);
      }
    }
  }

  private rebuildCheck(rebuild: Rebuild<EngineReplica>, target: EngineReplica): () => void {
    return () => {
      if (target.mode === ReplicaMode.ERR || target.client === null) throw new ZebuError(ErrorCode.EIO, `target failed: ${target.reason}`);
      if (rebuild.cancelled !== null) throw new ZebuError(ErrorCode.CLOSED, rebuild.cancelled);
      if (this.faultedReason !== null) throw this.faultError();
    };
  }

  /** The target joins the write set (no write in flight while it does); claims start with it. */
  private async joinWriteSet(target: EngineReplica, check: () => void): Promise<void> {
    await this.pauseAndDrain();
    try {
      check();
      // Nothing in flight: a write sent before it joined and acknowledged after would miss it.
      assert(this.inflight === 0, 'a replica joins the write set with a request in flight');
      this.set.join(target);
      this.useClaims();
    } finally {
      this.resume();
    }
  }

  /**
   * Copies region [offset, offset+length) from a RW replica to the target under a claim, as
   * `how` says what the target already holds there:
   *
   * - `status`: a region the source holds nothing of (BLOCK_STATUS) is skipped when the target
   *   holds nothing there either (`zeroIfEmpty` false), else zeroed;
   * - `image`: the target has the volume's backing image; a region where the source holds only
   *   the image's bytes is skipped when the target does too (`zeroIfEmpty` false), else copied;
   * - `since`: the target reads as snapshot `snapshot` of the source, and a region the live
   *   volume has not changed since that snapshot is skipped.
   *
   * Any other region is copied whole: one read and one write, however fragmented.
   */
  private async copyRegion(target: EngineReplica, check: () => void, offset: number, length: number, how: RegionCopy): Promise<void> {
    const claims = this.claims!;
    const claim = await claims.claim(offset, offset + length);
    try {
      check();
      const extents = how.kind === 'status'
        ? decodeExtents(await this.readSource(target, check, (c) => c.request(Op.BLOCK_STATUS, 0, offset, length)))
        : await this.readSource(target, check, (c) => c.snapshotChanges(null, how.kind === 'since' ? how.snapshot : null, offset, length, how.kind === 'image'));
      const holds = extents.some((extent) => extent.data);
      if (holds || (how.kind === 'image' && how.zeroIfEmpty)) {
        const data = await this.readSource(target, check, (c) => c.read(offset, length));
        check();
        // A region of zeros over an image, or zeroed since the snapshot, is marked, not written.
        if (how.kind !== 'status' && isAllZero(data)) await target.client!.writeZeroes(offset, length);
        else await target.client!.write(offset, data);
      } else if (how.kind === 'status' && how.zeroIfEmpty) {
        await target.client!.writeZeroes(offset, length);
      }
    } finally {
      claims.release(claim);
    }
  }

  /** The end of a rebuild: quiesce, make the copy durable with the source's write counter, RW. */
  private async finishRebuild(target: EngineReplica, check: () => void): Promise<void> {
    await this.pauseAndDrain();
    try {
      check();
      await this.flushNumbered();
      check();
      await this.handOverMissedMaps(target);
      check();
      await this.alignCounters();
      check();
      this.set.noteInfo(target, await target.client!.setRebuilding(null));
      check();
      // Whole again: no map may say otherwise. A map left behind (an invalid one above all) would
      // fail this replica again at every later start-up, and each time cost a full rebuild. Only
      // after the mark is cleared: a crash between the two leaves a complete replica with maps (a
      // redundant delta next time; the next start-up drops them), never a marked one without the
      // maps to finish its delta. The drops are sent now and not waited for: the replica is RW
      // from this moment, so were it lost while they are under way, it is lost as a RW replica and
      // new maps start behind the drops on the same connections — it comes back by a delta.
      // (Waited for before RW, a replica lost in between came back to no map: a full rebuild.)
      for (const r of this.replicas) if (r !== target && r.mode === ReplicaMode.RW) void this.controlOn(r, (c) => c.missedDrop(target.key));
      this.set.promote(target);
    } finally {
      this.rebuilding = null;
      this.resume();
    }
  }

  private async runRebuild(rebuild: Rebuild<EngineReplica>, target: EngineReplica, plan: SnapshotCopyPlan): Promise<void> {
    const progress = target.rebuild!;
    const regionBytes = REGION_BYTES;
    const check = this.rebuildCheck(rebuild, target);
    const readSource = <T>(fn: (client: DataClient) => Promise<T>): Promise<T> => this.readSource(target, check, fn);
    // On a backing image (the target has it too: addReplica checked): "empty" is the image's bytes.
    const aboveImage = target.info?.hasBase === true;
    let joined = false;
    try {
      // 0. From now until the end the copy is incomplete, and says so durably.
      await target.client!.setRebuilding('full');
      // 1. Every snapshot, parents before children: the target's head is moved (revert) onto the
      //    snapshot's parent, what the snapshot changed since that parent is written over it, and
      //    the head is snapshotted under the snapshot's name. A snapshot without a parent is
      //    written whole over the current tip — zeroing what holds data below but reads as zeros
      //    in the snapshot (a second root: its parent deleted; same data, another parent) — or,
      //    on a backing image, what differs from the image. At the end the head goes back onto
      //    the live volume's parent snapshot.
      //    `mayDiffer`: by snapshot (null: none yet), the regions where the target's view may
      //    differ from an empty volume (zeros, or the image).
      const mayDiffer = new Map<string | null, Set<number>>([[null, new Set()]]);
      let tip: string | null = null;
      for (const { name, parent } of plan.order) {
        if (parent !== null && parent !== tip) {
          await target.client!.snapshotRevert(parent);
          tip = parent;
        }
        const below = mayDiffer.get(tip)!;
        const differ = new Set<number>(parent !== null ? below : []);
        await this.forEachRegion(regionBytes, async (offset, length) => {
          const region = offset / regionBytes;
          progress.copiedBytes += length;
          if (parent !== null || aboveImage) {
            // Only what changed since the parent (the target holds the parent's view), or since
            // the image.
            const changes = await readSource((c) => c.snapshotChanges(name, parent, offset, length, parent === null));
            const changed = changes.some((extent) => extent.data);
            if (!changed && !(parent === null && below.has(region))) return;
            const data = await readSource((c) => c.readSnapshot(name, offset, length));
            check();
            if (isAllZero(data)) await target.client!.writeZeroes(offset, length);
            else await target.client!.write(offset, data);
            if (changed) differ.add(region);
            return;
          }
          const data = await readSource((c) => c.readSnapshot(name, offset, length));
          check();
          if (!isAllZero(data)) {
            await target.client!.write(offset, data);
            differ.add(region);
          } else if (below.has(region)) {
            await target.client!.writeZeroes(offset, length);
          }
        });
        check();
        await target.client!.snapshotCreate(name);
        mayDiffer.set(name, differ);
        tip = name;
      }
      if (plan.headParent !== null && plan.headParent !== tip) {
        await target.client!.snapshotRevert(plan.headParent);
        tip = plan.headParent;
      }
      const differ = mayDiffer.get(tip)!;

      // Maps the target kept from an earlier life name replicas as out that may be in the volume
      // now (and the snapshots just recreated made them invalid): left there, one would later
      // stand for a replica that never left and deny it its delta rebuild (found by the
      // simulator). Only maps started from now (it joins next) and those handed over at the end
      // are whole. (An older replica without maps has none to drop.)
      await this.controlOn(target, (c) => c.missedPrune([]));
      check();

      // 2. Join the write set, then copy the live volume: what changed since its parent snapshot
      //    (the target's head sits on it), or, without one, everything (over the image).
      await this.joinWriteSet(target, check);
      joined = true;
      await this.forEachRegion(regionBytes, async (offset, length) => {
        const zeroIfEmpty = differ.has(offset / regionBytes);
        await this.copyRegion(target, check, offset, length, liveRegionCopy(tip, aboveImage, zeroIfEmpty));
        progress.copiedBytes += length;
      });

      // 3. Quiesce, make the copy durable with the source's write counter, and serve reads from it.
      await this.finishRebuild(target, check);
    } finally {
      if (this.rebuilding === rebuild) this.rebuilding = null;
      if (joined) this.dropClaims();
    }
  }

  /**
   * A delta rebuild: the target held the volume until it went out; since then the RW replicas
   * recorded in a missed-write map which regions were written. Copied: the map (read once the
   * target is in the write set: nothing it misses from then on), the target's own active regions
   * (its writes that the others may not have) and the source's. Its maps are dropped at the end
   * (finishRebuild), as after a full rebuild.
   */
  private async runDeltaRebuild(rebuild: Rebuild<EngineReplica>, target: EngineReplica, mapHolder: EngineReplica): Promise<void> {
    const progress = target.rebuild!;
    const check = this.rebuildCheck(rebuild, target);
    let joined = false;
    try {
      await target.client!.setRebuilding('delta');
      // Before it joins: once it takes this engine's flushes its old active regions may leave.
      // Into the maps with them, durably: if this copy stops midway, the next engine copies the
      // delta again from the maps, and must not miss what only the target wrote before it went out.
      const targetActive = (await target.client!.intentGet()).active;
      await Promise.all(this.replicas.filter((r) => r !== target && r.mode === ReplicaMode.RW && r.client !== null).map(async (r) => {
        const client = r.client!;
        const has = await client.missedGet(target.key).then(() => true, () => false);
        if (has) await this.controlOn(r, (c) => c.missedMerge(target.key, targetActive, false));
      }));
      // Maps it kept from before it went out missed writes: only maps started from now are whole.
      await target.client!.missedPrune([]);
      await this.joinWriteSet(target, check);
      joined = true;
      check();
      if (mapHolder.mode !== ReplicaMode.RW || mapHolder.client === null) throw new ZebuError(ErrorCode.EIO, `replica ${mapHolder.address} holding the missed-write map failed`);
      const [missed, holderIntent] = await Promise.all([mapHolder.client.missedGet(target.key), mapHolder.client.intentGet()]);
      const regions = deltaRegions(missed, targetActive, holderIntent.active, this.regions.regionCount);
      for (const region of regions) progress.totalBytes += regionRange(region, REGION_BYTES, this.sizeBytes).length;
      this.log({ event: 'delta-rebuild-regions', replica: target.address, regions: regions.length, bytes: progress.totalBytes });
      await forEachIndex(regions.length, COPIERS, async (i) => {
        const { offset, length } = regionRange(regions[i], REGION_BYTES, this.sizeBytes);
        // The target may hold anything there: a region the source holds nothing of is zeroed
        // (or, on a backing image, given the image's bytes).
        await this.copyRegion(target, check, offset, length, target.info?.hasBase === true ? { kind: 'image', zeroIfEmpty: true } : { kind: 'status', zeroIfEmpty: true });
        progress.copiedBytes += length;
      });
      await this.finishRebuild(target, check);
    } finally {
      if (this.rebuilding === rebuild) this.rebuilding = null;
      if (joined) this.dropClaims();
    }
  }

  /** The delta rebuilds start-up decided, one after another, in the background. */
  private async runPendingDeltas(): Promise<void> {
    while (this.pendingDeltas.length > 0) {
      const r = this.pendingDeltas.shift()!;
      const client = r.client;
      if (client === null || this.closed) continue;
      try {
        await this.rebuildRun;
        if (this.closed || this.faultedReason !== null) throw new ZebuError(ErrorCode.CLOSED, 'the volume stopped serving');
        if (this.rebuilding !== null) throw new ZebuError(ErrorCode.BUSY, 'another rebuild started first');
        const holder = await this.deltaSource(r.key, r.info!, client);
        if (typeof holder === 'string') throw new ZebuError(ErrorCode.EINVAL, `no delta rebuild is possible: ${holder}`);
        if (r.client !== client || this.rebuilding !== null) throw new ZebuError(ErrorCode.BUSY, 'the replica or the volume changed');
        this.set.beginDelta(r, { copiedBytes: 0, totalBytes: 0, delta: true });
        client.onClose((err) => {
          if (r.client === client) this.setErr(r, err);
        });
        this.beginRebuild(r, (rebuild) => this.runDeltaRebuild(rebuild, r, holder), { delta: true, mapHolder: holder.address, atStart: true });
        await this.rebuildRun;
      } catch (err) {
        r.reason = `delta rebuild not started: ${(err as Error).message}`;
        if (r.client === client) {
          r.client = null;
          client.close();
        }
        this.log({ event: 'rebuild-failed', replica: r.address, reason: r.reason });
      }
    }
  }

  /**
   * Runs `fn` over the volume in regions, COPIERS at a time (a copy is round trips to two
   * replicas: several in flight keep both busy). The first failure stops the others.
   */
  private async forEachRegion(regionBytes: number, fn: (offset: number, length: number) => Promise<void>): Promise<void> {
    const count = Math.ceil(this.sizeBytes / regionBytes);
    await forEachIndex(count, COPIERS, (i) => {
      const { offset, length } = regionRange(i, regionBytes, this.sizeBytes);
      return fn(offset, length);
    });
  }

  // ---- verify --------------------------------------------------------------------------------

  /**
   * Compares the RW replicas region by region by hash (REGION_HASH), each region claimed against
   * client writes while it is compared (so it runs under live I/O). With `repair`, a region that
   * differs is copied from the source (a local RW replica, else the first) into the replicas that
   * differ, under the same claim.
   */
  async verify(options: { repair?: boolean } = {}): Promise<VerifyReport> {
    const repair = options.repair === true;
    if (this.closed) throw new ZebuError(ErrorCode.CLOSED, `volume ${this.name}: the engine is closing`);
    if (this.faultedReason !== null) throw this.faultError();
    if (this.verifying) throw new ZebuError(ErrorCode.BUSY, `volume ${this.name}: a verify is already running`);
    this.verifying = true;
    const started = this.clock.nowMs();
    let claimed = false;
    try {
      await this.pauseAndDrain();
      try {
        this.useClaims();
        claimed = true;
      } finally {
        this.resume();
      }
      const claims = this.claims!;
      const source = this.pickReader(new Set());
      if (source === null) throw this.faultError();
      const compared = this.replicas.filter((r) => r.mode === ReplicaMode.RW && r.client !== null);
      const tally = new VerifyTally();
      const regionCount = Math.ceil(this.sizeBytes / REGION_BYTES);
      await forEachIndex(regionCount, COPIERS, async (region) => {
        const { offset, length } = regionRange(region, REGION_BYTES, this.sizeBytes);
        const claim = await claims.claim(offset, offset + length);
        try {
          if (this.faultedReason !== null) throw this.faultError();
          if (source.mode !== ReplicaMode.RW) throw new ZebuError(ErrorCode.EIO, `verify source ${source.address} failed: ${source.reason}`);
          const now = compared.filter((r) => r.mode === ReplicaMode.RW && r.client !== null);
          const hashes = await Promise.all(now.map((r) => this.regionHashOn(r, offset, length)));
          const bad = differingFromSource(now, hashes, source);
          if (bad.length === 0) return;
          tally.differs(region, offset, length, now, hashes);
          this.log({ event: 'verify-difference', region, offset, length, replicas: bad.map((r) => r.address) });
          if (!repair) return;
          const data = await source.client!.read(offset, length);
          // Counted as a write to the region, as the replicas count it.
          this.regionsStarted(offset, length);
          try {
            await Promise.all(bad.map((r) => this.controlOn(r, (c) => c.write(offset, data))));
          } finally {
            this.regionsWritten(offset, length);
          }
          tally.repaired++;
        } finally {
          claims.release(claim);
        }
      });
      if (tally.repaired > 0) await this.flushNumbered();
      const report = tally.report(new Date(), repair, regionCount, compared.map((r) => r.address), source.address, this.clock.nowMs() - started);
      this.lastVerify = report;
      this.log({ event: 'verify', repair, regions: regionCount, differing: tally.differingCount, repaired: tally.repaired, durationMs: report.durationMs });
      return report;
    } finally {
      if (claimed) this.dropClaims();
      this.verifying = false;
    }
  }

  /** REGION_HASH on one replica (hex), null when the replica failed (it is set ERR). */
  private async regionHashOn(r: EngineReplica, offset: number, length: number): Promise<string | null> {
    const client = r.client;
    if (client === null) return null;
    try {
      return (await client.regionHash(offset, length)).toString('hex');
    } catch (err) {
      const e = toZebuError(err);
      if (isUnsupported(e) || e.code === ErrorCode.EINVAL) throw new ZebuError(e.code, `replica ${r.address} cannot hash regions: ${e.message}`);
      if (r.client === client) this.setErr(r, e);
      return null;
    }
  }

  /** Takes a replica (by address, key or KEY=ADDRESS) out of the volume for good (disconnects it). The last RW replica stays. */
  async removeReplica(address: string): Promise<EngineReplicaStatus[]> {
    // KEY=HOST:PORT (as it was added) names it too.
    const eq = address.lastIndexOf('=');
    const wanted = eq > 0 && address.lastIndexOf(':') > eq ? address.slice(eq + 1) : address;
    const at = this.replicas.findIndex((r) => r.address === wanted || r.key === address);
    if (at < 0) throw new ZebuError(ErrorCode.NOT_FOUND, `replica ${address} is not in volume ${this.name}`);
    const r = this.replicas[at];
    if (this.set.isLastRw(r)) {
      throw new ZebuError(ErrorCode.BUSY, `replica ${address} is the last RW replica of volume ${this.name}`);
    }
    if (this.rebuilding?.target === r) {
      // The copy stops at its next step; its request in flight (its durable "rebuilding" mark
      // first of all) completes before the connection goes.
      this.rebuilding.cancelled = `replica ${address} was removed`;
      await this.rebuildRun;
      if (!this.replicas.includes(r)) return this.replicaStatus();
    }
    this.pendingDeltas = this.pendingDeltas.filter((x) => x !== r);
    // ERR first: requests in flight to it no longer count, and its client closes.
    this.setErr(r, new ZebuError(ErrorCode.CLOSED, 'removed from the volume'), false);
    this.set.remove(r);
    // Out of the set, and not by a fault that a delta could repair: should it come back, only a
    // full rebuild will do (an invalid map says so; the next start-up prunes it if it is gone).
    for (const x of this.replicas) if (x.mode === ReplicaMode.RW) void this.controlOn(x, (c) => c.missedMerge(r.key, [], true));
    this.log({ event: 'replica-removed', replica: r.address });
    return this.replicaStatus();
  }

  /** Online expansion: with I/O paused, grows every RW/WO replica, then the volume. */
  async expand(sizeBytes: number): Promise<unknown> {
    if (!Number.isSafeInteger(sizeBytes) || sizeBytes % 4096 !== 0 || sizeBytes <= 0) {
      throw new ZebuError(ErrorCode.EINVAL, `sizeBytes must be a positive multiple of 4096, got ${sizeBytes}`);
    }
    if (sizeBytes < this.sizeBytes) throw new ZebuError(ErrorCode.EINVAL, `volume ${this.name} cannot shrink from ${this.sizeBytes} to ${sizeBytes} bytes`);
    if (sizeBytes === this.sizeBytes) return this.info();
    this.refuseDuringRebuild('expand');
    if (this.verifying) throw new ZebuError(ErrorCode.BUSY, `volume ${this.name}: cannot expand while a verify runs`);
    if (this.faultedReason !== null) throw this.faultError();
    await this.pauseAndDrain();
    try {
      await this.onEveryActive((client) => client.expand(sizeBytes), true);
      this.sizeBytes = sizeBytes;
      this.regions.resize(sizeBytes);
      this.log({ event: 'expanded', sizeBytes });
    } finally {
      this.resume();
    }
    return this.info();
  }

  /** Flushes what it can and disconnects from the replicas. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    if (this.rebuilding !== null) this.rebuilding.cancelled = 'the engine is closing';
    this.clock.clear(this.pingTimer);
    this.clock.clear(this.idleFlushTimer);
    // Two flushes: the second confirms the first, so the replicas' active regions leave and the
    // next start has (almost) nothing to resync.
    if (this.faultedReason === null) await this.flush().then(() => this.flush()).catch(() => {});
    for (const r of this.replicas) {
      const client = r.client;
      r.client = null;
      client?.close();
    }
  }
}

