/**
 * One simulated volume in one process: the real engine and N real replicas (src/engine,
 * src/replica, src/protocol) on memory disks that can lose power or fail, over the simulated
 * network, under the simulated clock. A seeded workload of client requests and control
 * operations runs against it while faults strike; the model (model.ts) checks every read, and
 * the end of the run checks that the replicas came back identical.
 *
 * Client requests go through the frontend's real engine link (src/frontend/engine-link.ts) in a
 * process of its own: it holds what a dead engine left unanswered and sends it again to the next
 * one, and finds a hung engine by its heartbeat and has it killed. The simulation plays the
 * parts around them as the real system does: the agent (a dead replica or engine process is
 * started again, on the same directory) and the manager (a replica that is out of the volume is
 * added back, which rebuilds it).
 */
import { Engine, ReplicaMode } from '../../src/engine/engine.ts';
import { RemoteCopier, type CopierStarter, type CopierToEngine, type EngineToCopier } from '../../src/engine/copier-process.ts';
import { CopierWorker } from '../../src/engine/copier-worker.ts';
import { Replica } from '../../src/replica/replica.ts';
import { MemoryDisk } from '../../src/replica/memory-disk.ts';
import { PowerLossDisk, type PowerLossMode } from '../../src/replica/power-loss-disk.ts';
import { FaultyDisk } from '../../src/replica/faulty-disk.ts';
import { LatencyDisk } from './latency-disk.ts';
import { INTENT_REGION_BYTES, INTENT_SLOTS } from '../../src/replica/intent-log.ts';
import { DataServer } from '../../src/protocol/server.ts';
import { EngineLink } from '../../src/frontend/engine-link.ts';
import type { ProcessIdentity } from '../../src/os/process-identity.ts';
import { ErrorCode, ZebuError, assert, onAssertionFailure } from '../../src/errors.ts';
import { SimWorld, Random, type SimProcess } from './world.ts';
import { SimNetwork } from './network.ts';
import { VolumeModel, writePayload, sectorValue, SECTOR_BYTES } from './model.ts';

export interface SimOptions {
  seed: number;
  steps: number;
  replicas?: number;
  sizeBytes?: number;
  /** Faults on (default); off: only the workload. */
  faults?: boolean;
  /** Lines of trace kept for the report of a failure. */
  traceLines?: number;
}

export interface SimResult {
  seed: number;
  steps: number;
  ok: boolean;
  /** The first problems found (invariant violations, the code under test throwing). */
  problems: string[];
  /** The step at which the first problem was found (-1: none; steps: at the end). */
  failedAtStep: number;
  trace: string[];
  stats: Record<string, number>;
}

const SECRET = Buffer.alloc(32, 7);
/** ZEBU_SIM_TRACE=1 prints the trace as it happens (debugging a seed). */
const LIVE_TRACE = process.env.ZEBU_SIM_TRACE === '1';
/** ZEBU_SIM_WATCH=BYTE traces every request that covers that byte. */
const WATCH_BYTE = process.env.ZEBU_SIM_WATCH === undefined ? -1 : Number(process.env.ZEBU_SIM_WATCH);
const DIR = '/replica';
const MAX_INFLIGHT = 8;
const MAX_IO_BYTES = 64 * 1024;
const HOT_SPOT_BYTES = 1024 * 1024;
/**
 * The fault ladder's bands (faultAction): volume power loss, engine crash, node crash, engine or
 * frontend hang, replica crash, link cut, link stall, replica hang, disk error.
 */
const FAULT_BANDS = [0, 0.08, 0.12, 0.16, 0.2, 0.45, 0.6, 0.68, 0.75, 1];
/** How much a seed may weigh a fault class against its band's width (swarm testing). */
const FAULT_CLASS_FACTORS = [0, 1, 1, 3];
/** The working set of a seed with locality: one write-intent region. */
const WORKING_SET_BYTES = INTENT_REGION_BYTES;
const REQUEST_TIMEOUT_MS = 4000;
/** Where the engine's data server listens (one volume: one address, whichever engine runs). */
const ENGINE_ADDRESS = 'engine.sock';
/** The frontend's link: a heartbeat every 500 ms; 2 s without an answer means the engine hangs. */
const LINK_TIMEOUTS = { heartbeatIntervalMs: 500, hangTimeoutMs: 2000, stallTimeoutMs: 30_000 };

type ClientOp =
  | { kind: 'write'; id: number; offset: number; length: number; fua: boolean }
  | { kind: 'zero'; id: number; offset: number; length: number; trim: boolean }
  | { kind: 'read'; id: number; offset: number; length: number }
  | { kind: 'flush'; id: number; covered: number };

class SimReplica {
  readonly key: string;
  readonly address: string;
  readonly mem = new MemoryDisk();
  proc: SimProcess | null = null;
  power: PowerLossDisk | null = null;
  latency: LatencyDisk | null = null;
  faulty: FaultyDisk | null = null;
  replica: Replica | null = null;
  /** Its process runs. */
  up = false;
  /** Struck by a fault since it last served as RW: it does not count as healthy. */
  struck = true;
  /** Struck: the engine had it out since (a rejoin clears the strike). */
  outSinceStrike = true;
  /** Struck: when the strike's effect is over even without a rejoin (a stall that ends). */
  struckUntilMs = Infinity;
  /** A snapshot changed the layer tree while it was out: its missed-write map may be void, a full rebuild is fair. */
  treeChangedWhileOut = false;
  /** It held data before it went out (so coming back should be a delta rebuild). */
  servedBefore = false;
  /** The engine had it out of the volume (ERR) when last looked at: the manager knows it failed. */
  out = false;

  constructor(index: number) {
    this.key = `r${index}`;
    this.address = `10.0.0.${index + 1}:7000`;
  }

  get entry(): string {
    return `${this.key}=${this.address}`;
  }
}

