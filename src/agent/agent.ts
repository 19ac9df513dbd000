/**
 * The node agent: registers its node and disks, and runs the data-path processes the store
 * assigns to its node — replica processes (Replica objects), one engine per attached volume
 * (Engine objects) and the node's NBD frontend — reporting what they do into the objects'
 * status. Level-triggered like the manager: every object of this node is reconciled on change
 * and periodically; engines are polled for their replica modes, rebuild progress and I/O stats.
 *
 * The processes outlive the agent (see process-supervisor.ts): when the agent (or `zebu up`)
 * dies, volumes keep serving; a restarted agent re-adopts them.
 */
import fs from 'node:fs';
import path from 'node:path';
import { ZebuError, ErrorCode } from '../errors.ts';
import type { Lease, Store, Watch, WatchEvent } from '../store/store.ts';
import { Kind, Objects, REPLICAS_DIR, type EngineReplicaStatus, type EngineValue, type EngineIoStats, type ReplicaValue } from '../cluster/objects.ts';
import { Settings } from '../cluster/settings.ts';
import { WorkQueue } from '../cluster/work-queue.ts';
import { controlRequest } from '../protocol/control-channel.ts';
import { recoveryFromEngine, replicaNameOf, verifyFromEngine } from '../cluster/engine-reports.ts';
import { ProcessSupervisor } from './process-supervisor.ts';
import { initDisk, probeDisk } from './disks.ts';
import { BackingImageFiles } from './backing-image-files.ts';
import { keepTcpListener, type KeptListener } from '../frontend/kept-listener.ts';
import type { EngineLinkView } from '../cluster/object-types.ts';
import { DataClient } from '../protocol/client.ts';
import { parseSourceAddress } from '../protocol/copy-sources.ts';
import { readSecretFile } from '../protocol/auth.ts';

export interface AgentOptions {
  store: Store;
  nodeId: string;
  /** Host this node's replicas listen on (and other nodes reach them at). */
  address: string;
  /** Where the leader's manager on another node reaches this agent (agent-server.ts), HOST:PORT; null: nowhere (one machine). */
  agentEndpoint?: string | null;
  /** Where the node's NBD frontend listens. */
  nbdHost: string;
  nbdPort: number;
  /** Disk directories. */
  disks: string[];
  /** Process records and logs. */
  stateDir: string;
  /** UNIX sockets (kept short: a socket path has at most 107 bytes). */
  runDir: string;
  secretFile: string;
  /** The zebu CLI entry (src/cli/main.ts). */
  main: string;
  /** Node.js flags of the data-path processes. */
  nodeFlags?: string[];
  /** Tests only: added to every replica process's arguments (e.g. --disk-mode power-loss). */
  replicaArgs?: string[];
  pollMs?: number;
  leaseTtlMs?: number;
  diskProbeMs?: number;
  log?: (event: Record<string, unknown>) => void;
}

interface EngineInfo {
  sizeBytes: number;
  epoch: number;
  faulted: boolean;
  faultedReason: string | null;
  rebuilding?: boolean;
  /** `address` is HOST:PORT, or KEY=HOST:PORT; `key` is the replica's key when the engine reports it apart. */
  replicas: { address: string; key?: string; mode: 'RW' | 'WO' | 'ERR'; reason: string | null; rebuild?: { copiedBytes: number; totalBytes: number; delta?: boolean } | null; resumable?: boolean }[];
  stats: EngineIoStats;
  recovery?: unknown;
  lastVerify?: unknown;
  /** A newer engine (epoch) fenced this one. */
  superseded?: boolean;
  /** Write-intent log: regions active now, and the bound. */
  activeRegions?: number;
  maxActiveRegions?: number;
  /** Its rebuilds' bandwidth limit (0: none); absent from an engine of an older version. */
  rebuildMaxBytesPerSecond?: number;
}

/** A count the engine reports; null when it does not (an engine of another version). */
function countOrNull(value: unknown): number | null {
  return typeof value === 'number' && Number.isSafeInteger(value) && value >= 0 ? value : null;
}

/** An engine's row for a replica: its manager name and the HOST:PORT it is at. */
function engineRow(row: EngineInfo['replicas'][number], wanted: Record<string, string>): { name: string; address: string } {
  const eq = row.address.indexOf('=');
  const address = eq > 0 ? row.address.slice(eq + 1) : row.address;
  const name = row.key !== undefined && row.key !== '' ? row.key : replicaNameOf(row.address, wanted);
  return { name, address };
}

const FRONTEND_ID = 'frontend';
/** Bounds on the manager's requests to an engine: a verify, anything else (snapshots). */
export const VERIFY_TIMEOUT_MS = 6 * 3600_000;
export const ENGINE_REQUEST_TIMEOUT_MS = 120_000;
/** A direct replica read that takes longer goes through the engine instead. */
const REPLICA_CONNECT_TIMEOUT_MS = 3000;
const REPLICA_READ_TIMEOUT_MS = 15_000;
/**
 * The engine's and the frontend's restart backoff is short: clients wait while they are down (a
 * start that keeps failing costs one attempt every 2 s). Replicas back off up to the supervisor's
 * default: a volume keeps serving on the others.
 */
const DATA_PATH_BACKOFF_MS_MAX = 2000;
/** Bound on an engine's start-up past its wait for replicas (recovery, maps): longer means hung. */
const ENGINE_START_MS_MAX = 120_000;
const STATS_WRITE_MS = 5000;
/**
 * An engine whose state stays the same from pass to pass is asked less often: the wait doubles up
 * to this (its counters are written every STATS_WRITE_MS anyway). Any change, a rebuild's progress
 * included, and any change of its object or process brings it back to every pollMs: an idle node
 * with many volumes does not spend a request per volume per second.
 */
