/**
 * The volume controller: one engine per attached volume, over N replica connections.
 * See docs/architecture.md and docs/crash-consistency.md.
 *
 * This file is the shell: links, timers, client requests, snapshots, expansion and verify. The
 * start-up and rebuild sequences are modules of their own (startup-sequence.ts,
 * rebuild-sequence.ts), each given a narrow view of this engine. What to decide is in pure
 * modules: the replica set and modes (replica-set.ts), when a write is acknowledged
 * (write-ack.ts), flush numbers and the active-region bound (active-regions.ts), the start-up plan
 * (startup.ts), rebuild and delta planning (rebuild-plan.ts), verify's comparison (verify.ts).
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
import type { BlockBackend, BackendExtent, ReadView, ReadViewReplica } from '../protocol/backend.ts';
import type { ReplicaInfo, SnapshotInfo } from '../replica/replica.ts';
import { INTENT_IDLE_MS, leaveIdleBefore } from '../replica/intent-log.ts';
import { ActiveRegions, FlushSequence } from './active-regions.ts';
import { WriteAck } from './write-ack.ts';
import { runVerify } from './verify-sequence.ts';
import { deltaRefusal, fullResumeRefusal, imageMismatch, joinKind, snapshotCopyPlan, unfinishedFullRebuild } from './rebuild-plan.ts';
import { ReplicaSet, ReplicaMode, type EngineReplica as SetMember } from './replica-set.ts';
import { Rebuild, RangeClaims, type RebuildProgress } from './rebuild.ts';
import { COPY_CHUNK_BYTES, emptyLeaseCounters, type LeaseCounters } from './leased-copy.ts';
import type { RegionCopier } from './copier-process.ts';
import { RebuildPacer } from './rebuild-pacer.ts';
import { runDeltaRebuild, runFullRebuild, DEFAULT_SNAPSHOT_COPY_FLUSH_MS, type FullResume, type RebuildHost } from './rebuild-sequence.ts';
import { runStartup, type StartupHost } from './startup-sequence.ts';

export type { RebuildProgress };
import { ioBuffers, LentBuffer } from '../protocol/buffer-pool.ts';
import { REGION_BYTES, chainNames, isUnsupported, type RecoveryReport, type VerifyReport } from './recovery.ts';

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
  /**
   * A rebuild's copy holding a region lease that a client write recalled has this long to give it
   * back before the lease is revoked and the write goes on (default 4000; 0: wait for ever).
   */
  leaseRecallTimeoutMs?: number;
  /** Revokes one region of a rebuild may take before the rebuild fails (default 5). */
  maxRegionRetries?: number;
  /**
   * Bytes a rebuild copies per chunk under a region lease (default 256 KiB): what a client write
   * to a region being copied waits for at most. A multiple of 4 KiB, at most a region (4 MiB: the
   * whole region is copied as one, as before leases).
   */
  copyChunkBytes?: number;
  /**
   * The rebuild target pulls each chunk from a source replica itself (COPY_FROM), so the data does
   * not pass through the engine (default true; false: the engine reads and writes every chunk).
   */
  copyPull?: boolean;
  /**
   * While a full rebuild copies snapshots, the target is flushed at most this often (default
   * 1000 ms), so that what it holds of the snapshot under way survives a stop and is not copied
   * again (rebuild-sequence.ts). The simulator varies it.
   */
  snapshotCopyFlushMs?: number;
  /**
   * What a rebuild may write to its target per second at most (default 0: no limit), so that a
   * rebuild leaves the disks and the network to clients; setRebuildLimit changes it while the
   * engine runs.
   */
  rebuildMaxBytesPerSecond?: number;
  /**
   * Where a rebuild copies the live volume's regions: a copier process (copier-process.ts), so
   * the copy costs the engine a few messages per lease. Null (default): on the engine's event loop.
   */
  copier?: RegionCopier | null;
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
  /** Its rebuild stopped (or is under way) past the point where it can go on by a delta: worth waiting for when it fails. */
  resumable: boolean;
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
  /** Client writes that waited for a range claim: a rebuild's lease (recalled for them) or a verify's compare. */
  claimWaits: number;
  /** The longest of those waits (ms): what a rebuild or verify cost one write at most. */
  claimWaitLongestMs: number;
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
const MAX_QUEUED_WHILE_PAUSED = 4096;
const DEFAULT_MAX_ACTIVE_REGIONS = 256;
const DEFAULT_REPLICA_WAIT_MS = 30_000;
/** Well under the replica request timeout: a revoke is a request to the target too. */
export const DEFAULT_LEASE_RECALL_TIMEOUT_MS = 4000;
export const DEFAULT_MAX_REGION_RETRIES = 5;
/** Regions a rebuild copies at once while clients use the volume (client I/O comes first). */
const BUSY_COPY_TURNS = 2;
/**
 * While clients use the volume, a copy turn (then one chunk: leased-copy.ts) keeps its place
 * this many times as long as it took before the next copy may take it: the rebuild copies about
 * a third of the time, in small steps, and leaves the rest of the machine to client I/O however
 * fast or slow a copy is here. Measured with fio 4k random writes (iodepth 16) on 2 cores, eight
 * runs each: p99 during a rebuild 1.8-2.7x (mean 2.2x) the p99 without one with neither, 1.4-2.9x
 * (mean 1.8x, median 1.7x) with both, and more client IOPS. The rebuild goes on at full speed
 * once clients are quiet (CLIENT_QUIET_MS).
 */