export class Simulation {
  readonly world: SimWorld;
  private readonly random: Random;
  private readonly net: SimNetwork;
  private readonly options: Required<SimOptions>;
  private replicas: SimReplica[];
  private nextReplicaIndex: number;
  /** The agent's work in the background (process restarts): a failure is a problem. */
  private readonly background = new Set<Promise<void>>();
  private readonly model: VolumeModel;
  /** This seed's requests keep to a working set (workingRegion) besides the hot spot. */
  private readonly workingSet: boolean;
  private workingRegion = 0;
  /** This seed's weight of each fault class (FAULT_BANDS). */
  private faultWeights: number[];
  private engine: Engine | null = null;
  private engineProc: SimProcess | null = null;
  /** The engine process's identity, as its data server tells the link (the link kills by it). */
  private engineIdentity: ProcessIdentity | null = null;
  /** The NBD frontend's process and its link to the engine: every client request goes through it. */
  private frontendProc: SimProcess;
  private frontendRestarts = 0;
  private link: EngineLink | null = null;
  /** The run is over: the link is closed under what is still in flight. */
  private stopping = false;
  /** Bumped when the engine dies: an engine start that was overtaken gives up. */
  private incarnation = 0;
  private epoch = 1;
  /** What clients may address: grown once an expansion is acknowledged. */
  private sizeBytes: number;
  /** The volume's size as the manager records it: set before an expansion starts. */
  private specSizeBytes: number;
  private readonly ops = new Map<number, ClientOp>();
  private nextId = 1;
  private control: Promise<void> | null = null;
  private readonly processOf = new WeakMap<Engine, SimProcess>();
  /** Every engine of the run, for the rebuild-lease counters. */
  private readonly engines: Engine[] = [];
  /** Per seed: how long a recalled rebuild lease may be kept (0: for ever), and how many revokes a region may take. */
  private readonly leaseRecallTimeoutMs: number;
  private readonly copyChunkBytes: number;
  private readonly snapshotCopyFlushMs: number;
  private readonly remoteCopier: boolean;
  /** The copier process of the engine serving now, while one runs. */
  private copierProc: SimProcess | null = null;
  private copierStarts = 0;
  private readonly maxRegionRetries: number;
  /** The frontend's last stall. */
  private frontendStall: { fromMs: number; untilMs: number } | null = null;
  private controlName = '';
  private snapshots: string[] = [];
  private nextSnapshot = 1;
  private step = 0;
  private readonly problems: string[] = [];
  private failedAtStep = -1;
  private readonly trace: string[] = [];
  readonly stats: Record<string, number> = {
    writes: 0, reads: 0, flushes: 0, zeroes: 0, clientErrors: 0, replicaCrashes: 0, engineCrashes: 0, copierCrashes: 0, nodeCrashes: 0, volumeCrashes: 0,
    linkCuts: 0, hangs: 0, replicaHangs: 0, engineHangs: 0, frontendHangs: 0, engineKills: 0, linkReopens: 0, linkHangs: 0, diskErrors: 0, snapshots: 0, expansions: 0, verifies: 0, rebuildsFull: 0, rebuildsDelta: 0, rebuildsResumed: 0, snapshotCopiesWentOn: 0, moves: 0, reissued: 0, directReads: 0,
  };

  constructor(options: SimOptions) {
    this.options = { replicas: 3, sizeBytes: 24 * 1024 * 1024, faults: true, traceLines: 60, ...options };
    this.world = new SimWorld(options.seed);
    this.random = this.world.random;
    this.net = new SimNetwork(this.world, this.random.fork());
    this.sizeBytes = this.options.sizeBytes;
    this.specSizeBytes = this.sizeBytes;
    this.model = new VolumeModel(this.sizeBytes);
    this.replicas = Array.from({ length: this.options.replicas }, (_, i) => new SimReplica(i));
    this.nextReplicaIndex = this.options.replicas;
    this.frontendProc = this.world.process('frontend');
    // Drawn from their own stream: the main stream (and so every other choice of a seed) stays as it was.
    const leaseRandom = new Random(options.seed * 7919 + 17);
    this.leaseRecallTimeoutMs = leaseRandom.pick([0, 20, 200, 4000]);
    this.maxRegionRetries = leaseRandom.pick([1, 5, 1000]);
    // Small chunks make more of a region's copy progress (notes of regions copied in part).
    const copyRandom = new Random(options.seed * 104729 + 3);
    this.copyChunkBytes = copyRandom.pick([16 * 1024, 256 * 1024, INTENT_REGION_BYTES]);
    // Frequent target flushes while snapshots are copied leave a stopped copy something to go on over.
    this.snapshotCopyFlushMs = new Random(options.seed * 6007 + 11).pick([0, 5, 50, 1000]);
    // Most seeds copy in a copier process of its own (as `engine serve` does), which faults hit alone.
    this.remoteCopier = copyRandom.chance(0.75);
    this.workingSet = this.random.chance(0.5);
    this.faultWeights = FAULT_BANDS.slice(1).map((hi, i) => (hi - FAULT_BANDS[i]) * this.random.pick(FAULT_CLASS_FACTORS));
    if (this.faultWeights.every((w) => w === 0)) this.faultWeights = FAULT_BANDS.slice(1).map((hi, i) => hi - FAULT_BANDS[i]);
  }

  private note(text: string): void {
    this.trace.push(`#${this.step} t=${this.world.nowMs.toFixed(2)}ms ${text}`);
    if (LIVE_TRACE) process.stderr.write(`${this.trace[this.trace.length - 1]}\n`);
    if (this.trace.length > this.options.traceLines) this.trace.shift();
  }

  private problem(text: string): void {
    if (this.failedAtStep < 0) this.failedAtStep = this.step;
    if (this.problems.length < 10) this.problems.push(`step ${this.step}, t=${this.world.nowMs.toFixed(2)}ms: ${text}`);
    this.note(`PROBLEM ${text}`);
  }

  private get failed(): boolean {
    return this.problems.length > 0 || this.world.crashes.length > 0;
  }

  // ---- processes ------------------------------------------------------------------------------

  private async startReplica(r: SimReplica): Promise<void> {
    const proc = this.world.process(`${r.key}`);
    const power = new PowerLossDisk(r.mem, (p, data, position) => r.mem.writeNow(p, data, position));
    const latency = new LatencyDisk(power, () => proc.clock.sleep(this.syncLatencyMs()));
    const faulty = new FaultyDisk(latency);
    const exists = await Replica.exists(DIR, faulty);
    // As the agent does: the volume's size now (an offline expansion if it grew meanwhile).
    if (exists) await Replica.expandOnDisk(DIR, this.specSizeBytes, faulty);
    const replica = exists
      ? await Replica.open(DIR, { disk: faulty, clock: proc.clock })
      : await Replica.create(DIR, { sizeBytes: this.specSizeBytes, disk: faulty, clock: proc.clock });
    const server = new DataServer(replica, { secret: SECRET, identity: { name: r.key }, clock: proc.clock, transport: this.net.transport(proc) });
    this.net.listen(r.address, proc, server);
    Object.assign(r, { proc, power, latency, faulty, replica, up: true });
    this.note(`${r.key} started (${exists ? 'reopened' : 'created'})`);
  }

  /** How long one fsync takes: mostly well under a millisecond, now and then a slow one. */
  private syncLatencyMs(): number {
    return this.random.chance(0.9) ? 0.02 + this.random.next() * 1.5 : 2 + this.random.next() * 20;
  }

  /** Every replica and the engine lose power at once. */
  private volumePowerCut(): void {
    this.stats.volumeCrashes++;
    const mode: PowerLossMode = this.random.pick(['drop', 'tear', 'keep']);
    this.crashEngine('machine');
    for (const x of this.replicas) this.crashReplica(x, mode);
    // Unflushed writes (acknowledged or not) may be lost now: every replica lost them. Even with
    // the page cache kept ('keep'): a replica makes a write durable only at a flush (its block map
    // is journaled then), which is all NBD promises.
    this.model.powerLost();
  }

  /** The replica's process dies; `mode` says what its unsynced writes do (a power cut loses some). */
  private crashReplica(r: SimReplica, mode: PowerLossMode): void {
    if (!r.up) return;
    const report = r.power!.powerFail(this.random.int(0x7fffffff), mode);
    // A power cut takes the machine (and what it had not yet sent); a crash that keeps the page cache is the process only.
    r.proc!.kill(mode === 'keep' ? 'process' : 'machine');
    r.up = false;
    this.strike(r);
    r.replica = null;
    this.note(`${r.key} crashed (${mode}: ${report.writes} unsynced writes, ${report.dropped} lost, ${report.torn} torn)`);
    // Its agent starts it again a while later (on the same directory), unless it was replaced.
    this.agentLater(1 + this.random.next() * 2000, `restart ${r.key}`, async () => {
      if (this.replicas.includes(r) && !r.up) await this.startReplica(r);
    });
  }