const STEADY_ENGINE_POLL_MS_MAX = STATS_WRITE_MS;

function replicaProcessId(name: string): string {
  return `r.${name}`;
}
function engineProcessId(volume: string): string {
  return `e.${volume}`;
}

export class Agent {
  readonly nodeId: string;
  private readonly options: Required<Omit<AgentOptions, 'log'>> & { log: (event: Record<string, unknown>) => void };
  private readonly objects: Objects;
  private readonly settings: Settings;
  private readonly supervisor: ProcessSupervisor;
  private readonly queue: WorkQueue;
  /** This node's disks that are ready, by name (the backing-image files live on them). */
  private readonly readyDisks = new Map<string, string>();
  private readonly imageFiles: BackingImageFiles;
  private watch: Watch | null = null;
  private lease: Lease | null = null;
  private timers: NodeJS.Timeout[] = [];
  private readonly statsWrittenAt = new Map<string, number>();
  /** Per engine: what its last pass saw (stats apart), and the wait before the next pass. */
  private readonly engineSteady = new Map<string, { key: string; waitMs: number }>();
  private stopping = false;
  private boundNbdAddress: string | null = null;
  /**
   * The NBD listening socket, bound here and handed to every frontend process (kept-listener.ts):
   * while the frontend restarts, clients wait in its backlog. Null while an adopted frontend (of
   * an earlier agent) holds the only copy; made when that one exits.
   */
  private nbdListener: KeptListener | null = null;
  private nbdListenerError: string | null = null;
  /** The last engine-link views written per volume (JSON), so that unchanged ones are not written again. */
  private readonly linkWritten = new Map<string, string>();
  /**
   * The export put per volume (frontend pid, engine socket, timeouts), so that an engine pass puts
   * it again only when something changed; forgotten when the export is removed or missing.
   */
  private readonly exportPut = new Map<string, string>();

  constructor(options: AgentOptions) {
    this.options = { pollMs: 1000, leaseTtlMs: 15_000, diskProbeMs: 30_000, replicaArgs: [], nodeFlags: [], log: () => {}, ...options, agentEndpoint: options.agentEndpoint ?? null };
    this.nodeId = options.nodeId;
    this.objects = new Objects(options.store);
    this.settings = new Settings(this.objects);
    fs.mkdirSync(this.engineDir, { recursive: true, mode: 0o700 });
    this.supervisor = new ProcessSupervisor({
      recordDir: path.join(options.stateDir, 'procs'),
      logDir: path.join(options.stateDir, 'logs'),
      main: options.main,
      nodeFlags: this.options.nodeFlags,
      log: this.options.log,
      onChange: (id) => this.onProcessChange(id),
    });
    this.queue = new WorkQueue({ name: 'agent', reconcile: (key) => this.reconcile(key), concurrency: 8, log: this.options.log });
    this.imageFiles = new BackingImageFiles({ objects: this.objects, nodeId: this.nodeId, diskPaths: () => this.readyDisks, log: this.options.log });
  }

  private get engineDir(): string {
    return path.join(this.options.runDir, 'engines');
  }
  private engineSocket(volume: string): string {
    return path.join(this.engineDir, `${volume}.sock`);
  }
  private engineControlSocket(volume: string): string {
    return path.join(this.engineDir, `${volume}.ctl`);
  }
  private get frontendControlSocket(): string {
    return path.join(this.options.runDir, 'frontend.ctl');
  }
  /** HOST:PORT of the node's NBD listener (with port 0 asked for: the port the frontend got). */
  get nbdAddress(): string {
    return this.boundNbdAddress ?? `${this.options.nbdHost}:${this.options.nbdPort}`;
  }