const BUSY_TURN_REST = 2;
/** Clients count as busy until this long after their last answer. */
const CLIENT_QUIET_MS = 50;

/** A delta rebuild decided at start-up waits for a pause (expansion, snapshot) to end, looking this often. */
const PAUSED_RETRY_MS = 20;

/** A replica request unanswered this long fails the replica (EngineOptions.requestTimeoutMs). */
const DEFAULT_REQUEST_TIMEOUT_MS = 8000;

/**
 * A READ_REPORT of direct reads keeps clients counted busy this long: the frontend reports every
 * READ_REPORT_MS while it reads (src/frontend/engine-link.ts), so a reading client is seen as one
 * the engine serves itself is (a rebuild's copy then yields to it).
 */
const DIRECT_READS_BUSY_MS = 250 + CLIENT_QUIET_MS;

/** The server process a replica's last report came from (its INFO `instance`), or null. */
function serverInstance(r: SetMember<DataClient>): string | null {
  const instance = (r.info as { instance?: unknown } | null)?.instance;
  return typeof instance === 'string' ? instance : null;
}

/** A frontend waiting for its read view to change (READ_VIEW). */
interface ViewWatcher {
  answer: (view: ReadView) => void;
  timer: ClockTimer;
}
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


export class Engine implements BlockBackend {
  readonly name: string;
  /** Grows with an online expansion (expand()). */
  sizeBytes: number;
  readonly epoch: number;
  private readonly replicas: EngineReplica[];
  /** Modes, the write set, readers, faulted (replica-set.ts); `replicas` is its member list. */
  private readonly set: ReplicaSet<DataClient>;
  private readonly options: Required<Omit<EngineOptions, 'replicas' | 'leaseRecallTimeoutMs' | 'maxRegionRetries' | 'copyChunkBytes' | 'copyPull' | 'copier' | 'snapshotCopyFlushMs' | 'rebuildMaxBytesPerSecond'>>;
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
  /** Claim (and lease) ids are never handed out twice by one engine, whatever claims object holds them. */
  private nextClaimId = 1;
  /** Rebuild leases a client write recalled: the timer that revokes each one. */
  private readonly leaseTimers = new Map<number, ClockTimer>();
  /** What the frontend may read from itself (READ_VIEW); `readViewKey` names its replicas. */
  private readView: ReadView;
  private readViewKey = '';
  private readonly viewWatchers = new Set<ViewWatcher>();
  /** Until when reports of direct reads count clients busy. */
  private directReadsBusyUntilMs = 0;
  readonly leaseCounters: LeaseCounters = emptyLeaseCounters();
  private readonly leaseRecallTimeoutMs: number;
  /** Chunk copies under way, and copies waiting for a turn (see copyTurn). */
  private copyTurnsUsed = 0;
  private copyTurnWaiters: (() => void)[] = [];
  /** When the last client request was answered (clock.nowMs()), and the engine's own flushes in `inflight`. */
  private lastClientDoneMs = -Infinity;
  private internalInflight = 0;
  private readonly maxRegionRetries: number;
  private readonly copyChunkBytes: number;
  private readonly snapshotCopyFlushMs: number;
  private readonly rebuildPacer: RebuildPacer;
  private readonly pullCopies: boolean;
  private readonly copier: RegionCopier | null;
  private verifying = false;
  /** Replicas behind the source at start-up that wait for their delta rebuild (with their client). */
  private readonly pendingDeltas: EngineReplica[] = [];
  private recoveryReport: RecoveryReport | null = null;
  private lastVerify: VerifyReport | null = null;
  private readonly rebuildHost: RebuildHost;
  private readonly startupHost: StartupHost;
  /**
   * The last rebuild's outcome. `keptSnapshots`: a full rebuild that went on over what its target
   * completed before it stopped, and the snapshots it found whole there; `wentOnWithin`: the
   * snapshot whose copy the stop cut short, and how many of its regions were kept.
   */
  private lastRebuild: { at: string; replica: string; delta: boolean; copiedBytes: number; totalBytes: number; durationMs: number; error: string | null; keptSnapshots?: string[]; wentOnWithin?: FullResume['within'] } | null = null;
  /** Replicas (by key) whose full rebuild cannot go on, and why (a snapshot differed). */
  private readonly resumeRefused = new Map<string, string>();

  /** Flush numbers: the last sent, and `confirmed` (every flush up to it completed everywhere). */
  private readonly flushes = new FlushSequence();
  /** The active regions as the replicas count them (same rule, conservative stamps), to bound them. */
  private readonly regions: ActiveRegions;
  private held: HeldWrite[] = [];
  private boundFlushRunning = false;

  readonly stats: EngineStats = {
    reads: 0, writes: 0, zeroes: 0, flushes: 0, readBytes: 0, writeBytes: 0, errors: 0, readLatencyMsTotal: 0, writeLatencyMsTotal: 0,
    heldWrites: 0, boundFlushes: 0, idleFlushes: 0, claimWaits: 0, claimWaitLongestMs: 0,
  };