  private agentLater(delayMs: number, what: string, run: () => Promise<void>): void {
    this.world.schedule(delayMs, () => {
      const task = run().catch((err: unknown) => this.problem(`agent: ${what} failed: ${(err as Error).stack ?? String(err)}`));
      this.background.add(task);
      void task.finally(() => this.background.delete(task));
    });
  }

  private async startEngine(): Promise<void> {
    if (LIVE_TRACE) {
      for (const r of this.replicas) {
        const info = r.replica?.info();
        if (info !== undefined) this.note(`${r.key} before engine ${this.epoch}: writeEpoch ${info.writeEpoch}, flushed ${info.flushedRevision}, revision ${info.revision}, active ${info.activeRegions}`);
      }
    }
    const proc = this.world.process(`engine-${this.epoch}`);
    const engine = Engine.create({
      name: 'sim', sizeBytes: this.specSizeBytes, replicas: this.replicas.map((r) => r.entry), secret: SECRET, epoch: this.epoch,
      requestTimeoutMs: REQUEST_TIMEOUT_MS, pingIntervalMs: 1000, replicaWaitMs: 3000,
      leaseRecallTimeoutMs: this.leaseRecallTimeoutMs, maxRegionRetries: this.maxRegionRetries, copyChunkBytes: this.copyChunkBytes,
      snapshotCopyFlushMs: this.snapshotCopyFlushMs,
      copier: this.remoteCopier ? this.copierFor(proc) : null,
      outReplicas: this.replicas.filter((r) => r.out).map((r) => r.key),
      transport: this.net.transport(proc), clock: proc.clock,
      log: (event) => {
        if (event.event === 'rebuild-snapshot-went-on' && (event.regionsKept as number) > 0) this.stats.snapshotCopiesWentOn++;
        if (LIVE_TRACE) this.note(`engine ${this.epoch}: ${JSON.stringify(event).slice(0, 400)}`);
      },
    });
    this.engineProc = proc;
    this.engine = engine;
    this.engines.push(engine);
    this.processOf.set(engine, proc);
    const incarnation = this.incarnation;
    await engine.startUp();
    if (incarnation !== this.incarnation) return;
    this.note(`engine epoch ${this.epoch} serving: ${engine.replicaStatus().map((s) => `${s.key}:${s.mode}`).join(' ')}`);
    // As engine-serve does: the data socket opens once start-up is done; its INFO names the process.
    const identity: ProcessIdentity = { pid: 1000 + this.epoch, startTime: String(this.epoch) };
    const server = new DataServer(engine, { secret: SECRET, identity: { process: identity }, clock: proc.clock });
    this.net.listen(ENGINE_ADDRESS, proc, server);
    this.engineIdentity = identity;
    // The frontend's link finds it (it has been trying the address since the last engine went away).
    if (this.link === null) this.link = await EngineLink.connect(this.linkOptions());
    if (this.specSizeBytes > this.sizeBytes) {
      // An expansion that the last engine did not finish: this one grew the replicas at start-up.
      await this.link.refreshSize().catch(() => {});
      this.sizeBytes = this.specSizeBytes;
      this.model.grow(this.sizeBytes);
    }
  }

  private linkOptions(): Parameters<typeof EngineLink.connect>[0] {
    return {
      name: 'sim', socketPath: ENGINE_ADDRESS, secret: SECRET, ...LINK_TIMEOUTS,
      transport: this.net.transport(this.frontendProc), clock: this.frontendProc.clock,
      killEngine: (id) => this.killHungEngine(id),
      log: LIVE_TRACE ? (event) => this.note(`link: ${JSON.stringify(event).slice(0, 300)}`) : undefined,
    };
  }

  /**
   * The node the volume is attached on crashes: the frontend and the engine die together, and the
   * client's requests in flight die with them (nobody sends them again: a client that reconnects
   * to the restarted frontend starts afresh). What they wrote is unknown — on some replicas, not
   * on others — and only the next engine's start-up resync (the union of the replicas' active
   * regions) makes the replicas equal again.
   */
  private crashNode(): void {
    const abandoned = [...this.ops.values()];
    for (const op of abandoned) {
      this.ops.delete(op.id);
      this.outcomeUnknown(op);
    }
    this.link?.close();
    this.frontendProc.kill('machine');
    this.crashEngine('machine');
    // Its supervisor starts the frontend again at once: the export comes back from its state
    // file, waiting for an engine (see EngineLink.restore).
    this.frontendProc = this.world.process(`frontend-${++this.frontendRestarts}`);
    this.link = EngineLink.restore(this.linkOptions(), this.sizeBytes);
    this.note(`the node crashed: frontend and engine; ${abandoned.length} client requests lost with them`);
  }

  private crashEngine(how: 'process' | 'machine' = 'process'): void {
    if (this.engineProc === null) return;
    this.engineProc.kill(how);
    this.engineGone(`engine crashed (${this.ops.size} requests in flight, held by the link)`, 500);
  }

  /**
   * The link found the engine hung and asks for it to be killed. Sometimes it cannot be at once
   * (a process stuck in the kernel, say): it lives on a while, and what it had sent still arrives
   * at the replicas late while the next engine serves, and must be fenced by the epoch.
   */
  private killHungEngine(identity: ProcessIdentity): boolean {
    const proc = this.engineProc;
    if (proc === null || this.engineIdentity === null || identity.pid !== this.engineIdentity.pid || identity.startTime !== this.engineIdentity.startTime) return false;
    this.stats.engineKills++;
    // The link's verdict must rest on the engine not answering; an engine that never hung (the
    // frontend itself stalled, say) killed for it is a needless outage of every request in flight.
    // (A hung engine's answers arrive at most a latency spike after it runs again. A verdict due
    // before the frontend stalled is given when it runs again: its stall is allowed for.)
    const stall = this.frontendStall;
    const allowMs = 500 + (stall !== null && stall.untilMs > this.world.nowMs - 2 * LINK_TIMEOUTS.heartbeatIntervalMs - 100 ? stall.untilMs - stall.fromMs : 0);
    if (proc.frozenUntilMs < this.world.nowMs - allowMs) {
      this.problem(`the link killed engine ${this.epoch}, which did not hang`);
    }
    if (this.random.chance(0.5)) {
      proc.kill();
      this.engineGone(`the link killed hung engine ${this.epoch}`, 300);
    } else {
      this.world.schedule(1000 + this.random.int(4000), () => proc.kill());
      this.engineGone(`the link killed hung engine ${this.epoch}; it dies only later`, 300);
    }
    return true;
  }

  /** The engine process is no more to the client: the agent starts the next epoch's a while later. */
  private engineGone(what: string, restartMsMax: number): void {
    this.engine = null;
    this.engineProc = null;
    this.engineIdentity = null;
    this.incarnation++;
    this.epoch++;
    this.note(what);
    const incarnation = this.incarnation;
    this.agentLater(1 + this.random.next() * restartMsMax, `start engine ${this.epoch}`, async () => {
      if (this.incarnation !== incarnation || this.engine !== null) return;
      try {
        await this.startEngine();
      } catch (err) {
        if (this.incarnation === incarnation) throw err; // else that engine died meanwhile
      }
    });
  }