  /** Waits until the node's NBD frontend is serving; fails with its error if it cannot start. */
  async frontendReady(timeoutMs: number): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const view = this.supervisor.get(FRONTEND_ID);
      if (view?.state === 'running') {
        await this.noteFrontendAddress(view.ready);
        return;
      }
      if (this.nbdListenerError !== null) throw new ZebuError(ErrorCode.EIO, `the NBD frontend on ${this.nbdAddress} does not start: ${this.nbdListenerError}`);
      if (view?.state === 'error') throw new ZebuError(ErrorCode.EIO, `the NBD frontend on ${this.nbdAddress} does not start: ${view.message}`);
      if (Date.now() > deadline) throw new ZebuError(ErrorCode.TIMEOUT, `the NBD frontend on ${this.nbdAddress} is not ready after ${timeoutMs} ms`);
      await new Promise((r) => setTimeout(r, 50));
    }
  }

  // ---- start and stop --------------------------------------------------------------------------

  async start(): Promise<void> {
    await this.registerNode();
    await this.registerDisks();
    await this.keepLease();
    // Engines are restarted by their reconcile, never by the supervisor: a new engine process needs a new epoch.
    // The frontend too: a new one needs the listening socket this agent keeps (reconcileFrontend).
    const adopted = this.supervisor.adopt({ autoRestart: (id) => id.startsWith('r.') });
    this.options.log({ event: 'agent-started', node: this.nodeId, adopted });
    // Replicas first: after a node restart the engines then find them serving (an engine waits
    // for them anyway, engine-replica-wait-seconds, but need not wait long).
    for (const r of await this.objects.list(Kind.Replica)) {
      if (r.value.spec.nodeId !== this.nodeId) continue;
      await this.reconcileReplica(r.name).catch((err) => this.options.log({ event: 'agent-task-failed', error: (err as Error).message }));
    }
    const revision = await this.resync();
    this.watchFrom(revision);
    this.every(this.options.leaseTtlMs / 3, () => this.keepLease());
    this.every(this.options.diskProbeMs, () => this.registerDisks());
    this.every(5000, async () => {
      await this.resync();
    });
    this.every(this.options.pollMs, () => this.pollEngineLinks());
    this.every(2000, () => this.imageFiles.kick());
    void this.imageFiles.kick();
  }

  private every(ms: number, fn: () => Promise<unknown>): void {
    const timer = setInterval(() => {
      fn().catch((err) => this.options.log({ event: 'agent-task-failed', error: (err as Error).message }));
    }, ms);
    timer.unref();
    this.timers.push(timer);
  }

  /**
   * Stops the agent. With `stopProcesses`, the node's data path stops too, in order: the
   * frontend (clients get their in-flight answers, then a disconnect), the engines (they flush
   * the replicas), the replicas (they mark themselves clean). Without it they keep running.
   */
  async stop(options: { stopProcesses: boolean }): Promise<void> {
    this.stopping = true;
    for (const t of this.timers) clearInterval(t);
    this.watch?.close();
    await this.imageFiles.stop();
    await this.queue.stop();
    if (!options.stopProcesses) {
      this.supervisor.detach();
      return;
    }
    const ids = this.supervisor.ids();
    await this.supervisor.stop(FRONTEND_ID);
    this.nbdListener?.close();
    this.nbdListener = null;
    await Promise.all(ids.filter((id) => id.startsWith('e.')).map((id) => this.supervisor.stop(id)));
    await Promise.all(ids.filter((id) => id.startsWith('r.')).map((id) => this.supervisor.stop(id)));
    this.supervisor.detach();
    for (const e of await this.objects.list(Kind.Engine)) {
      if (e.value.spec.nodeId !== this.nodeId) continue;
      await this.objects.mutate(Kind.Engine, e.name, (x) => {
        x.status = { ...x.status, state: 'stopped', pid: null, endpoint: null, replicas: {}, rebuilding: false, stats: null, activeRegions: null, superseded: false, exitReason: null, frontendLink: null };
      });
    }
    for (const r of await this.objects.list(Kind.Replica)) {
      if (r.value.spec.nodeId !== this.nodeId) continue;
      await this.objects.mutate(Kind.Replica, r.name, (x) => {
        x.status = { ...x.status, state: 'stopped', address: null, pid: null };
      });
    }
    if (this.lease !== null) await this.options.store.revokeLease(this.lease.id).catch(() => {});
  }

  // ---- node, disks, liveness -------------------------------------------------------------------

  private async registerNode(): Promise<void> {
    const status = { address: this.options.address, nbdAddress: this.nbdAddress, agentEndpoint: this.options.agentEndpoint ?? null, lastHeartbeatAt: new Date().toISOString() };
    const updated = await this.objects.mutate(Kind.Node, this.nodeId, (n) => {
      n.status = status;
    });
    if (updated === null) await this.objects.create(Kind.Node, this.nodeId, { spec: { allowScheduling: true }, status });
  }

  private async keepLease(): Promise<void> {
    if (this.stopping) return;
    if (this.lease !== null) {
      try {
        await this.options.store.keepAlive(this.lease.id);
        return;
      } catch (err) {
        if ((err as ZebuError).code !== ErrorCode.NOT_FOUND) throw err;
        this.lease = null;
      }
    }
    // A lease left by an earlier run of this agent is not ours to keep: replace its object.
    await this.objects.remove(Kind.NodeLease, this.nodeId);
    const lease = await this.options.store.grantLease(this.options.leaseTtlMs);
    await this.objects.create(Kind.NodeLease, this.nodeId, { startedAt: new Date().toISOString() }, { leaseId: lease.id });
    this.lease = lease;
    await this.objects.mutate(Kind.Node, this.nodeId, (n) => {
      n.status.lastHeartbeatAt = new Date().toISOString();
    });
  }

  private diskName(diskPath: string, uuid: string): string {
    const base = path.basename(diskPath).replace(/[^A-Za-z0-9._-]/g, '-') || 'disk';
    return `${this.nodeId}-${base}-${uuid.slice(0, 4)}`;
  }

  private async registerDisks(): Promise<void> {
    const known = (await this.objects.list(Kind.Disk)).filter((d) => d.value.spec.nodeId === this.nodeId);
    for (const diskPath of this.options.disks) {
      const existing = known.find((d) => d.value.spec.path === diskPath);
      let uuid = existing?.value.status.diskUuid ?? null;
      if (existing === undefined) uuid = initDisk(diskPath);
      const probe = probeDisk(diskPath, uuid);
      const status = {
        diskUuid: uuid,
        storageMaximumBytes: probe.storageMaximumBytes,
        storageAvailableBytes: probe.storageAvailableBytes,
        ready: probe.ready,
        message: probe.message,
      };
      const name = existing?.name ?? this.diskName(diskPath, uuid!);
      if (existing !== undefined) {
        await this.objects.mutate(Kind.Disk, existing.name, (d) => {
          d.status = status;
        });
      } else {
        await this.objects.create(Kind.Disk, name, {
          spec: { nodeId: this.nodeId, path: diskPath, allowScheduling: true, storageReservedBytes: 0 },
          status,
        });
      }
      if (probe.ready) this.readyDisks.set(name, diskPath);
      else this.readyDisks.delete(name);
    }
  }

  // ---- what to reconcile -----------------------------------------------------------------------

  private async resync(): Promise<number> {
    const revision = await this.options.store.revision();
    this.queue.add(FRONTEND_ID);
    for (const r of await this.objects.list(Kind.Replica)) if (r.value.spec.nodeId === this.nodeId) this.queue.add(`replica/${r.name}`);
    for (const e of await this.objects.list(Kind.Engine)) if (e.value.spec.nodeId === this.nodeId) this.queue.add(`engine/${e.name}`);
    // Processes whose objects are gone (adopted orphans) are stopped by their reconcile.
    for (const id of this.supervisor.ids()) {
      if (id.startsWith('r.')) this.queue.add(`replica/${id.slice(2)}`);
      if (id.startsWith('e.')) this.queue.add(`engine/${id.slice(2)}`);
    }
    return revision;
  }

  private watchFrom(revision: number): void {
    if (this.stopping) return;
    this.watch = this.options.store.watch(
      { afterRevision: revision },
      {
        onEvent: (event: WatchEvent) => this.onChange(event),
        onError: (err) => {
          if (this.stopping) return;
          this.options.log({ event: 'agent-watch-ended', error: err.message });
          setTimeout(() => {
            this.resync().then((rev) => this.watchFrom(rev), () => {});
          }, 500).unref();
        },
      },
    );
  }

  private onChange(event: WatchEvent): void {
    if (event.kind === Kind.Volume && event.type === 'delete') {
      // The volume is gone for good: so are its engine's logs (kept across detach until now).
      if (this.supervisor.get(engineProcessId(event.name)) === undefined) this.supervisor.removeLogs(engineProcessId(event.name));
      return;
    }
    if (event.kind === Kind.Replica) {
      const value = event.object.value as ReplicaValue;
      if (value.spec.nodeId === this.nodeId || this.supervisor.get(replicaProcessId(event.name)) !== undefined) this.queue.add(`replica/${event.name}`);
    } else if (event.kind === Kind.Engine) {
      const value = event.object.value as EngineValue;
      if (value.spec.nodeId === this.nodeId || this.supervisor.get(engineProcessId(event.name)) !== undefined) this.queue.add(`engine/${event.name}`);
    } else if (event.kind === Kind.BackingImage) {
      void this.imageFiles.kick();
    }
  }

  private onProcessChange(id: string): void {
    if (this.stopping) return;
    if (id === FRONTEND_ID) {
      this.queue.add(FRONTEND_ID);
      // A restarted frontend has no exports: the engines put theirs back.
      for (const other of this.supervisor.ids()) if (other.startsWith('e.')) this.queue.add(`engine/${other.slice(2)}`);
    } else if (id.startsWith('r.')) {
      this.queue.add(`replica/${id.slice(2)}`);
    } else if (id.startsWith('e.')) {
      this.queue.add(`engine/${id.slice(2)}`);
    }
  }

  private reconcile(key: string): Promise<number | null> {
    if (key === FRONTEND_ID) return this.reconcileFrontend();
    const slash = key.indexOf('/');
    const kind = key.slice(0, slash);
    const name = key.slice(slash + 1);
    if (kind === 'replica') return this.reconcileReplica(name);
    if (kind === 'engine') return this.reconcileEngine(name);
    throw new Error(`unknown agent key ${key}`);
  }

  // ---- frontend --------------------------------------------------------------------------------

  private async reconcileFrontend(): Promise<number | null> {
    const current = this.supervisor.get(FRONTEND_ID);
    const running = current !== undefined && current.pid !== null;
    if (!running && this.nbdListener === null) {
      try {
        // The port the frontend had (port 0 asked for: keep the one it got), else the one asked for.
        const bound = this.boundNbdAddress;
        const port = bound !== null ? Number(bound.slice(bound.lastIndexOf(':') + 1)) : this.options.nbdPort;
        this.nbdListener = keepTcpListener(this.options.nbdHost, port);
        this.nbdListenerError = null;
        this.options.log({ event: 'nbd-listener-bound', address: this.nbdListener.address });
      } catch (err) {
        this.nbdListenerError = (err as Error).message;
        this.options.log({ event: 'frontend-down', message: this.nbdListenerError });
        return 2000;
      }
    }
    const args = [
      'frontend', 'serve', '--control-socket', this.frontendControlSocket, '--secret-file', this.options.secretFile,
      '--state-file', path.join(this.options.stateDir, 'frontend.state'),
      ...(this.nbdListener !== null ? ['--nbd-fd', '3'] : ['--nbd', this.nbdAddress]),
    ];
    // Restarted by this reconcile, never by the supervisor alone: a new process needs the listener.
    const view = this.supervisor.ensure(FRONTEND_ID, args, { autoRestart: false, fds: this.nbdListener !== null ? [this.nbdListener.fd] : [], backoffMsMax: DATA_PATH_BACKOFF_MS_MAX });
    if (view.state === 'running') {
      await this.noteFrontendAddress(view.ready);
      return null;
    }
    if (view.state === 'error') this.options.log({ event: 'frontend-down', message: view.message });
    return 500;
  }

  /** Port 0 was asked for, or the frontend was adopted: keep the address it really has. */
  private async noteFrontendAddress(ready: Record<string, unknown> | null): Promise<void> {
    const bound = ready?.nbdAddress;
    if (typeof bound !== 'string' || bound === this.boundNbdAddress) return;
    this.boundNbdAddress = bound;
    await this.objects.mutate(Kind.Node, this.nodeId, (n) => {
      n.status.nbdAddress = bound;
    });
  }

  /** The deadlines of the frontend's engine links, from the settings (milliseconds). */
  private async linkTimeouts(): Promise<{ holdTimeoutMs: number; hangTimeoutMs: number; stallTimeoutMs: number }> {
    return {
      holdTimeoutMs: (await this.settings.int('frontend-hold-timeout-seconds')) * 1000,
      hangTimeoutMs: (await this.settings.int('engine-hang-timeout-seconds')) * 1000,
      stallTimeoutMs: (await this.settings.int('engine-stall-timeout-seconds')) * 1000,
    };
  }

  /**
   * Copies each export's engine link (OPEN / CLOSE / REOPENING and its counters) from the
   * frontend into its Engine's status, when it changed: `zebu volume get`, /metrics and the
   * manager's events read it there. Polled, because the link changes while the engine is down.
   * Exports that no engine of this node wants are removed.
   */
  private async pollEngineLinks(): Promise<void> {
    if (!this.frontendRunning() || this.stopping) return;
    const views = (await controlRequest(this.frontendControlSocket, 'GET', '/v1/exports', undefined, { timeoutMs: 5000 })) as { name: string; link?: EngineLinkView & { engine?: unknown } }[];
    // An export the frontend does not have (any more) is put again at its engine's next pass.
    const present = new Set(views.map((v) => v.name));
    for (const volume of this.exportPut.keys()) if (!present.has(volume)) this.exportPut.delete(volume);
    for (const view of views) {
      // An export no engine of this node wants (restored by a restarted frontend after its volume
      // was detached or moved meanwhile) goes.
      const engine = await this.objects.get(Kind.Engine, view.name);
      if (engine === null || engine.value.spec.nodeId !== this.nodeId || engine.value.spec.desireState !== 'running' || !engine.value.spec.frontend) {
        await this.removeExport(view.name);
        this.options.log({ event: 'export-removed', volume: view.name, reason: 'no engine of this node serves it' });
        continue;
      }
      if (view.link === undefined) continue;
      const { engine: _process, directReads: _directReads, ...link } = view.link as EngineLinkView & { engine?: unknown; directReads?: unknown };
      // stateSince alone moves nothing; `held` is written with the rest.
      const key = JSON.stringify(link);
      if (this.linkWritten.get(view.name) === key) continue;
      const updated = await this.objects.mutate(Kind.Engine, view.name, (e) => {
        if (e.spec.nodeId !== this.nodeId) return false;
        e.status = { ...e.status, frontendLink: link };
      });
      if (updated !== null) this.linkWritten.set(view.name, key);
    }
  }

  private frontendRunning(): boolean {
    return this.supervisor.get(FRONTEND_ID)?.state === 'running';
  }

  private async removeExport(volume: string): Promise<void> {
    this.exportPut.delete(volume);
    if (!this.frontendRunning()) return;
    try {
      await controlRequest(this.frontendControlSocket, 'DELETE', `/v1/exports/${encodeURIComponent(volume)}`);
    } catch (err) {
      if ((err as ZebuError).code !== ErrorCode.NOT_FOUND) throw err;
    }
  }

  // ---- replicas --------------------------------------------------------------------------------

  private async reconcileReplica(name: string): Promise<number | null> {
    const id = replicaProcessId(name);
    const obj = await this.objects.get(Kind.Replica, name);
    if (obj === null || obj.value.spec.nodeId !== this.nodeId) {
      if (this.supervisor.get(id) !== undefined) await this.supervisor.stop(id);
      return null;
    }
    const spec = obj.value.spec;
    if (obj.value.deletionRequestedAt !== null) {
      await this.supervisor.stop(id);
      this.removeReplicaDirectory(spec.dataPath);
      this.supervisor.removeLogs(id);
      await this.objects.remove(Kind.Replica, name);
      this.options.log({ event: 'replica-deleted', replica: name, dir: spec.dataPath });
      return null;
    }
    if (spec.desireState === 'stopped') {
      if (this.supervisor.get(id) !== undefined) await this.supervisor.stop(id);
      await this.setReplicaStatus(name, { state: 'stopped', address: null, pid: null, message: null });
      return null;
    }
    const image = spec.backingImage ?? null;
    if (image !== null && this.supervisor.get(id)?.state !== 'running') {
      // The replica reads the image's file on its disk as its base: it starts once that is ready.
      const waiting = await this.imageNotReady(image.name, spec.diskId, image.path);
      if (waiting !== null) {
        await this.setReplicaStatus(name, { state: 'starting', address: null, pid: null, message: waiting });
        return 1000;
      }
    }
    const view = this.supervisor.ensure(id, [
      'replica', 'serve', '--dir', spec.dataPath, '--size', String(spec.sizeBytes), '--listen', `${this.options.address}:0`,
      '--secret-file', this.options.secretFile, '--name', name, ...(image !== null ? ['--backing', image.path] : []), ...this.options.replicaArgs,
    ]);
    const address = view.state === 'running' ? String(view.ready?.listen ?? '') || null : null;
    await this.setReplicaStatus(name, {
      state: view.state === 'stopped' ? 'starting' : view.state,
      address,
      pid: view.pid,
      restarts: view.restarts,
      message: view.message,
    });
    return view.state === 'running' ? null : 500;
  }

  /** Why the file of backing image `image` on disk `diskId` cannot be read yet, or null when it is ready. */
  private async imageNotReady(image: string, diskId: string, file: string): Promise<string | null> {
    const obj = await this.objects.get(Kind.BackingImage, image);
    if (obj === null) return `waiting for backing image ${image}: it does not exist`;
    const entry = obj.value.status.files[diskId];
    if (entry === undefined) return `waiting for a copy of backing image ${image} on disk ${diskId}`;
    if (entry.state !== 'ready') {
      const progress = entry.state === 'in-progress' ? ` ${Math.floor(entry.progress * 100)}%` : '';
      return `waiting for backing image ${image} on disk ${diskId}: ${entry.state}${progress}${entry.message !== null ? ` (${entry.message})` : ''}`;
    }
    if (!fs.existsSync(file)) return `waiting for backing image ${image} on disk ${diskId}: ${file} is missing`;
    // Checked (size and SHA-512) since this agent started: a file changed while the node was
    // down would hand the replica wrong bytes under every block it does not hold itself.
    if (!this.imageFiles.isChecked(image, diskId)) {
      void this.imageFiles.kick();
      return `waiting for the file of backing image ${image} on disk ${diskId} to be checked`;
    }
    return null;
  }

  /** Removes a replica directory, but only one that is where replica directories live. */
  private removeReplicaDirectory(dataPath: string): void {
    const resolved = path.resolve(dataPath);
    const onDisk = this.options.disks.some((d) => path.dirname(resolved) === path.join(path.resolve(d), REPLICAS_DIR));
    if (!onDisk) {
      this.options.log({ event: 'replica-dir-kept', dir: dataPath, reason: 'not under a replicas directory of this node' });
      return;
    }
    fs.rmSync(resolved, { recursive: true, force: true, maxRetries: 3 });
  }

  private async setReplicaStatus(name: string, status: Partial<ReplicaValue['status']>): Promise<void> {
    await this.objects.mutate(Kind.Replica, name, (r) => {
      r.status = { ...r.status, ...status };
    });
  }

  // ---- engines ---------------------------------------------------------------------------------

  /** Sends a request to a volume's engine on this node (snapshots, for the manager). */
  engineRequest(volume: string, method: string, pathName: string, body?: unknown): Promise<unknown> {
    if (this.supervisor.get(engineProcessId(volume))?.state !== 'running') {
      return Promise.reject(new ZebuError(ErrorCode.BUSY, `the engine of volume ${volume} is not running on node ${this.nodeId}`));
    }
    // A verify reads the whole volume (minutes for a large one); anything else answers in seconds.
    const timeoutMs = pathName === '/v1/verify' ? VERIFY_TIMEOUT_MS : ENGINE_REQUEST_TIMEOUT_MS;
    return controlRequest(this.engineControlSocket(volume), method, pathName, body, { timeoutMs });
  }

  /** The UNIX socket of a volume's engine running on this node (for the agent's data tunnel). */
  engineDataSocket(volume: string): string {
    if (this.supervisor.get(engineProcessId(volume))?.state !== 'running') {
      throw new ZebuError(ErrorCode.BUSY, `the engine of volume ${volume} is not running on node ${this.nodeId}`);
    }
    return this.engineSocket(volume);
  }

  /**
   * A data-protocol connection to a volume's engine on this node, for work that reads or writes
   * the volume itself (backups read its snapshots, restores write it). The caller closes it.
   */
  openEngineData(volume: string): Promise<DataClient> {
    if (this.supervisor.get(engineProcessId(volume))?.state !== 'running') {
      return Promise.reject(new ZebuError(ErrorCode.BUSY, `the engine of volume ${volume} is not running on node ${this.nodeId}`));
    }
    return DataClient.connect({ path: this.engineSocket(volume), secret: readSecretFile(this.options.secretFile), peerLabel: `engine of ${volume}`, requestTimeoutMs: ENGINE_REQUEST_TIMEOUT_MS });
  }

  /**
   * A data-protocol connection to a replica (HOST:PORT) at `epoch`, for reads that need not go
   * through its engine (a backup reads a snapshot straight from the engine's RW replicas). The
   * caller closes it.
   */
  openReplicaData(address: string, epoch: number): Promise<DataClient> {
    let host: string;
    let port: number;
    try {
      ({ host, port } = parseSourceAddress(address));
    } catch (err) {
      return Promise.reject(err);
    }
    return DataClient.connect({
      host, port, epoch, secret: readSecretFile(this.options.secretFile), peerLabel: `replica ${address}`,
      connectTimeoutMs: REPLICA_CONNECT_TIMEOUT_MS, requestTimeoutMs: REPLICA_READ_TIMEOUT_MS,
    });
  }

  /**
   * Where the replicas of an engine's spec are now (a running replica's own report beats the
   * spec's address, which the manager refreshes later), and which of them are failed (the engine
   * does not wait for those at start-up).
   */
  private async currentReplicas(wanted: Record<string, string>): Promise<{ addresses: Record<string, string>; failed: string[] }> {
    const addresses: Record<string, string> = {};
    const failed: string[] = [];
    for (const [name, address] of Object.entries(wanted)) {
      const r = await this.objects.get(Kind.Replica, name);
      const now = r !== null && r.value.status.state === 'running' && r.value.status.address !== null ? r.value.status.address : null;
      addresses[name] = now ?? address;
      if (r === null || r.value.spec.failedAt !== null) failed.push(name);
    }
    return { addresses, failed };
  }

  private async stopEngine(volume: string): Promise<void> {
    await this.removeExport(volume);
    const id = engineProcessId(volume);
    if (this.supervisor.get(id) !== undefined) await this.supervisor.stop(id);
    fs.rmSync(this.engineSocket(volume), { force: true });
    fs.rmSync(this.engineControlSocket(volume), { force: true });
  }

  private async reconcileEngine(volume: string): Promise<number | null> {
    const id = engineProcessId(volume);
    const obj = await this.objects.get(Kind.Engine, volume);
    const mine = obj !== null && obj.value.spec.nodeId === this.nodeId;
    if (!mine || obj.value.spec.desireState === 'stopped') {
      await this.stopEngine(volume);
      this.statsWrittenAt.delete(volume);
      this.engineSteady.delete(volume);
      this.linkWritten.delete(volume);
      this.exportPut.delete(volume);
      if (mine) {
        await this.objects.mutate(Kind.Engine, volume, (e) => {
          e.status = { ...e.status, state: 'stopped', pid: null, endpoint: null, replicas: {}, rebuilding: false, stats: null, message: null, activeRegions: null, superseded: false, exitReason: null, frontendLink: null };
        });
      } else if ((await this.objects.get(Kind.Volume, volume)) === null) {
        this.supervisor.removeLogs(id);
      }
      return null;
    }
    const spec = obj.value.spec;
    const running = this.supervisor.get(id);
    if (running !== undefined && running.pid !== null && epochOf(running.args) !== spec.epoch) {
      // An engine of an earlier epoch: it must go before the new one starts. Same attachment
      // (the manager gave it a new epoch: salvage, restart): the NBD export stays, the frontend
      // holds its clients' requests for the new engine.
      await this.supervisor.stop(id);
      return 0;
    }
    if (running === undefined || running.pid === null) {
      // A new engine process. Never a second one with an epoch already used: the manager gives
      // the engine a new epoch first (the process of this one crashed, or the node restarted).
      const startedEpoch = obj.value.status.startedEpoch ?? 0;
      if (spec.epoch <= startedEpoch) {
        await this.objects.mutate(Kind.Engine, volume, (e) => {
          const exitReason = running?.message || null;
          const message = `the engine process of epoch ${spec.epoch} is gone${exitReason !== null ? ` (${exitReason})` : ''}; waiting for a new epoch`;
          if (e.status.state === 'error' && e.status.pid === null && e.status.message === message && e.status.exitReason === exitReason) return false;
          e.status = { ...e.status, state: 'error', pid: null, endpoint: null, message, exitReason, activeRegions: null, superseded: false };
        });
        return this.options.pollMs;
      }
    }
    // Started at once, with where its replicas are as far as is known now: a replica that is
    // itself restarting (after a crash of the node, say) comes up on a new port, which the engine
    // is told while it waits for it (below), so a start-up race never faults the volume.
    const replicasNow = await this.currentReplicas(spec.replicas);
    const timeoutMs = await this.settings.int('engine-replica-timeout-ms');
    const maxActiveRegions = await this.settings.int('write-intent-max-regions');
    const replicaWaitMs = (await this.settings.int('engine-replica-wait-seconds')) * 1000;
    const leaseRecallTimeoutMs = await this.settings.int('rebuild-lease-recall-timeout-ms');
    const maxRegionRetries = await this.settings.int('rebuild-max-region-retries');
    const rebuildMaxMiBPerSecond = await this.settings.int('rebuild-max-mib-per-second');
    const view = this.supervisor.ensure(id, [
      'engine', 'serve', '--name', volume, '--size', String(spec.sizeBytes),
      ...Object.entries(replicasNow.addresses).flatMap(([name, address]) => ['--replica', `${name}=${address}`]),
      ...replicasNow.failed.flatMap((name) => ['--replica-out', name]),
      '--socket', this.engineSocket(volume), '--control-socket', this.engineControlSocket(volume),
      '--secret-file', this.options.secretFile, '--epoch', String(spec.epoch), '--request-timeout-ms', String(timeoutMs),
      '--max-active-regions', String(maxActiveRegions), '--replica-wait-ms', String(replicaWaitMs),
      '--lease-recall-timeout-ms', String(leaseRecallTimeoutMs), '--max-region-retries', String(maxRegionRetries),
      '--rebuild-max-mib-per-second', String(rebuildMaxMiBPerSecond),
      // Its start-up may wait for replicas, then resync regions: only past that is it hung.
    ], { autoRestart: false, readyTimeoutMs: replicaWaitMs + ENGINE_START_MS_MAX, backoffMsMax: DATA_PATH_BACKOFF_MS_MAX });
    const processEpoch = view.pid !== null ? epochOf(view.args) : 0;
    if (view.state === 'starting' && view.pid !== null) {
      // It may be waiting for replicas that restarted on new ports meanwhile: tell it where they are.
      await controlRequest(this.engineControlSocket(volume), 'POST', '/v1/startup/addresses', { addresses: replicasNow.addresses }, { timeoutMs: 5000 }).catch(() => {});
    }
    if (view.state !== 'running') {
      await this.objects.mutate(Kind.Engine, volume, (e) => {
        e.status = {
          ...e.status, state: view.state === 'stopped' ? 'starting' : view.state, pid: view.pid, restarts: view.restarts, message: view.message, endpoint: null,
          startedEpoch: Math.max(e.status.startedEpoch ?? 0, processEpoch),
        };
      });
      return 300;
    }

    const control = this.engineControlSocket(volume);
    let info: EngineInfo;
    try {
      info = (await controlRequest(control, 'GET', '/v1/info')) as EngineInfo;
    } catch (err) {
      await this.objects.mutate(Kind.Engine, volume, (e) => {
        e.status.message = `engine control: ${(err as Error).message}`;
        e.status.startedEpoch = Math.max(e.status.startedEpoch ?? 0, processEpoch);
      });
      return this.options.pollMs;
    }
    let message: string | null = null;

    // The rebuild bandwidth limit applies to running engines too (a user slows a rebuild down).
    const rebuildMaxBytesPerSecond = rebuildMaxMiBPerSecond * 1024 * 1024;
    if (info.rebuildMaxBytesPerSecond !== undefined && info.rebuildMaxBytesPerSecond !== rebuildMaxBytesPerSecond) {
      try {
        await controlRequest(control, 'PUT', '/v1/rebuild-limit', { bytesPerSecond: rebuildMaxBytesPerSecond });
        info.rebuildMaxBytesPerSecond = rebuildMaxBytesPerSecond;
      } catch (err) {
        message = `setting the rebuild bandwidth limit: ${(err as Error).message}`;
      }
    }

    // The replica set the manager wants, by name. A wanted replica at another address (its process
    // restarted on a new port) is added again by name: the engine rebuilds it by delta when it can,
    // and refuses (EINVAL) when it cannot. Entries nobody wants go.
    // An engine row at the address the replica reports now counts as wanted even before the
    // manager has refreshed the spec (the engine was told the new address at its start).
    const wantedAt = (name: string, address: string): boolean => spec.replicas[name] === address || (name in spec.replicas && replicasNow.addresses[name] === address);
    const rows = info.replicas.map((r) => ({ row: r, ...engineRow(r, spec.replicas) }));
    for (const r of rows) {
      if (wantedAt(r.name, r.address)) continue;
      // An ERR entry of a replica wanted elsewhere is replaced by the add below, which keeps what
      // the engine knows of it (its missed-write maps).
      if (r.name in spec.replicas && r.row.mode === 'ERR') continue;
      try {
        await controlRequest(control, 'DELETE', `/v1/replicas/${encodeURIComponent(r.row.address)}`);
        this.options.log({ event: 'replica-removed', volume, replica: r.name, address: r.address });
      } catch (err) {
        message = `removing replica ${r.name} (${r.address}): ${(err as Error).message}`;
      }
    }
    const inEngine = new Set(rows.filter((r) => wantedAt(r.name, r.address)).map((r) => r.name));
    const addErrors: Record<string, { address: string; code: string; message: string }> = {};
    for (const [name, address] of Object.entries(spec.replicas)) {
      if (inEngine.has(name)) continue;
      try {
        await controlRequest(control, 'POST', '/v1/replicas', { address: `${name}=${address}` });
        this.options.log({ event: 'replica-added', volume, replica: name, address });
      } catch (err) {
        const e = err as ZebuError;
        addErrors[name] = { address, code: String(e.code ?? ErrorCode.EIO), message: e.message };
        message = `adding replica ${name}: ${e.message}`;
      }
    }
    if (Object.keys(addErrors).length > 0 || rows.some((r) => !wantedAt(r.name, r.address))) {
      try {
        info = (await controlRequest(control, 'GET', '/v1/info')) as EngineInfo;
      } catch {
        // keep the earlier answer: the next pass reads again
      }
    }

    // Online expansion: the engine grows its replicas; new NBD connections see the new size.
    if (spec.sizeBytes > info.sizeBytes) {
      try {
        info = (await controlRequest(control, 'POST', '/v1/expand', { sizeBytes: spec.sizeBytes })) as EngineInfo;
        if (this.frontendRunning()) await controlRequest(this.frontendControlSocket, 'POST', `/v1/exports/${encodeURIComponent(volume)}/refresh`).catch(() => {});
      } catch (err) {
        message = `expanding to ${spec.sizeBytes} bytes: ${(err as Error).message}`;
      }
    }

    let endpoint: string | null = null;
    if (spec.frontend) {
      if (this.frontendRunning()) {
        const body = { engineSocket: this.engineSocket(volume), ...(await this.linkTimeouts()) };
        const key = JSON.stringify([this.supervisor.get(FRONTEND_ID)?.pid ?? null, body]);
        try {
          if (this.exportPut.get(volume) !== key) {
            this.exportPut.delete(volume);
            await controlRequest(this.frontendControlSocket, 'PUT', `/v1/exports/${encodeURIComponent(volume)}`, body);
            this.exportPut.set(volume, key);
          }
          endpoint = `nbd://${this.nbdAddress}/${encodeURIComponent(volume)}`;
        } catch (err) {
          message = `NBD export: ${(err as Error).message}`;
        }
      }
    } else {
      await this.removeExport(volume).catch(() => {});
    }

    const replicas: Record<string, EngineReplicaStatus> = {};
    for (const r of info.replicas) {
      const { name, address } = engineRow(r, spec.replicas);
      if (!(name in spec.replicas)) continue;
      // An entry at the address the replica is at wins over a stale one of the same replica.
      if (replicas[name] !== undefined && !wantedAt(name, address)) continue;
      replicas[name] = { address, mode: r.mode, reason: r.reason, rebuild: r.rebuild ?? null, ...(r.resumable === true ? { resumable: true } : {}) };
    }
    const recovery = recoveryFromEngine(info.recovery ?? null, spec.replicas);
    const lastVerify = verifyFromEngine(info.lastVerify ?? null, spec.replicas, null);
    const now = Date.now();
    const writeStats = now - (this.statsWrittenAt.get(volume) ?? 0) >= STATS_WRITE_MS;
    const updated = await this.objects.mutate(Kind.Engine, volume, (e) => {
      const next: EngineValue['status'] = {
        ...e.status,
        state: 'running' as const,
        pid: view.pid,
        epoch: processEpoch,
        sizeBytes: info.sizeBytes,
        endpoint,
        faulted: info.faulted,
        faultedReason: info.faultedReason,
        replicas,
        rebuilding: info.rebuilding ?? info.replicas.some((r) => r.mode === 'WO'),
        restarts: view.restarts,
        message,
        startedEpoch: Math.max(e.status.startedEpoch ?? 0, processEpoch),
        recovery: recovery ?? e.status.recovery ?? null,
        lastVerify: lastVerify ?? e.status.lastVerify ?? null,
        addErrors,
        maxActiveRegions: countOrNull(info.maxActiveRegions),
        superseded: info.superseded === true,
        exitReason: null,
      };
      // A recovery report belongs to the process that made it: none yet from a new one.
      if (recovery === null && e.status.epoch !== processEpoch) next.recovery = null;
      if (writeStats || e.status.stats === null) next.stats = info.stats;
      // Changes with every write burst: refreshed with the stats, not at every poll.
      if (writeStats || e.status.activeRegions === null || e.status.activeRegions === undefined) next.activeRegions = countOrNull(info.activeRegions);
      e.status = next;
    });
    if (updated !== null && writeStats) this.statsWrittenAt.set(volume, now);
    const seen = JSON.stringify([view.pid, processEpoch, info.sizeBytes, endpoint, info.faulted, info.faultedReason, replicas, info.rebuilding, message, info.superseded, addErrors, recovery, lastVerify]);
    const steady = this.engineSteady.get(volume);
    const waitMs = steady?.key === seen ? Math.min(steady.waitMs * 2, STEADY_ENGINE_POLL_MS_MAX) : this.options.pollMs;
    this.engineSteady.set(volume, { key: seen, waitMs });
    return waitMs;
  }
}

function epochOf(args: string[]): number {
  const at = args.indexOf('--epoch');
  return at >= 0 ? Number(args[at + 1]) : 0;
}