  private constructor(options: EngineOptions) {
    this.name = options.name;
    this.sizeBytes = options.sizeBytes;
    this.epoch = options.epoch;
    this.options = {
      requestTimeoutMs: DEFAULT_REQUEST_TIMEOUT_MS, pingIntervalMs: 2000, log: () => {}, maxActiveRegions: DEFAULT_MAX_ACTIVE_REGIONS, replicaWaitMs: DEFAULT_REPLICA_WAIT_MS, outReplicas: [],
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
    this.options.requestTimeoutMs = options.requestTimeoutMs ?? DEFAULT_REQUEST_TIMEOUT_MS;
    this.readView = { generation: 1, epoch: this.epoch, timeoutMs: this.options.requestTimeoutMs, replicas: [] };
    if (!Number.isSafeInteger(this.options.replicaWaitMs) || this.options.replicaWaitMs < 0) {
      throw new ZebuError(ErrorCode.EINVAL, `replicaWaitMs must be a whole number of milliseconds >= 0, got ${this.options.replicaWaitMs}`);
    }
    // An explicit `undefined` in options (an absent CLI flag) means the default too.
    const maxActiveRegions = options.maxActiveRegions ?? DEFAULT_MAX_ACTIVE_REGIONS;
    if (!Number.isInteger(maxActiveRegions) || maxActiveRegions < 1) {
      throw new ZebuError(ErrorCode.EINVAL, `maxActiveRegions must be a positive integer, got ${maxActiveRegions}`);
    }
    this.regions = new ActiveRegions(REGION_BYTES, maxActiveRegions, this.sizeBytes);
    this.leaseRecallTimeoutMs = options.leaseRecallTimeoutMs ?? DEFAULT_LEASE_RECALL_TIMEOUT_MS;
    this.maxRegionRetries = options.maxRegionRetries ?? DEFAULT_MAX_REGION_RETRIES;
    if (!Number.isSafeInteger(this.leaseRecallTimeoutMs) || this.leaseRecallTimeoutMs < 0) {
      throw new ZebuError(ErrorCode.EINVAL, `leaseRecallTimeoutMs must be a whole number of milliseconds >= 0, got ${this.leaseRecallTimeoutMs}`);
    }
    this.copyChunkBytes = options.copyChunkBytes ?? COPY_CHUNK_BYTES;
    this.pullCopies = options.copyPull ?? true;
    this.snapshotCopyFlushMs = options.snapshotCopyFlushMs ?? DEFAULT_SNAPSHOT_COPY_FLUSH_MS;
    if (!Number.isSafeInteger(this.snapshotCopyFlushMs) || this.snapshotCopyFlushMs < 0) {
      throw new ZebuError(ErrorCode.EINVAL, `snapshotCopyFlushMs must be a whole number of milliseconds >= 0, got ${this.snapshotCopyFlushMs}`);
    }
    this.rebuildPacer = new RebuildPacer(options.rebuildMaxBytesPerSecond ?? 0, REGION_BYTES, () => this.clock.nowMs(), (ms) => this.clock.sleep(ms));
    this.copier = options.copier ?? null;
    if (!Number.isSafeInteger(this.copyChunkBytes) || this.copyChunkBytes < 4096 || this.copyChunkBytes % 4096 !== 0 || this.copyChunkBytes > REGION_BYTES) {
      throw new ZebuError(ErrorCode.EINVAL, `copyChunkBytes must be a multiple of 4096 between 4096 and ${REGION_BYTES}, got ${this.copyChunkBytes}`);
    }
    if (!Number.isSafeInteger(this.maxRegionRetries) || this.maxRegionRetries < 0) {
      throw new ZebuError(ErrorCode.EINVAL, `maxRegionRetries must be a whole number >= 0, got ${this.maxRegionRetries}`);
    }
    this.replicas = options.replicas.map((entry) => {
      const { key, named, address, host, port } = parseReplicaEntry(entry);
      return { address, key, named, host, port, local: isLocalHost(host), client: null, mode: ReplicaMode.ERR, reason: 'not connected', info: null, rebuild: null, inWriteSet: true };
    });
    this.set = new ReplicaSet(this.replicas, this.epoch);
    this.rebuildHost = this.makeRebuildHost();
    this.startupHost = this.makeStartupHost();
  }

  /** What the start-up sequence (startup-sequence.ts) may use of this engine. */
  private makeStartupHost(): StartupHost {
    const engine = this;
    return {
      name: engine.name,
      get sizeBytes() { return engine.sizeBytes; },
      clock: engine.clock,
      replicas: engine.replicas,
      set: engine.set,
      replicaWaitMs: engine.options.replicaWaitMs,
      outReplicas: engine.options.outReplicas,
      get closed() { return engine.closed; },
      get faultedReason() { return engine.faultedReason; },
      get waitingFor() { return engine.waitingFor; },
      set waitingFor(keys) { engine.waitingFor = keys; },
      get waitingSince() { return engine.waitingSince; },
      set waitingSince(at) { engine.waitingSince = at; },
      phaseTimes: engine.phaseTimes,
      pendingDeltas: engine.pendingDeltas,
      get recoveryReport() { return engine.recoveryReport; },
      set recoveryReport(report) { engine.recoveryReport = report; },
      connect: (host, port) => engine.connect(host, port),
      openChecked: (client, key, keyIsName) => engine.openChecked(client, key, keyIsName),
      setErr: (r, err) => engine.setErr(r, err),
      controlOn: (r, fn) => engine.controlOn(r, fn),
      markActive: (region, stamp) => engine.regions.markActive(region, stamp),
      flushNumbered: (options) => engine.flushNumbered(options),
      alignCounters: () => engine.alignCounters(),
      replicaStatus: () => engine.replicaStatus(),
      log: (event) => engine.log(event),
    };
  }

  /** What the rebuild and verify sequences (rebuild-sequence.ts, verify-sequence.ts) may use of this engine. */
  private makeRebuildHost(): RebuildHost {
    const engine = this;
    return {
      get sizeBytes() { return engine.sizeBytes; },
      get regionCount() { return engine.regions.regionCount; },
      replicas: engine.replicas,
      set: engine.set,
      get rebuilding() { return engine.rebuilding; },
      set rebuilding(rebuild) { engine.rebuilding = rebuild; },
      get claims() { return engine.claims; },
      get inflight() { return engine.inflight; },
      get faultedReason() { return engine.faultedReason; },
      faultError: () => engine.faultError(),
      pickReader: (exclude) => engine.pickReader(exclude),
      setErr: (r, err) => engine.setErr(r, err),
      controlOn: (r, fn) => engine.controlOn(r, fn),
      pauseAndDrain: () => engine.pauseAndDrain(),
      resume: () => engine.resume(),
      useClaims: () => engine.useClaims(),
      dropClaims: () => engine.dropClaims(),
      flushNumbered: () => engine.flushNumbered(),
      flushUnheld: () => engine.flushUnheld(),
      handOverMissedMaps: (target) => engine.handOverMissedMaps(target),
      alignCounters: () => engine.alignCounters(),
      regionsStarted: (offset, length) => engine.regionsStarted(offset, length),
      regionsWritten: (offset, length) => engine.regionsWritten(offset, length),
      acquireLease: (target, start, end, onRecall, onRevoke) => engine.acquireLease(target, start, end, onRecall, onRevoke),
      leaseWanted: (id) => engine.claims === null || !engine.claims.holds(id) || engine.claims.recalled(id),
      releaseLease: (id) => engine.releaseLease(id),
      revokeLease: (target, id) => {
        engine.clock.clear(engine.leaseTimers.get(id) ?? null);
        engine.revokeLease(target, id);
      },
      copier: engine.copier,
      epoch: engine.epoch,
      unleasedCopyId: () => (engine.claims !== null ? engine.claims.takeId() : engine.nextClaimId++),
      copyTurn: () => engine.copyTurn(),
      clientsBusy: () => engine.clientsBusy(),
      leaseCounters: engine.leaseCounters,
      maxRegionRetries: engine.maxRegionRetries,
      copyChunkBytes: engine.copyChunkBytes,
      copyPull: engine.pullCopies,
      snapshotCopyFlushMs: engine.snapshotCopyFlushMs,
      pacedCopy: (copy) => engine.rebuildPacer.paced(copy),
      nowMs: () => engine.clock.nowMs(),
      sleep: (ms) => engine.clock.sleep(ms),
      log: (event) => engine.log(event),
    };
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
    await runStartup(this.startupHost);
    if (this.closed) throw new ZebuError(ErrorCode.CLOSED, `volume ${this.name}: the engine closed during its start-up`);
    this.phase = 'serving';
    this.refreshReadView();
    this.pingTimer = this.clock.setInterval(() => this.pingAll(), this.options.pingIntervalMs).unref();
    this.idleFlushTimer = this.clock.setInterval(() => this.idleFlush(), Math.ceil(IDLE_FLUSH_MS / 2)).unref();
    // A replica whose full rebuild stopped while its snapshots were copied (this engine's
    // predecessor was killed) is out of the start-up; it is added again once the deltas are
    // done, and goes on over the snapshots it completed.
    const halfCopied = this.replicas.filter((r) => r.mode === ReplicaMode.ERR && r.info !== null && r.info.rebuilding && r.info.rebuildKind === 'full');
    if (this.pendingDeltas.length > 0 || halfCopied.length > 0) void this.runPendingRebuilds(halfCopied);
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
      // Worth waiting for when it fails: a delta goes on from the maps, a full rebuild over the
      // snapshots it completed (added again; at start-up the engine does it itself).
      resumable: r.info !== null && r.info.rebuilding && (r.info.rebuildKind === 'delta' || (r.info.rebuildKind === 'full' && !this.resumeRefused.has(r.key))),
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
    // Before any write acknowledged without it (its caller acknowledges after this returns): the
    // frontend stops reading from it first.
    this.refreshReadView();
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
    // A replica that became RW since (a rebuild's end) joins the view.
    this.refreshReadView();
    for (const r of this.replicas) {
      if (r.client === null || r.mode === ReplicaMode.ERR) continue;
      const client = r.client;
      client.send(Op.PING, 0, 0, 0, EMPTY, (err) => {
        if (err !== null && r.client === client) this.setErr(r, err);
      });
    }
  }

  // ---- read views ------------------------------------------------------------------------------

  /**
   * The replicas the frontend may read from itself: every RW replica, connected, whose server
   * instance is known (each holds every acknowledged write, for as long as it stays RW). A change
   * answers every waiting READ_VIEW at once. Called when a replica is set ERR (setErr: before the
   * acknowledgement of any write that left it out, so the withdrawal's reply precedes that
   * write's on the frontend's connection), at the start of serving, and with every ping round
   * (replicas that became RW).
   */
  private refreshReadView(): void {
    const replicas: ReadViewReplica[] = [];
    if (this.phase === 'serving' && this.faultedReason === null && !this.closed) {
      for (const r of this.set.healthy()) {
        const instance = serverInstance(r);
        if (instance !== null) replicas.push({ host: r.host, port: r.port, instance, local: r.local });
      }
    }
    replicas.sort((a, b) => Number(b.local) - Number(a.local));
    const key = replicas.map((r) => `${r.host}:${r.port}/${r.instance}`).join(',');
    if (key === this.readViewKey) return;
    this.readViewKey = key;
    this.readView = { generation: this.readView.generation + 1, epoch: this.epoch, timeoutMs: this.options.requestTimeoutMs, replicas };
    const watchers = [...this.viewWatchers];
    this.viewWatchers.clear();
    for (const w of watchers) {
      this.clock.clear(w.timer);
      w.answer(this.readView);
    }
  }

  watchReadView(known: number, holdMs: number, answer: (view: ReadView) => void): () => void {
    if (known !== this.readView.generation) {
      answer(this.readView);
      return () => {};
    }
    const watcher: ViewWatcher = {
      answer,
      timer: this.clock.setTimeout(() => {
        if (this.viewWatchers.delete(watcher)) answer(this.readView);
      }, holdMs),
    };
    this.viewWatchers.add(watcher);
    return () => {
      if (this.viewWatchers.delete(watcher)) this.clock.clear(watcher.timer);
    };
  }

  readFailed(replica: { host: string; port: number; instance: string }, error: string): void {
    const r = this.set.healthy().find((x) => x.host === replica.host && x.port === replica.port && serverInstance(x) === replica.instance);
    // Gone from the view already (failed, or another process now): nothing to do.
    if (r === undefined) return;
    this.setErr(r, new ZebuError(ErrorCode.EIO, `a read the frontend sent it directly failed: ${error}`));
  }

  reportReads(reads: number, bytes: number, micros: number): void {
    this.stats.reads += reads;
    this.stats.readBytes += bytes;
    this.stats.readLatencyMsTotal += micros / 1000;
    if (reads > 0) this.directReadsBusyUntilMs = this.clock.nowMs() + DIRECT_READS_BUSY_MS;
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

  /** A request counted in `inflight` is done; `internal`: one of the engine's own flushes. */
  private finished(internal = false): void {
    if (internal) this.internalInflight--;
    else this.lastClientDoneMs = this.clock.nowMs();
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

  // ---- rebuild leases (leased-copy.ts is the copier's side) ----------------------------------

  /** A lease on [start, end) for a copy to `target`: a client write recalls it; past the recall timeout it is revoked. */
  private acquireLease(target: EngineReplica, start: number, end: number, onRecall?: (id: number) => void, onRevoke?: (id: number) => void): Promise<number> {
    const claims = this.claims;
    assert(claims !== null, 'a lease is asked for with no claims in use');
    return claims.claim(start, end, (id) => {
      this.leaseCounters.recalls++;
      onRecall?.(id);
      if (this.leaseRecallTimeoutMs === 0 || this.closed) return;
      this.leaseTimers.set(id, this.clock.setTimeout(() => {
        if (this.revokeLease(target, id)) onRevoke?.(id);
      }, this.leaseRecallTimeoutMs));
    });
  }

  /**
   * A turn to copy a region under a lease (leased-copy.ts). Client I/O comes first: while clients
   * have requests in flight (or had some within CLIENT_QUIET_MS) at most BUSY_COPY_TURNS regions
   * are copied at once, else as many as the copiers ask for. Resolves with the function that ends
   * the turn.
   */
  private copyTurn(): Promise<() => void> {
    const take = (): (() => void) => {
      this.copyTurnsUsed++;
      const startedMs = this.clock.nowMs();
      let ended = false;
      return () => {
        if (ended) return;
        ended = true;
        const free = (): void => {
          this.copyTurnsUsed--;
          this.wakeCopyTurns();
        };
        // Clients busy: the turn's place rests before the next copy takes it (see BUSY_TURN_REST).
        const restMs = this.clientsBusy() ? (this.clock.nowMs() - startedMs) * BUSY_TURN_REST : 0;
        if (restMs >= 1) this.clock.setTimeout(free, restMs).unref();
        else free();
      };
    };
    if (this.copyTurnsUsed < this.copyTurnLimit()) return Promise.resolve(take());
    return new Promise((resolve) => this.copyTurnWaiters.push(() => resolve(take())));
  }

  private copyTurnLimit(): number {
    return this.clientsBusy() ? BUSY_COPY_TURNS : Number.POSITIVE_INFINITY;
  }

  /** Whether clients are using the volume now: a copy then takes less of the replicas. */
  private clientsBusy(): boolean {
    const now = this.clock.nowMs();
    return this.inflight > this.internalInflight || now - this.lastClientDoneMs < CLIENT_QUIET_MS || now < this.directReadsBusyUntilMs;
  }

  private wakeCopyTurns(): void {
    while (this.copyTurnWaiters.length > 0 && this.copyTurnsUsed < this.copyTurnLimit()) this.copyTurnWaiters.shift()!();
    // Nobody copies but someone waits (clients busy): let one go, or it would wait for ever.
    if (this.copyTurnsUsed === 0 && this.copyTurnWaiters.length > 0) this.copyTurnWaiters.shift()!();
  }

  private releaseLease(id: number): void {
    this.clock.clear(this.leaseTimers.get(id) ?? null);
    this.leaseTimers.delete(id);
    this.claims?.release(id);
  }

  /**
   * The copy did not give lease `id` back in time: the target refuses its copy writes from now
   * on (and has landed those under way) before the client writes waiting for it go on. A target
   * that cannot be told is out of the volume, and those writes no longer reach it.
   */
  private revokeLease(target: EngineReplica, id: number): boolean {
    this.leaseTimers.delete(id);
    const claims = this.claims;
    if (claims === null || !claims.holds(id)) return false;
    this.leaseCounters.revokes++;
    this.log({ event: 'rebuild-lease-revoked', replica: target.address, lease: id, recallTimeoutMs: this.leaseRecallTimeoutMs });
    const client = target.client;
    if (client === null || target.mode === ReplicaMode.ERR) {
      claims.release(id);
      return true;
    }
    client.leaseRevoke(id).then(
      () => claims.release(id),
      (err) => {
        if (target.client === client) this.setErr(target, new ZebuError(ErrorCode.EIO, `lease revoke failed: ${toZebuError(err).message}`));
        claims.release(id);
      },
    );
    return true;
  }

  /** Range claims for a copy or a compare; call with I/O paused and drained, so every write from now on is tracked. */
  private useClaims(): RangeClaims {
    this.claims ??= new RangeClaims(this.nextClaimId);
    this.claimUsers++;
    return this.claims;
  }

  private dropClaims(): void {
    this.claimUsers--;
    assert(this.claimUsers >= 0, 'engine claim users');
    if (this.claimUsers > 0 || this.claims === null) return;
    const claims = this.claims;
    this.claims = null;
    this.nextClaimId = claims.nextId;
    for (const timer of this.leaseTimers.values()) this.clock.clear(timer);
    this.leaseTimers.clear();
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
    this.internalInflight++;
    this.stats.boundFlushes++;
    this.fanOutFlush((err) => {
      this.boundFlushRunning = false;
      // Faulted: the held writes fail at once in fanOut.
      if (err !== null) this.admitHeld(true);
      this.finished(true);
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
    this.internalInflight++;
    this.stats.idleFlushes++;
    this.fanOutFlush(() => this.finished(true));
  }

  /** fanOutFlush as a promise, for control paths that hold I/O themselves. */
  /** `evict`: confirmed regions leave at once, idle or not (no client writes them: start-up). */
  private flushNumbered(options: { evict?: boolean } = {}): Promise<void> {
    return new Promise<void>((resolve, reject) => this.fanOutFlush((err) => (err ? reject(err) : resolve()), options.evict === true));
  }

  /**
   * A flush of every replica admitted like a client request (it waits behind a pause, and a pause
   * waits for it) but counted as the engine's own: clients are not made to look busy by it.
   */
  private flushUnheld(): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      this.admit(() => {
        this.internalInflight++;
        this.fanOutFlush((err) => {
          this.finished(true);
          if (err !== null) reject(err);
          else resolve();
        });
      });
    });
  }

  // ---- fan-out -------------------------------------------------------------------------------

  /**
   * Sends one request to every RW and WO replica; `done` once all have answered (write-ack.ts).
   * `lent`: the payload is an ioBuffers buffer given back once the request is answered and no
   * replica connection holds it any more (LentBuffer): the next large write reuses it (writeLent).
   */
  private fanOut(op: number, flags: number, offset: number, length: number, payload: Buffer, done: Done, lent = false): void {
    const targets = this.faultedReason === null ? this.set.writeTargets() : [];
    if (targets.length === 0) {
      if (lent) ioBuffers.release(payload);
      return done(this.faultError());
    }
    const loan = lent ? new LentBuffer(ioBuffers, payload) : null;
    if (loan !== null) {
      const answered = done;
      done = (err) => {
        loan.letGo();
        answered(err);
      };
    }
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
      }, null, loan?.hold() ?? null);
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

  private fanOutPromise(op: number, flags: number, offset: number, length: number, payload: Buffer, lent = false): Promise<void> {
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
          this.held.push({ offset, length, send: () => this.sendWrite(op, flags, offset, length, payload, tracked, done, lent) });
          this.pumpFlushes();
          return;
        }
        this.sendWrite(op, flags, offset, length, payload, tracked, done, lent);
      });
    });
  }

  private sendWrite(op: number, flags: number, offset: number, length: number, payload: Buffer, tracked: boolean, done: Done, lent: boolean): void {
    if (tracked) this.regionsStarted(offset, length);
    const claims = this.claims;
    if (claims === null) return this.fanOut(op, flags, offset, length, payload, done, lent);
    // A rebuild or verify works on ranges: a write must not fall between a copy's read and its write.
    const askedMs = this.clock.nowMs();
    // whenRangeFree runs the write at once when nothing is in its way: only a later run waited.
    let immediate = true;
    claims.whenRangeFree(offset, length, () => {
      if (!immediate) {
        this.stats.claimWaits++;
        this.stats.claimWaitLongestMs = Math.max(this.stats.claimWaitLongestMs, this.clock.nowMs() - askedMs);
      }
      const token = claims.writeStarted(offset, length);
      this.fanOut(op, flags, offset, length, payload, (err) => {
        claims.writeDone(token);
        done(err);
      }, lent);
    });
    immediate = false;
  }

  /** A client's write whose payload is an ioBuffers buffer: given back once no replica connection holds it. */
  writeLent(offset: number, data: Buffer): Promise<void> {
    return this.write(offset, data, { lent: true });
  }

  async write(offset: number, data: Buffer, options: { fua?: boolean; lent?: boolean } = {}): Promise<void> {
    this.checkRange(offset, data.length);
    const started = this.clock.nowMs();
    const length = data.length;
    await this.fanOutPromise(Op.WRITE, options.fua ? RequestFlag.FUA : 0, offset, length, data, options.lent === true);
    this.stats.writes++;
    this.stats.writeBytes += length;
    this.stats.writeLatencyMsTotal += this.clock.nowMs() - started;
  }

  async zero(offset: number, length: number, options: { fua?: boolean; trim?: boolean; noHole?: boolean } = {}): Promise<void> {
    this.checkRange(offset, length);
    const flags = (options.fua ? RequestFlag.FUA : 0) | (options.noHole ? RequestFlag.NO_HOLE : 0);
    await this.fanOutPromise(options.trim ? Op.TRIM : Op.WRITE_ZEROES, flags, offset, length, EMPTY);
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
      rebuildMaxBytesPerSecond: this.rebuildPacer.limit,
      rebuildLeases: this.claims?.leases() ?? [],
      replicas: this.replicaStatus(),
      stats: { ...this.stats, rebuildLeaseGrants: this.leaseCounters.grants, rebuildLeaseRecalls: this.leaseCounters.recalls, rebuildLeaseRevokes: this.leaseCounters.revokes, rebuildLeaseReplays: this.leaseCounters.replays, rebuildCopiersLost: this.leaseCounters.copiersLost },
    };
  }

  /** A new bandwidth limit for rebuilds (0: none); a rebuild under way takes it from its next region. */
  setRebuildLimit(bytesPerSecond: number): { rebuildMaxBytesPerSecond: number } {
    this.rebuildPacer.setLimit(bytesPerSecond);
    this.log({ event: 'rebuild-limit', bytesPerSecond });
    return { rebuildMaxBytesPerSecond: this.rebuildPacer.limit };
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
    await this.refuseOverLayerLimit();
    // Written back first with I/O going on, so that the flush under the pause is short (as at a
    // rebuild's end, rebuild-sequence.ts: what a busy volume holds unwritten took 300 ms there).
    await this.flushUnheld();
    await this.pauseAndDrain();
    try {
      // Again: a rebuild may have started while this waited (a delta decided at start-up).
      this.refuseDuringRebuild('create a snapshot');
      await this.flushNumbered();
      const results = await this.onEveryActive((client) => client.snapshotCreate(name), true);
      return results[0];
    } finally {
      this.resume();
    }
  }

  /**
   * A snapshot adds a layer to every replica: refused up front, with nothing paused or changed,
   * when a replica is at its maximum (a replica that cannot answer is left to the snapshot itself).
   */
  private async refuseOverLayerLimit(): Promise<void> {
    const infos = await Promise.allSettled(this.set.active().map((r) => r.client!.info()));
    for (const s of infos) {
      if (s.status !== 'fulfilled') continue;
      const { layerCount, maxLayers } = s.value;
      if (layerCount >= maxLayers) {
        throw new ZebuError(ErrorCode.EINVAL, `volume ${this.name}: its replicas hold ${layerCount} layers (snapshots, the live head and any backing image), the maximum is ${maxLayers}; delete snapshots first`);
      }
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
      this.refuseDuringRebuild('revert to a snapshot');
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
    let resume: FullResume | null = null;
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
          // A full rebuild of it that stopped midway goes on over the snapshots it completed.
          if (!empty && info.rebuilding && info.rebuildKind === 'full') {
            const theirs = await client.snapshotList();
            snapshots = await this.snapshotList();
            const refusal = this.resumeRefused.get(key) ?? fullResumeRefusal(info, theirs, snapshots);
            if (refusal !== null) {
              // Said in its status from now on: not worth waiting for (a new replica will come).
              this.resumeRefused.set(key, refusal);
              throw new ZebuError(ErrorCode.EINVAL, `replica ${address} is not empty and its full rebuild cannot go on: ${refusal}`);
            }
            resume = { snapshots: theirs, kept: [], within: null, refuse: (why) => this.resumeRefused.set(key, why) };
          } else if (!empty) throw new ZebuError(ErrorCode.EINVAL, `replica ${address} is not empty (revision ${info.revision}, ${info.layerCount} layer(s)) and no delta rebuild is possible: ${delta}`);
        } else mapHolder = delta;
      }
      if (info.sizeBytes < this.sizeBytes) info = await client.expand(this.sizeBytes);
      if (info.sizeBytes !== this.sizeBytes) throw new ZebuError(ErrorCode.EINVAL, `replica ${address} has ${info.sizeBytes} bytes, the volume ${this.sizeBytes}`);
      if (mapHolder === null && resume === null) snapshots = await this.snapshotList();
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
    if (mapHolder === null) {
      const details = { snapshots: snapshots.map((x) => x.name), ...(resume !== null ? { goesOnOver: resume.snapshots.map((x) => x.name) } : {}) };
      this.beginRebuild(target, (rebuild) => runFullRebuild(this.rebuildHost, rebuild, target, snapshotCopyPlan(snapshots), resume), details, resume);
    }
    else this.beginRebuild(target, (rebuild) => runDeltaRebuild(this.rebuildHost, rebuild, target, mapHolder), { delta: true, mapHolder: mapHolder.address });
    return this.replicaStatus();
  }

  /** Why a replica's backing image is not the volume's (as the RW replicas have it), or null. */
  private imageMismatch(info: ReplicaInfo): string | null {
    return imageMismatch(info, this.replicas.find((r) => r.mode === ReplicaMode.RW && r.info !== null)?.info ?? null);
  }

  /** Registers the rebuild of `target` (already in the list, WO) and runs it in the background. */
  private beginRebuild(target: EngineReplica, run: (rebuild: Rebuild<EngineReplica>) => Promise<void>, details: Record<string, unknown>, resume: FullResume | null = null): void {
    // Not in the write set until it joins: `inWriteSet` says when it does.
    const rebuild = new Rebuild(target, target.rebuild!);
    this.rebuilding = rebuild;
    const started = this.clock.nowMs();
    const progress = target.rebuild!;
    const record = (error: string | null): void => {
      this.lastRebuild = {
        at: new Date().toISOString(), replica: target.address, delta: progress.delta, copiedBytes: progress.copiedBytes, totalBytes: progress.totalBytes, durationMs: this.clock.nowMs() - started, error,
        ...(resume !== null ? { keptSnapshots: [...resume.kept], wentOnWithin: resume.within } : {}),
      };
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

  /** What start-up left to rebuild, one after another, in the background: the deltas, then the half-copied. */
  private async runPendingRebuilds(halfCopied: EngineReplica[]): Promise<void> {
    await this.runPendingDeltas();
    for (const r of halfCopied) {
      try {
        await this.rebuildRun;
        if (this.closed || this.faultedReason !== null) return;
        await this.addReplica(r.named ? `${r.key}=${r.address}` : r.address);
        await this.rebuildRun;
      } catch (err) {
        // Not taken back: refused (its snapshots are not the volume's: addReplica noted it, a
        // new replica will take its place), or gone, or added meanwhile by the manager.
        this.log({ event: 'rebuild-failed', replica: r.address, reason: `its full rebuild did not go on: ${(err as Error).message}` });
      }
    }
  }

  /** The delta rebuilds start-up decided. */
  private async runPendingDeltas(): Promise<void> {
    while (this.pendingDeltas.length > 0) {
      const r = this.pendingDeltas.shift()!;
      const client = r.client;
      if (client === null || this.closed) continue;
      try {
        await this.rebuildRun;
        let holder: EngineReplica | string;
        for (;;) {
          // Not under an expansion, a snapshot or a revert: each works on the replicas in use when
          // it began, and this one would miss it. It starts once that is done.
          while (this.paused && !this.closed) await this.clock.sleep(PAUSED_RETRY_MS);
          if (this.closed || this.faultedReason !== null) throw new ZebuError(ErrorCode.CLOSED, 'the volume stopped serving');
          if (this.rebuilding !== null) throw new ZebuError(ErrorCode.BUSY, 'another rebuild started first');
          holder = await this.deltaSource(r.key, r.info!, client);
          if (typeof holder === 'string') throw new ZebuError(ErrorCode.EINVAL, `no delta rebuild is possible: ${holder}`);
          // The volume may have grown while it waited (an expansion grows only the replicas in
          // use): it is grown first, or it would come back RW at its old size.
          if (r.info!.sizeBytes < this.sizeBytes && r.client === client) this.set.noteInfo(r, await client.expand(this.sizeBytes));
          if (!this.paused) break;
        }
        if (r.client !== client || this.rebuilding !== null || r.info!.sizeBytes !== this.sizeBytes) throw new ZebuError(ErrorCode.BUSY, 'the replica or the volume changed');
        this.set.beginDelta(r, { copiedBytes: 0, totalBytes: 0, delta: true });
        client.onClose((err) => {
          if (r.client === client) this.setErr(r, err);
        });
        this.beginRebuild(r, (rebuild) => runDeltaRebuild(this.rebuildHost, rebuild, r, holder), { delta: true, mapHolder: holder.address, atStart: true });
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

  // ---- verify --------------------------------------------------------------------------------

  /**
   * Compares the RW replicas region by region by hash (REGION_HASH), each region claimed against
   * client writes while it is compared (so it runs under live I/O). With `repair`, a region that
   * differs is copied from the source (a local RW replica, else the first) into the replicas that
   * differ, under the same claim.
   */
  async verify(options: { repair?: boolean } = {}): Promise<VerifyReport> {
    if (this.closed) throw new ZebuError(ErrorCode.CLOSED, `volume ${this.name}: the engine is closing`);
    if (this.faultedReason !== null) throw this.faultError();
    if (this.verifying) throw new ZebuError(ErrorCode.BUSY, `volume ${this.name}: a verify is already running`);
    this.verifying = true;
    try {
      const report = await runVerify(this.rebuildHost, options.repair === true);
      this.lastVerify = report;
      return report;
    } finally {
      this.verifying = false;
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
    const waiting = this.pendingDeltas.indexOf(r);
    if (waiting >= 0) this.pendingDeltas.splice(waiting, 1);
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
      // Again: a rebuild may have started while this waited (a delta decided at start-up), and
      // its target would come back at the old size.
      this.refuseDuringRebuild('expand');
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
    this.refreshReadView();
    if (this.rebuilding !== null) this.rebuilding.cancelled = 'the engine is closing';
    this.clock.clear(this.pingTimer);
    this.clock.clear(this.idleFlushTimer);
    this.copier?.close();
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