  /**
   * The engine stops answering for `ms` (a stalled process): nothing moves between it and anyone.
   * A short stall only delays requests; one past the link's hang timeout has the link kill it.
   */
  private hangEngine(ms: number): void {
    const proc = this.engineProc!;
    this.net.freeze(proc, ms);
    this.note(`engine ${this.epoch} hangs for ${ms} ms`);
  }

  // ---- client requests ------------------------------------------------------------------------

  private serving(): Engine | null {
    const e = this.engine;
    return e !== null && e.currentPhase === 'serving' ? e : null;
  }

  private randomRange(forWrite: boolean): { offset: number; length: number } | null {
    for (let tries = 0; tries < 8; tries++) {
      const length = (1 + this.random.int(MAX_IO_BYTES / 4096)) * 4096;
      // A third of the requests go to a hot spot (a file system's journal and metadata, a
      // database's log), so that a write is soon written over again: a late or lost write
      // shows as old data there.
      // Half the seeds keep the rest in a working set of one write-intent region that moves now
      // and then (a file system or database with locality), so that most regions go cold and
      // leave the replicas' write-intent logs: a write to a cold region is then the only one
      // there, and a replica that missed it differs from the others in a region few logs name.
      let from = 0;
      let span = this.sizeBytes;
      if (this.random.chance(1 / 3)) span = HOT_SPOT_BYTES;
      else if (this.workingSet) {
        if (this.random.chance(0.01)) this.workingRegion = this.random.int(Math.ceil(this.sizeBytes / WORKING_SET_BYTES));
        from = Math.min(this.workingRegion * WORKING_SET_BYTES, this.sizeBytes - WORKING_SET_BYTES);
        span = WORKING_SET_BYTES;
      }
      const offset = from + this.random.int((span - length) / 4096 + 1) * 4096;
      if (this.model.isFree(offset, length, forWrite)) return { offset, length };
    }
    return null;
  }

  private issueRandom(): void {
    const roll = this.random.next();
    const id = this.nextId++;
    let op: ClientOp;
    if (roll < 0.08) {
      op = { kind: 'flush', id, covered: this.model.flushStarted() };
    } else {
      const range = this.randomRange(roll < 0.58);
      if (range === null) return;
      if (roll < 0.5) {
        op = { kind: 'write', id, ...range, fua: this.random.chance(0.1) };
        this.model.writeStarted(id, range.offset, range.length);
      } else if (roll < 0.58) {
        op = { kind: 'zero', id, ...range, trim: this.random.chance(0.5) };
        this.model.writeStarted(0, range.offset, range.length);
      } else {
        op = { kind: 'read', id, ...range };
        this.model.readStarted(range.offset, range.length);
      }
    }
    this.ops.set(id, op);
    this.send(op);
  }

  /** Sends a client request through the frontend's link (it holds it while no engine serves). */
  private send(op: ClientOp): void {
    if (WATCH_BYTE >= 0 && 'offset' in op && op.offset <= WATCH_BYTE && WATCH_BYTE < op.offset + op.length) this.note(`send ${op.kind} ${op.id} ${op.offset}+${op.length} (engine ${this.serving() === null ? 'down' : 'up'})`);
    const link = this.link!;
    // A hung frontend takes the request up when it runs again (the client's socket holds it).
    if (this.frontendProc.frozenUntilMs > this.world.nowMs) {
      this.world.schedule(0, () => {
        if (this.link === link) this.send(op);
      }, this.frontendProc);
      return;
    }
    const done = (err: ZebuError | null, data?: Buffer): void => this.complete(op, err, data);
    switch (op.kind) {
      case 'write':
        link.write(op.offset, writePayload(op.id, op.offset, op.length), op.fua, done);
        break;
      case 'zero':
        // Every other WRITE_ZEROES asks to stay allocated (NO_HOLE): no hole is punched for it.
        link.zero(op.offset, op.length, op.trim, false, !op.trim && op.id % 2 === 0, done);
        break;
      case 'read':
        link.read(op.offset, op.length, (err, data) => done(err, err === null ? data : undefined));
        break;
      case 'flush':
        link.flush(done);
        break;
    }
  }

  /** A request that failed or was lost: what it wrote may or may not be there. */
  private outcomeUnknown(op: ClientOp): void {
    if (op.kind === 'write') this.model.writeEnded(op.id, op.offset, op.length, false, false);
    if (op.kind === 'zero') this.model.writeEnded(0, op.offset, op.length, false, false);
    if (op.kind === 'read') this.model.readEnded(op.offset, op.length);
  }

  private complete(op: ClientOp, err: ZebuError | null, data: Buffer | undefined): void {
    if (!this.ops.delete(op.id) || this.stopping) return;
    if (WATCH_BYTE >= 0 && 'offset' in op && op.offset <= WATCH_BYTE && WATCH_BYTE < op.offset + op.length) {
      this.note(`done ${op.kind} ${op.id} ${op.offset}+${op.length}: ${err?.message ?? 'ok'}${op.kind === 'read' && data !== undefined ? ` read ${sectorValue(data, WATCH_BYTE - op.offset, WATCH_BYTE / SECTOR_BYTES)}` : ''}`);
    }
    if (err !== null) {
      this.stats.clientErrors++;
      const healthy = this.replicas.filter((r) => !r.struck).map((r) => r.key);
      this.problem(`client ${op.kind} ${'offset' in op ? `${op.offset}+${op.length}` : ''} failed while ${healthy.length > 0 ? `replica(s) ${healthy.join(', ')} stayed healthy` : 'no replica was healthy'}: ${err.code} ${err.message}`);
      this.outcomeUnknown(op);
      return;
    }
    switch (op.kind) {
      case 'write':
        this.stats.writes++;
        this.model.writeEnded(op.id, op.offset, op.length, true, op.fua);
        break;
      case 'zero':
        this.stats.zeroes++;
        this.model.writeEnded(0, op.offset, op.length, true, false);
        break;
      case 'flush':
        this.stats.flushes++;
        this.model.flushEnded(op.covered);
        break;
      case 'read': {
        this.stats.reads++;
        this.model.readEnded(op.offset, op.length);
        const problems = this.model.checkRead(op.offset, data!);
        for (const p of problems) this.problem(`read ${op.offset}+${op.length}: ${p}`);
        if (problems.length > 0) void this.whoHolds(op.offset, op.length);
        break;
      }
    }
  }

  /** For a failure's trace: what each replica holds in the range (read straight from it). */
  private async whoHolds(offset: number, length: number): Promise<void> {
    for (const r of this.replicas) {
      if (r.replica === null) continue;
      const out = Buffer.alloc(length);
      try {
        await r.replica.read(offset, length, out, 0);
        const values = new Set<number>();
        for (let at = 0; at < length; at += SECTOR_BYTES) values.add(sectorValue(out, at, (offset + at) / SECTOR_BYTES));
        this.note(`${r.key} holds writes ${[...values].join(', ')} in ${offset}+${length}`);
      } catch (err) {
        this.note(`${r.key} cannot be read: ${(err as Error).message}`);
      }
    }
  }

  // ---- control: the manager, the agent, and faults ---------------------------------------------

  /**
   * A control call to an engine, as the manager's RPC: taken up when the engine's process runs
   * (not while it hangs), and failed as a lost connection if the process dies first.
   */
  private rpc<T>(engine: Engine, call: () => Promise<T>): Promise<T> {
    const proc = this.processOf.get(engine);
    assert(proc !== undefined, 'an engine the simulation started');
    return new Promise<T>((resolve, reject) => {
      const died = (): void => reject(new ZebuError(ErrorCode.DISCONNECTED, `engine process ${proc.name} died during the call`));
      if (!proc.alive) return died();
      proc.onKill(died);
      this.world.schedule(0, () => {
        call().then(resolve, reject);
      }, proc);
    });
  }

  private startControl(name: string, run: () => Promise<void>): void {
    this.controlName = name;
    this.note(`control: ${name}`);
    const engine = this.engine;
    this.control = run().catch((err: unknown) => {
      // BUSY, EXISTS (the engine already brings that replica back itself): the manager tries again later.
      if (err instanceof ZebuError && (err.code === ErrorCode.BUSY || err.code === ErrorCode.CLOSED || err.code === ErrorCode.EXISTS)) {
        this.note(`control ${name}: ${err.code} ${err.message}`);
        return;
      }
      // The engine died under it, or was replaced (found hung): the manager tries again on the next one.
      if ((this.engine === null || this.engine !== engine) && err instanceof ZebuError) return;
      this.problem(`control ${name} failed: ${(err as Error).stack ?? String(err)}`);
    }).finally(() => {
      this.control = null;
    });
  }

  private strike(r: SimReplica, untilMs = Infinity): void {
    r.struck = true;
    r.outSinceStrike = false;
    r.struckUntilMs = untilMs;
  }

  /** Replicas that serve as RW and were not struck since: the ones a fault may still leave standing. */
  private healthy(): SimReplica[] {
    // The engine must count it RW too: a stall that ended can still have cost it its place.
    const rw = new Set((this.serving()?.replicaStatus() ?? []).filter((s) => s.mode === ReplicaMode.RW).map((s) => s.key));
    return this.replicas.filter((r) => !r.struck && r.up && rw.has(r.key));
  }

  /** What the manager would do next, if anything: add a replica back, or replace it. */
  /** An online expansion; once acknowledged, clients may address the new size. */
  private async expandTo(engine: Engine, to: number): Promise<void> {
    await this.rpc(engine, () => engine.expand(to));
    if (engine !== this.engine) return; // replaced meanwhile: the next engine's start-up grows it
    // As the agent does after an online expand: the frontend learns the new size.
    await this.link!.refreshSize().catch(() => {});
    this.sizeBytes = Math.max(this.sizeBytes, to);
    this.model.grow(this.sizeBytes);
    this.stats.expansions++;
  }

  private reconcileAction(): { name: string; run: () => Promise<void> } | null {
    const engine = this.serving();
    if (engine === null) return null;
    const status = engine.replicaStatus();
    if (status.some((x) => x.rebuild !== null)) return null; // one rebuild at a time: the manager waits
    if (this.specSizeBytes > this.sizeBytes) {
      // An expansion recorded but not done (it failed, or its engine died): the manager drives it again.
      const to = this.specSizeBytes;
      return { name: `manager expands to ${to} bytes again`, run: () => this.expandTo(engine, to) };
    }
    const out = this.replicas.find((r) => {
      const s = status.find((x) => x.key === r.key);
      return r.up && s !== undefined && s.mode === ReplicaMode.ERR && s.rebuild === null;
    });
    if (out === undefined) return null;
    return {
      name: `manager adds ${out.key} back`,
      run: async () => {
        try {
          await this.rpc(engine, () => engine.addReplica(out.entry));
        } catch (err) {
          if (!(err instanceof ZebuError)) throw err;
          if (err.code !== ErrorCode.EINVAL || engine !== this.engine) {
            // The replica failed meanwhile, or the engine died: the manager tries again later
            // (a volume that never heals fails the run at its end).
            this.note(`${out.key} not added: ${err.code} ${err.message}`);
            return;
          }
          this.note(`${out.key} refused: ${err.message}`);
          for (const r of this.replicas) {
            const summary = r.replica?.intentGet?.();
            if (summary !== undefined) this.note(`${r.key} holds maps ${JSON.stringify(summary.missed)}, invalid ${JSON.stringify(summary.invalidMissed)}`);
          }
          if (out.servedBefore && !out.treeChangedWhileOut) {
            this.problem(`${out.key} could not come back by a delta rebuild although no snapshot changed while it was out: ${err.message}`);
            return;
          }
          await this.replace(engine, out);
          return;
        }
        const s = engine.replicaStatus().find((x) => x.key === out.key);
        const delta = s?.rebuild?.delta ?? false;
        if (delta) this.stats.rebuildsDelta++;
        else this.stats.rebuildsFull++;
        // A replica that never served, back by a delta: its full rebuild stopped past its
        // snapshots and goes on from the maps (what it copied is not copied again).
        if (delta && !out.servedBefore) this.stats.rebuildsResumed++;
        // Back by a full rebuild, never having served: its full rebuild stopped while the
        // snapshots were copied and goes on over those it completed (or it was still empty).
        if (!delta && !out.servedBefore) this.stats.rebuildsResumed++;
        this.note(`${out.key} rebuild started (${delta ? 'delta' : 'full'})`);
        if (!delta && out.servedBefore && !out.treeChangedWhileOut) {
          this.problem(`${out.key} came back with a full rebuild where its missed-write map should have allowed a delta`);
        }
      },
    };
  }

  /** A new replica (new name, address and disk) takes the place of one that cannot come back. */
  private async replace(engine: Engine, old: SimReplica): Promise<void> {
    await this.rpc(engine, () => engine.removeReplica(old.address));
    old.proc?.kill();
    old.up = false;
    this.replicas = this.replicas.filter((r) => r !== old);
    const fresh = new SimReplica(this.nextReplicaIndex++);
    this.replicas.push(fresh);
    this.note(`${fresh.key} replaces ${old.key}`);
    await this.startReplica(fresh);
    await this.rpc(engine, () => engine.addReplica(fresh.entry));
    this.stats.rebuildsFull++;
  }

  /** The replica being rebuilt, if any. */
  /**
   * The engine's copier in a process of its own (copier-process.ts over the simulated network):
   * messages go each way in order, a little later, and run only while their receiver lives (and
   * is not hung); a killed copier's messages already sent still arrive, then the engine hears it
   * is gone. It dies with its engine.
   */
  private copierFor(engineProc: SimProcess): RemoteCopier {
    const world = this.world;
    const start: CopierStarter = (onMessage, onGone) => {
      const proc = world.process(`copier-${++this.copierStarts}`);
      this.copierProc = proc;
      let current = true;
      const toEngine: (CopierToEngine | null)[] = [];
      const toCopier: EngineToCopier[] = [];
      const deliverToEngine = (m: CopierToEngine | null): void => {
        toEngine.push(m);
        world.schedule(0.02 + this.random.next() * 0.1, () => {
          const next = toEngine.shift();
          if (!current) return;
          if (next === null) {
            current = false;
            onGone('was killed');
          } else if (next !== undefined) onMessage(next);
        }, engineProc);
      };
      const worker = new CopierWorker({
        send: (m) => {
          if (proc.alive) deliverToEngine(m);
        },
        transport: this.net.transport(proc), clock: proc.clock,
      });
      proc.onKill(() => {
        if (this.copierProc === proc) this.copierProc = null;
        deliverToEngine(null);
      });
      engineProc.onKill(() => proc.kill());
      return {
        send: (m) => {
          if (!proc.alive) return;
          toCopier.push(m);
          world.schedule(0.02 + this.random.next() * 0.1, () => {
            const next = toCopier.shift();
            if (next !== undefined) worker.onMessage(next);
          }, proc);
        },
        release: () => {
          current = false;
          proc.kill();
        },
        kill: () => {
          current = false;
          proc.kill();
        },
        pid: 2000 + this.copierStarts,
      };
    };
    return new RemoteCopier({
      start, secret: SECRET, requestTimeoutMs: REQUEST_TIMEOUT_MS, clock: engineProc.clock,
      log: LIVE_TRACE ? (event) => this.note(`copier: ${JSON.stringify(event).slice(0, 300)}`) : () => {},
    });
  }

  private rebuildTarget(): SimReplica | null {
    const status = this.serving()?.replicaStatus() ?? [];
    const s = status.find((x) => x.rebuild !== null);
    return s === undefined ? null : (this.replicas.find((r) => r.key === s.key) ?? null);
  }

  /**
   * Where in the fault ladder below this fault falls: a class drawn by this seed's weights, then a
   * point inside the class's band. Each seed weighs the classes differently (swarm testing): some
   * leave a class out, some make one three times as common, so that a seed can pile up the rare
   * combinations one kind of fault needs (an engine crashing with a stalled link, say) instead of
   * every seed drawing the same mix.
   */
  private faultRoll(): number {
    const total = this.faultWeights.reduce((a, b) => a + b, 0);
    let x = this.random.next() * total;
    for (const [i, w] of this.faultWeights.entries()) {
      if (x < w || i === this.faultWeights.length - 1) {
        const lo = FAULT_BANDS[i];
        const hi = FAULT_BANDS[i + 1];
        return lo + this.random.next() * (hi - lo);
      }
      x -= w;
    }
    throw new Error('unreachable');
  }

  private faultAction(): { name: string; run: () => Promise<void> } | null {
    const healthy = this.healthy();
    const target = this.rebuildTarget();
    const r = target !== null && this.random.chance(0.5) ? target : this.random.pick(this.replicas);
    // While a rebuild copies, its copier process alone: killed, or hung past the recall timeout.
  const copier = this.copierProc;
  if (copier !== null && copier.alive && target !== null && this.random.chance(0.3)) {
      if (this.random.chance(0.5)) {
        return { name: 'the copier process crashes during a rebuild', run: async () => {
          this.stats.copierCrashes++;
          copier.kill();
        } };
      }
      // SIGSTOP: past the recall timeout its leases are revoked and client writes go on.
      const ms = 50 + this.random.int(Math.max(100, 3 * this.leaseRecallTimeoutMs));
      return { name: `the copier process hangs for ${ms} ms during a rebuild`, run: async () => {
        this.stats.hangs++;
        copier.frozenUntilMs = Math.max(copier.frozenUntilMs, this.world.nowMs + ms);
      } };
    }
    const roll = this.faultRoll();
    if (roll < 0.08) {
      if (this.engine === null) return null;
      const variant = this.random.int(3);
      if (variant === 0 || this.serving() === null || this.replicas.filter((x) => x.up).length < 2) {
        return { name: 'the whole volume loses power', run: async () => this.volumePowerCut() };
      }
      if (variant === 1) {
        // The power fails just after one replica made a write-intent record durable: it logged a
        // region as active (the workload moves to a cold one now) and may have written the data
        // after it, while the others had not logged it yet — a region only its log names.
        const waitMs = 50 + this.random.int(2000);
        return { name: `the whole volume loses power just after a replica's write-intent record is durable (or in ${waitMs} ms)`, run: async () => {
          if (this.workingSet) this.workingRegion = this.random.int(Math.ceil(this.sizeBytes / WORKING_SET_BYTES));
          const disks = this.replicas.flatMap((x) => (x.up && x.latency !== null ? [x.latency] : []));
          await new Promise<void>((resolve) => {
            let done = false;
            const cut = (): void => {
              if (done) return;
              done = true;
              for (const d of disks) d.onSynced = null;
              this.volumePowerCut();
              resolve();
            };
            for (const d of disks) {
              d.onSynced = (filePath) => {
                if (!INTENT_SLOTS.some((slot) => filePath.endsWith(slot))) return;
                for (const x of disks) x.onSynced = null;
                this.world.schedule(this.random.next() * 0.3, cut);
              };
            }
            this.world.schedule(waitMs, cut);
          });
        } };
      }
      // One replica's link is slow for a moment (congestion) and the power fails in it: writes
      // reached the others and not that one, and the replicas' write-intent logs disagree on
      // which regions are active. Only the union of them bounds where the replicas may differ.
      // Often the slow one is the replica a tie makes the next source (the first), and the
      // workload moves to another region meanwhile: the writes that reached only the others are
      // then in a region the source's log may not name.
      const engineProc = this.engineProc!;
      const up = this.replicas.filter((x) => x.up);
      const slow = this.random.chance(0.5) ? up[0] : this.random.pick(up);
      const slowProc = slow.proc!;
      const ms = 1 + this.random.next() * 30;
      return { name: `link engine-${slow.key} stalls for ${ms.toFixed(1)} ms and the whole volume loses power in it`, run: async () => {
        this.net.holdBetween(engineProc, slowProc, ms);
        if (this.workingSet) this.workingRegion = this.random.int(Math.ceil(this.sizeBytes / WORKING_SET_BYTES));
        await new Promise<void>((resolve) => this.world.schedule(this.random.next() * ms, resolve));
        this.volumePowerCut();
      } };
    }
    if (roll < 0.12) {
      if (this.engine === null) return null;
      if (this.engineProc !== null && this.random.chance(0.5)) {
        // A congested or partitioned network holds what the engine sent to a replica; the engine
        // crashes meanwhile, and what its kernel still held arrives when the link recovers — at a
        // replica the next engine already opened, with the old epoch.
        const engineProc = this.engineProc;
        const stalled = this.random.pick(this.replicas);
        const ms = 500 + this.random.int(2 * REQUEST_TIMEOUT_MS);
        // With no other healthy replica, the engine crashes before it gives the last one up: a
        // volume whose every replica failed is faulted, and its clients get errors by design.
        const lastHealthy = healthy.every((x) => x === stalled);
        const crashInMs = this.random.int(lastHealthy ? Math.min(ms, REQUEST_TIMEOUT_MS / 2) : ms);
        return { name: `link engine-${stalled.key} stalls for ${ms} ms and the engine crashes in it`, run: async () => {
          this.stats.engineCrashes++;
          this.stats.hangs++;
          if (stalled.proc !== null) {
            this.strike(stalled, this.world.nowMs + ms + REQUEST_TIMEOUT_MS);
            this.net.holdBetween(engineProc, stalled.proc, ms);
          }
          await new Promise<void>((resolve) => this.world.schedule(crashInMs, resolve));
          if (this.engineProc === engineProc) this.crashEngine();
        } };
      }
      return { name: 'the engine crashes', run: async () => {
        this.stats.engineCrashes++;
        this.crashEngine();
      } };
    }
    if (roll < 0.16) {
      if (this.engine === null || this.link === null) return null;
      return { name: 'the node with the frontend and the engine crashes', run: async () => {
        this.stats.nodeCrashes++;
        this.crashNode();
      } };
    }
    if (roll < 0.2) {
      // A hang while serving (the link is connected and watches it); one during start-up is a slow
      // start. A hang past the link's timeout has the link give the engine up; one that lasts
      // longer still may outlive the kill's delay, so the old engine runs again next to the new one.
      if (this.engineProc === null || this.serving() === null) return null;
      if (this.random.chance(0.25)) {
        // The frontend's process stalls instead: requests wait, and the link, running again, must
        // not take its own stall for the engine's.
        const ms = 200 + this.random.int(3 * LINK_TIMEOUTS.hangTimeoutMs);
        return { name: `the frontend hangs for ${ms} ms`, run: async () => {
          this.stats.frontendHangs++;
          this.net.freeze(this.frontendProc, ms);
          this.frontendStall = { fromMs: this.world.nowMs, untilMs: this.world.nowMs + ms };
        } };
      }
      const ms = 200 + this.random.int(4 * LINK_TIMEOUTS.hangTimeoutMs);
      if (this.random.chance(0.3)) {
        // The frontend stalls too while the engine hangs (memory pressure on the node, say): the
        // link then has a heartbeat unanswered, and time of its own that does not count.
        const afterMs = this.random.int(ms);
        const frontendMs = 200 + this.random.int(3 * LINK_TIMEOUTS.hangTimeoutMs);
        return { name: `the engine hangs for ${ms} ms, the frontend from ${afterMs} ms into it for ${frontendMs} ms`, run: async () => {
          this.stats.engineHangs++;
          this.stats.frontendHangs++;
          this.hangEngine(ms);
          const frontend = this.frontendProc;
          this.world.schedule(afterMs, () => {
            this.net.freeze(frontend, frontendMs);
            this.frontendStall = { fromMs: this.world.nowMs, untilMs: this.world.nowMs + frontendMs };
          });
        } };
      }
      return { name: `the engine hangs for ${ms} ms`, run: async () => {
        this.stats.engineHangs++;
        this.hangEngine(ms);
      } };
    }
    // The rest strike one replica (healthy, or struck already: being rebuilt, say) while another
    // healthy one remains.
    if (!r.up || healthy.filter((x) => x !== r).length === 0) return null;
    if (roll < 0.45) {
      const mode: PowerLossMode = this.random.pick(['drop', 'tear', 'keep']);
      return { name: `${r.key} crashes (${mode})`, run: async () => {
        this.stats.replicaCrashes++;
        this.crashReplica(r, mode);
      } };
    }
    if (this.engineProc === null) return null;
    const engineProc = this.engineProc;
    if (roll < 0.6) {
      return { name: `link engine-${r.key} cut`, run: async () => {
        this.stats.linkCuts++;
        this.strike(r);
        this.net.cutBetween(engineProc, r.proc!);
      } };
    }
    if (roll < 0.68) {
      const ms = 500 + this.random.int(2 * REQUEST_TIMEOUT_MS);
      return { name: `link engine-${r.key} stalls for ${ms} ms`, run: async () => {
        this.stats.hangs++;
        this.strike(r, this.world.nowMs + ms + REQUEST_TIMEOUT_MS); // it may time out and be dropped
        this.net.holdBetween(engineProc, r.proc!, ms);
      } };
    }
    if (roll < 0.75) {
      // The replica process hangs: nothing moves on its connections and a new one (the engine
      // reconnecting to bring it back) waits too, until it runs again.
      const ms = 500 + this.random.int(2 * REQUEST_TIMEOUT_MS);
      return { name: `${r.key} hangs for ${ms} ms`, run: async () => {
        this.stats.replicaHangs++;
        this.strike(r, this.world.nowMs + ms + REQUEST_TIMEOUT_MS);
        this.net.freeze(r.proc!, ms);
      } };
    }
    const errno = this.random.chance(0.7) ? 'EIO' : 'ENOSPC';
    const op = this.random.pick(['write', 'sync', 'read'] as const);
    return { name: `${r.key} disk: next ${op} fails with ${errno}`, run: async () => {
      this.stats.diskErrors++;
      this.strike(r);
      r.faulty!.addRule({ op, errno, count: 1 });
      // A one-off failed read or write of data: the replica serves on. One that hit its metadata
      // (a flush, the journal, the write-intent log) makes it refuse I/O until reopened: its agent
      // sees that and restarts it.
      await new Promise<void>((resolve) => this.world.schedule(200 + this.random.int(800), resolve));
      if (!r.up || r.replica === null) return;
      r.faulty!.clearRules();
      try {
        r.replica.intentGet();
      } catch {
        this.crashReplica(r, 'keep');
      }
    } };
  }

  private operationAction(): { name: string; run: () => Promise<void> } | null {
    const engine = this.serving();
    if (engine === null) return null;
    const roll = this.random.next();
    if (roll < 0.4) {
      const name = `s${this.nextSnapshot++}`;
      return { name: `snapshot ${name}`, run: async () => {
        await this.rpc(engine, () => engine.snapshotCreate(name));
        this.snapshots.push(name);
        this.stats.snapshots++;
        for (const r of this.replicas) if (r.struck) r.treeChangedWhileOut = true;
      } };
    }
    if (roll < 0.65 && this.snapshots.length > 0) {
      const name = this.random.pick(this.snapshots);
      return { name: `delete snapshot ${name}`, run: async () => {
        await this.rpc(engine, () => engine.snapshotDelete(name));
        this.snapshots = this.snapshots.filter((s) => s !== name);
        for (const r of this.replicas) if (r.struck) r.treeChangedWhileOut = true;
      } };
    }
    if (roll < 0.75 && this.specSizeBytes < 2 * this.options.sizeBytes) {
      const to = this.specSizeBytes + (1 + this.random.int(8)) * 1024 * 1024;
      return { name: `expand to ${to} bytes`, run: async () => {
        // As the manager does: the volume's size is recorded first, and every engine started from
        // now on is given it (and grows the replicas that are smaller at its start-up).
        this.specSizeBytes = to;
        await this.expandTo(engine, to);
      } };
    }
    if (roll < 0.92) {
      // A move (or an eviction): a replica in service gives way to a new one, which gets a full
      // rebuild — the faults that come while it runs stop it midway, and it must go on from there.
      const status = engine.replicaStatus();
      const healthy = this.replicas.filter((r) => r.up && !r.struck && status.find((x) => x.key === r.key)?.mode === ReplicaMode.RW);
      if (healthy.length === this.replicas.length && healthy.length >= 2) {
        const old = this.random.pick(healthy);
        return { name: `manager moves ${old.key} to a new replica`, run: async () => {
          this.stats.moves++;
          await this.replace(engine, old);
        } };
      }
    }
    return { name: 'verify', run: () => this.verifyNow(engine) };
  }

  /** Replicas that are RW compare equal. */
  private async verifyNow(engine: Engine): Promise<void> {
    const report = await this.rpc(engine, () => engine.verify());
    this.stats.verifies++;
    if (report.differing.length > 0) {
      this.problem(`verify: replicas differ: ${JSON.stringify(report.differing.slice(0, 3))}`);
      for (const d of report.differing.slice(0, 3)) await this.whoHolds(d.offset, d.length);
    }
  }

  /**
   * Every healthy RW replica holds, where no write is in flight, what the model allows: read from
   * the replica itself, not through the engine, so that a replica reads seldom come from is checked
   * too, before a later write hides what it got wrong (a late write of an older engine, say).
   */
  private async checkReplicaContents(): Promise<void> {
    const range = this.randomRange(false);
    if (range === null || this.serving() === null) return;
    for (const r of this.healthy()) {
      const replica = r.replica;
      if (replica === null) continue;
      const out = Buffer.alloc(range.length);
      try {
        await replica.read(range.offset, range.length, out);
      } catch {
        continue; // closed or failed meanwhile: the engine finds out on its own
      }
      if (!r.up || r.replica !== replica || !this.model.isFree(range.offset, range.length, false)) continue;
      for (const p of this.model.checkRead(range.offset, out)) this.problem(`${r.key}, read directly, ${range.offset}+${range.length}: ${p}`);
    }
  }

  /** After each step: what the engine says about replicas clears their strikes. */
  private observe(): void {
    const engine = this.serving();
    if (engine === null) return;
    for (const s of engine.replicaStatus()) {
      const r = this.replicas.find((x) => x.key === s.key);
      if (r === undefined) continue;
      r.out = s.mode === ReplicaMode.ERR;
      if (s.mode !== ReplicaMode.RW) r.outSinceStrike = true;
      if (s.mode === ReplicaMode.RW && r.up && (r.outSinceStrike || this.world.nowMs >= r.struckUntilMs)) {
        if (r.struck) this.note(`${r.key} is RW again`);
        r.struck = false;
        r.servedBefore = true;
        r.treeChangedWhileOut = false;
      }
    }
  }

  // ---- the run --------------------------------------------------------------------------------

  private leaseStats(): Record<string, number> {
    const sum = { leaseGrants: 0, leaseRecalls: 0, leaseRevokes: 0, leaseReplays: 0 };
    for (const e of this.engines) {
      sum.leaseGrants += e.leaseCounters.grants;
      sum.leaseRecalls += e.leaseCounters.recalls;
      sum.leaseRevokes += e.leaseCounters.revokes;
      sum.leaseReplays += e.leaseCounters.replays;
    }
    return sum;
  }

  async run(): Promise<SimResult> {
    const onRejection = (err: unknown): void => {
      this.problem(`unhandled rejection: ${(err as Error).stack ?? String(err)}`);
    };
    process.on('unhandledRejection', onRejection);
    // An assertion in the code under test fails the run (instead of ending this process).
    const previousHandler = onAssertionFailure((err) => this.problem(`assertion failed in the code under test: ${err.stack ?? err.message}`));
    try {
      for (const r of this.replicas) await this.world.await(this.startReplica(r), `start ${r.key}`);
      await this.world.await(this.startEngine(), 'engine start');
      for (this.step = 0; this.step < this.options.steps && !this.failed; this.step++) {
        this.observe();
        if (this.control === null) {
          // Faults come more often while a replica is rebuilt: its window is short and rich in races.
          const rebuilding = this.rebuildTarget() !== null;
          const action = this.reconcileAction()
            ?? (this.options.faults && this.random.chance(rebuilding ? 0.15 : 0.03) ? this.faultAction() : null)
            ?? (this.random.chance(0.02) ? this.operationAction() : null);
          if (action !== null) this.startControl(action.name, action.run);
        }
        if (this.random.chance(0.05)) await this.world.await(this.checkReplicaContents(), 'replica contents');
        const burst = this.random.int(4);
        for (let i = 0; i < burst && this.ops.size < MAX_INFLIGHT; i++) this.issueRandom();
        await this.world.runFor(this.random.next() * 3);
      }
      if (!this.failed) await this.finish();
    } catch (err) {
      this.problem(`run aborted: ${(err as Error).stack ?? String(err)}`);
    } finally {
      process.off('unhandledRejection', onRejection);
      onAssertionFailure(previousHandler);
      this.stopping = true;
      this.link?.close();
      for (const r of this.replicas) r.proc?.kill();
      this.engineProc?.kill();
      this.frontendProc.kill();
    }
    for (const c of this.world.crashes) this.problem(`the code under test threw: ${c}`);
    return {
      seed: this.options.seed, steps: this.options.steps, ok: this.problems.length === 0, problems: this.problems,
      failedAtStep: this.failedAtStep, trace: this.trace, stats: { ...this.stats, ...this.leaseStats(), simulatedMs: Math.round(this.world.nowMs), messages: this.net.messages },
    };
  }

  /** No more faults: every process back, every replica rebuilt, then the volume is read whole and verified. */
  private async finish(): Promise<void> {
    this.note('finish: healing');
    const deadline = this.world.nowMs + 300_000;
    for (;;) {
      const engine = await this.healed(deadline);
      if (engine === null) return;
      this.step = this.options.steps;
      try {
        await this.world.await(this.verifyNow(engine), 'final verify');
        break;
      } catch (err) {
        // An engine that hung past the link's timeout a while ago can be killed only now, in the
        // middle of the verify: heal again, and verify on the next one.
        if (!(err instanceof ZebuError && err.code === ErrorCode.DISCONNECTED)) throw err;
        this.note(`final verify: ${err.message}; healing again`);
      }
    }
    await this.finishReadBack();
  }

  /** Every process back and every replica rebuilt; null (a problem noted) when it never healed. */
  private async healed(deadline: number): Promise<Engine | null> {
    let engine: Engine | null = null;
    while (engine === null) {
      if (this.control !== null) await this.world.await(this.control, `control ${this.controlName}`);
      if (this.failed) return null;
      this.observe();
      const action = this.reconcileAction();
      if (action !== null) {
        this.startControl(action.name, action.run);
        await this.world.runFor(10);
        continue;
      }
      const serving = this.serving();
      const allRw = serving !== null && serving.replicaStatus().every((s) => s.mode === ReplicaMode.RW);
      if (allRw && this.ops.size === 0) {
        const link = this.link!;
        await this.world.await(new Promise<void>((resolve, reject) => link.flush((err) => (err === null ? resolve() : reject(err)))), 'final flush');
        // An engine that hung a while ago can still be found hung and replaced meanwhile: heal again.
        if (this.serving() === serving) engine = serving;
        continue;
      }
      if (this.world.nowMs > deadline) {
        this.problem(`the volume did not heal in 300 s: ${serving === null ? 'no engine' : serving.replicaStatus().map((s) => `${s.key}:${s.mode} ${s.reason ?? ''}`).join(', ')}; ${this.ops.size} requests in flight`);
        return null;
      }
      await this.world.runFor(50);
    }
    return engine;
  }

  /** Every byte read back against the model, through the link as a client reads it. */
  private async finishReadBack(): Promise<void> {
    const link = this.link!;
    for (let offset = 0; offset < this.sizeBytes && !this.failed; offset += MAX_IO_BYTES) {
      const length = Math.min(MAX_IO_BYTES, this.sizeBytes - offset);
      const out = await this.world.await(new Promise<Buffer>((resolve, reject) => link.read(offset, length, (err, data) => (err === null ? resolve(data) : reject(err)))), 'final read');
      for (const p of this.model.checkRead(offset, out)) this.problem(`final read ${offset}+${length}: ${p}`);
    }
    const view = link.view();
    this.stats.reissued = view.reissued;
    this.stats.linkReopens = view.reopens;
    this.stats.linkHangs = view.hangs;
    this.stats.directReads = view.directReads;
  }
}

export function runSimulation(options: SimOptions): Promise<SimResult> {
  return new Simulation(options).run();
}
