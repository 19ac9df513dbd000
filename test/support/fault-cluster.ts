/**
 * One volume's data path as separate real processes, each of which a fault test can SIGKILL and
 * start again on its own: N `zebu replica serve` (fixed ports, so a restarted replica is found at
 * the same address), one `zebu engine serve`, one `zebu frontend serve` with a static export on a
 * UNIX socket. Optionally a blackhole proxy (fault-proxy.ts) between the engine and a replica.
 *
 * The harness plays the manager's part where the data path needs one: every engine start gets a
 * new epoch, and a replica that is out of the set is added back (POST /v1/replicas). When the
 * engine refuses it as not empty (no delta possible), it is wiped and rebuilt in full — counted,
 * because a full rebuild where a log resync or a delta sufficed is a failure of the suite.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { ZebuError, ErrorCode } from '../../src/errors.ts';
import { controlRequest } from '../../src/protocol/control-channel.ts';
import { DataClient } from '../../src/protocol/client.ts';
import { ZEBU_MAIN, writeSecret } from './replica-process.ts';
import net from 'node:net';
import { BlackholeProxy } from './fault-proxy.ts';
import { NbdClient, type NbdTarget } from './nbd-client.ts';
import { compareReplicasOnline, type OfflineDifference } from './fault-checker.ts';
import { watchChildStart } from './child-ready.ts';

export type Role = 'replica' | 'engine' | 'frontend';

export interface Proc {
  role: Role;
  child: ChildProcess;
  ready: Record<string, unknown>;
  exited: Promise<number | string>;
}

export interface FaultClusterOptions {
  /** A short directory (UNIX socket paths are limited to 107 bytes). */
  root: string;
  sizeBytes: number;
  replicas?: number;
  /** Extra arguments for every replica (e.g. --fault-injection, --disk-mode power-loss, --no-intent-log). */
  replicaArgs?: string[];
  /** Replicas (indexes) the engine reaches through a blackhole proxy. */
  proxied?: number[];
  /** The engine's per-request deadline towards replicas (default 2000 ms). */
  requestTimeoutMs?: number;
  engineArgs?: string[];
  name?: string;
}

export interface RebuildOutcome {
  kind: 'none' | 'delta' | 'full';
  /** Bytes the rebuild said it would copy (its totalBytes). */
  bytes: number;
  durationMs: number;
}

/** What the engine reported about its start-up recovery (E's `recovery` in /v1/info), or null when absent. */
export interface RecoveryFigures {
  clean: boolean;
  regions: number;
  bytes: number;
  durationMs: number;
  raw: Record<string, unknown>;
}

export interface ReplicaRow {
  address: string;
  mode: 'RW' | 'WO' | 'ERR';
  reason: string | null;
  rebuild: { copiedBytes: number; totalBytes: number; delta?: boolean } | null;
}

const READY_TIMEOUT_MS = 30_000;

/**
 * A short temporary directory for one fault test, removed at the end — kept (and named in the
 * output) with ZEBU_FAULT_KEEP=1, for a look at the replicas and process logs after a failure.
 */
export function faultRoot(t: { after: (fn: () => unknown) => void; diagnostic: (message: string) => void }): string {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'zf-'));
  if (process.env.ZEBU_FAULT_KEEP === '1') t.diagnostic(`kept: ${root}`);
  else t.after(() => fs.rmSync(root, { recursive: true, force: true, maxRetries: 3 }));
  return root;
}

export class FaultCluster {
  readonly name: string;
  readonly sizeBytes: number;
  readonly root: string;
  readonly secretFile: string;
  readonly secret: Buffer;
  readonly replicaDirs: string[];
  readonly replicaPorts: number[];
  readonly proxies: (BlackholeProxy | null)[];
  readonly engineSocket: string;
  readonly controlSocket: string;
  readonly nbdSocket: string;
  readonly logDir: string;
  epoch = 0;
  readonly replicaProcs: (Proc | null)[];
  engine: Proc | null = null;
  frontend: Proc | null = null;
  private readonly options: FaultClusterOptions;
  private readonly all = new Set<ChildProcess>();

  private constructor(options: FaultClusterOptions, ports: number[], proxies: (BlackholeProxy | null)[]) {
    this.options = options;
    this.name = options.name ?? 'vol';
    this.sizeBytes = options.sizeBytes;
    this.root = options.root;
    const { file, secret } = writeSecret(options.root);
    this.secretFile = file;
    this.secret = secret;
    const n = options.replicas ?? 3;
    this.replicaDirs = Array.from({ length: n }, (_, i) => path.join(options.root, `r${i}`));
    this.replicaPorts = ports;
    this.proxies = proxies;
    this.replicaProcs = Array.from({ length: n }, () => null);
    const run = path.join(options.root, 'run');
    fs.mkdirSync(run, { recursive: true, mode: 0o700 });
    this.engineSocket = path.join(run, 'e.sock');
    this.controlSocket = path.join(run, 'c.sock');
    this.nbdSocket = path.join(run, 'nbd.sock');
    this.logDir = path.join(options.root, 'logs');
    fs.mkdirSync(this.logDir, { recursive: true });
  }

  /** Starts every process; everything is SIGKILLed when the test ends. */
  static async start(t: { after: (fn: () => unknown) => void }, options: FaultClusterOptions): Promise<FaultCluster> {
    const n = options.replicas ?? 3;
    const ports: number[] = [];
    for (let i = 0; i < n; i++) ports.push(await fixedPort(ports));
    const proxies: (BlackholeProxy | null)[] = [];
    for (let i = 0; i < n; i++) proxies.push(options.proxied?.includes(i) ? await BlackholeProxy.start(ports[i]) : null);
    const cluster = new FaultCluster(options, ports, proxies);
    t.after(() => cluster.destroy());
    for (let i = 0; i < n; i++) await cluster.startReplica(i);
    await cluster.startEngine();
    await cluster.startFrontend();
    return cluster;
  }

  get nbdTarget(): NbdTarget {
    return { path: this.nbdSocket };
  }

  connectNbd(): Promise<NbdClient> {
    return NbdClient.connect(this.nbdTarget, this.name, 5000);
  }

  /** The address the engine knows replica `i` by (its proxy when proxied). */
  engineAddress(i: number): string {
    return this.proxies[i]?.address ?? `127.0.0.1:${this.replicaPorts[i]}`;
  }

  private async spawnReady(role: Role, args: string[], logName: string): Promise<Proc> {
    const log = fs.openSync(path.join(this.logDir, `${logName}.log`), 'a');
    const child = spawn(process.execPath, [ZEBU_MAIN, ...args], { stdio: ['ignore', 'pipe', log] });
    fs.closeSync(log);
    this.all.add(child);
    const start = watchChildStart(child, logName, READY_TIMEOUT_MS, 0, () => `\n${this.logTail(logName)}`);
    const exited = start.exited.then((code) => {
      this.all.delete(child);
      return code;
    });
    const ready = await start.ready;
    // Keep reading stdout so that a chatty child never blocks on a full pipe.
    child.stdout!.resume();
    return { role, child, ready, exited };
  }

  /** The JSON events named `event` a process wrote to its log (e.g. a replica's 'power-loss' reports). */
  logEvents(logName: string, event: string): Record<string, unknown>[] {
    let text: string;
    try {
      text = fs.readFileSync(path.join(this.logDir, `${logName}.log`), 'utf8');
    } catch {
      return [];
    }
    const out: Record<string, unknown>[] = [];
    for (const line of text.split('\n')) {
      if (!line.includes(event)) continue;
      try {
        const msg = JSON.parse(line) as Record<string, unknown>;
        if (msg.event === event) out.push(msg);
      } catch {
        // not JSON
      }
    }
    return out;
  }

  /** The last lines of a process log, for failure messages. */
  logTail(logName: string, lines = 30): string {
    try {
      return fs.readFileSync(path.join(this.logDir, `${logName}.log`), 'utf8').trimEnd().split('\n').slice(-lines).join('\n');
    } catch {
      return '(no log)';
    }
  }

  async startReplica(i: number, extraArgs: string[] = []): Promise<Proc> {
    if (this.replicaProcs[i] !== null) throw new Error(`replica ${i} is running`);
    const proc = await this.spawnReady('replica', [
      'replica', 'serve', '--dir', this.replicaDirs[i], '--size', String(this.sizeBytes), '--listen', `127.0.0.1:${this.replicaPorts[i]}`,
      '--secret-file', this.secretFile, ...(this.options.replicaArgs ?? []), ...extraArgs,
    ], `replica-${i}`);
    this.replicaProcs[i] = proc;
    void proc.exited.then(() => {
      if (this.replicaProcs[i] === proc) this.replicaProcs[i] = null;
    });
    return proc;
  }

  /** Starts the engine with the next epoch (as the manager does for every new engine process). */
  async startEngine(): Promise<Proc> {
    if (this.engine !== null) throw new Error('the engine is running');
    this.epoch++;
    const proc = await this.spawnReady('engine', [
      'engine', 'serve', '--name', this.name, '--size', String(this.sizeBytes),
      ...this.replicaDirs.flatMap((_, i) => ['--replica', this.engineAddress(i)]),
      '--socket', this.engineSocket, '--control-socket', this.controlSocket, '--secret-file', this.secretFile,
      '--epoch', String(this.epoch), '--request-timeout-ms', String(this.options.requestTimeoutMs ?? 2000),
      ...(this.options.engineArgs ?? []),
    ], 'engine');
    this.engine = proc;
    void proc.exited.then(() => {
      if (this.engine === proc) this.engine = null;
    });
    return proc;
  }

  async startFrontend(): Promise<Proc> {
    if (this.frontend !== null) throw new Error('the frontend is running');
    const proc = await this.spawnReady('frontend', [
      'frontend', 'serve', '--name', this.name, '--engine-socket', this.engineSocket, '--nbd-socket', this.nbdSocket, '--secret-file', this.secretFile,
    ], 'frontend');
    this.frontend = proc;
    void proc.exited.then(() => {
      if (this.frontend === proc) this.frontend = null;
    });
    return proc;
  }

  /** Sends `signal` to a process and waits until it has exited. */
  private static async signal(proc: Proc | null, signal: NodeJS.Signals): Promise<void> {
    if (proc === null) return;
    if (proc.child.exitCode === null && proc.child.signalCode === null) proc.child.kill(signal);
    await proc.exited;
  }

  async killReplica(i: number, signal: NodeJS.Signals = 'SIGKILL'): Promise<void> {
    const proc = this.replicaProcs[i];
    await FaultCluster.signal(proc, signal);
    if (this.replicaProcs[i] === proc) this.replicaProcs[i] = null;
  }

  async killEngine(signal: NodeJS.Signals = 'SIGKILL'): Promise<void> {
    const proc = this.engine;
    await FaultCluster.signal(proc, signal);
    if (this.engine === proc) this.engine = null;
  }

  async killFrontend(signal: NodeJS.Signals = 'SIGKILL'): Promise<void> {
    const proc = this.frontend;
    await FaultCluster.signal(proc, signal);
    if (this.frontend === proc) this.frontend = null;
  }

  /** SIGKILLs every data-path process at once (same tick), then waits for all of them. */
  async killAll(): Promise<void> {
    const procs = [...this.replicaProcs, this.engine, this.frontend].filter((p): p is Proc => p !== null);
    for (const p of procs) p.child.kill('SIGKILL');
    await Promise.all(procs.map((p) => p.exited));
    this.replicaProcs.fill(null);
    this.engine = null;
    this.frontend = null;
  }

  control<T = unknown>(method: string, pathName: string, body?: unknown): Promise<T> {
    return controlRequest(this.controlSocket, method, pathName, body, { timeoutMs: 600_000 }) as Promise<T>;
  }

  info(): Promise<Record<string, unknown>> {
    return this.control('GET', '/v1/info');
  }

  replicaRows(): Promise<ReplicaRow[]> {
    return this.control('GET', '/v1/replicas');
  }

  /** The engine's start-up recovery figures, or null when the engine reports none. */
  async recovery(): Promise<RecoveryFigures | null> {
    const info = await this.info();
    const r = info.recovery as Record<string, unknown> | null | undefined;
    if (r === undefined || r === null) return null;
    return { clean: r.clean === true, regions: Number(r.regions ?? 0), bytes: Number(r.bytes ?? 0), durationMs: Number(r.durationMs ?? 0), raw: r };
  }

  /**
   * The engine's verify (POST /v1/verify): the regions that differ between RW replicas, or null
   * when the engine has no verify route.
   */
  async verify(repair = false): Promise<{ regions: number; differing: { region: number }[]; durationMs: number } | null> {
    try {
      return await this.control('POST', '/v1/verify', { repair });
    } catch (err) {
      if (err instanceof ZebuError && err.code === ErrorCode.NOT_FOUND && /no route/.test(err.message)) return null;
      throw err;
    }
  }

  /**
   * Brings replica `i` back into the set after it failed and (if needed) restarted: asks the
   * engine to add it (a delta rebuild when the engine can); when refused as not empty, wipes it
   * and adds it as a new replica (a full rebuild). Waits until it is RW.
   */
  async readd(i: number, timeoutMs = 60_000): Promise<RebuildOutcome> {
    const address = this.engineAddress(i);
    const started = Date.now();
    // A delta rebuild the engine decided itself (at start-up) is under way or about to start:
    // its outcome is the answer. Adding the replica again meanwhile is refused (EXISTS), and taking
    // it out to add it again would throw away its map (a full rebuild).
    let row = (await this.replicaRows()).find((r) => r.address === address);
    const engineRebuild = { seen: false, bytes: 0, delta: false };
    while (row !== undefined && (row.mode === 'WO' || /^waiting for a delta rebuild/.test(row.reason ?? ''))) {
      if (row.rebuild !== null) {
        engineRebuild.seen = true;
        engineRebuild.bytes = Math.max(engineRebuild.bytes, row.rebuild.totalBytes);
        engineRebuild.delta ||= row.rebuild.delta === true;
      }
      if (Date.now() - started > timeoutMs) throw new Error(`replica ${address} not RW after ${timeoutMs} ms (${row.mode}, ${row.reason})`);
      await new Promise((resolve) => setTimeout(resolve, 10));
      row = (await this.replicaRows()).find((r) => r.address === address);
    }
    if (row?.mode === 'RW') {
      if (!engineRebuild.seen) return { kind: 'none', bytes: 0, durationMs: 0 };
      return { kind: engineRebuild.delta ? 'delta' : 'full', bytes: engineRebuild.delta ? engineRebuild.bytes : this.sizeBytes, durationMs: Date.now() - started };
    }
    if (this.replicaProcs[i] === null) await this.startReplica(i);
    let full = false;
    const add = async (): Promise<void> => {
      try {
        await this.control('POST', '/v1/replicas', { address });
      } catch (err) {
        if (!(err instanceof ZebuError) || err.code !== ErrorCode.EXISTS) throw err;
        // Still listed (ERR): take it out, then add it again.
        await this.control('DELETE', `/v1/replicas/${encodeURIComponent(address)}`);
        await this.control('POST', '/v1/replicas', { address });
      }
    };
    try {
      await add();
    } catch (err) {
      if (!(err instanceof ZebuError) || err.code !== ErrorCode.EINVAL || !/not empty/.test(err.message)) throw err;
      full = true;
      await this.killReplica(i);
      fs.rmSync(this.replicaDirs[i], { recursive: true, force: true });
      await this.startReplica(i);
      await add();
    }
    let bytes = 0;
    let delta = false;
    for (;;) {
      const r = (await this.replicaRows()).find((x) => x.address === address);
      if (r === undefined) throw new Error(`replica ${address} vanished from the set while being added`);
      if (r.rebuild !== null) {
        bytes = Math.max(bytes, r.rebuild.totalBytes);
        delta ||= r.rebuild.delta === true;
      }
      if (r.mode === 'RW') break;
      if (r.mode === 'ERR') throw new Error(`rebuild of replica ${address} failed: ${r.reason}`);
      if (Date.now() - started > timeoutMs) throw new Error(`replica ${address} not RW after ${timeoutMs} ms (${r.mode}, ${JSON.stringify(r.rebuild)})`);
      await new Promise((resolve) => setTimeout(resolve, 10));
    }
    // A delta rebuild says so (rebuild.delta); a full one copies the volume.
    return { kind: full || !delta ? 'full' : 'delta', bytes: full || !delta ? Math.max(bytes, this.sizeBytes) : bytes, durationMs: Date.now() - started };
  }

  /** After every process died: replicas, then the engine, then what it could not bring back, then the frontend. */
  async restartAll(): Promise<RebuildOutcome[]> {
    for (let i = 0; i < this.replicaDirs.length; i++) await this.startReplica(i);
    await this.startEngine();
    const rebuilds = await this.healAll();
    await this.startFrontend();
    return rebuilds;
  }

  /** Adds back every replica that is not RW (after an engine start or a fault). */
  async healAll(): Promise<RebuildOutcome[]> {
    const out: RebuildOutcome[] = [];
    for (let i = 0; i < this.replicaDirs.length; i++) {
      const row = (await this.replicaRows()).find((r) => r.address === this.engineAddress(i));
      if (row?.mode !== 'RW') out.push(await this.readd(i));
    }
    return out;
  }

  /** A protocol client straight to replica `i` (bypassing any proxy), e.g. to inject faults. */
  replicaClient(i: number): Promise<DataClient> {
    return DataClient.connect({ port: this.replicaPorts[i], secret: this.secret, epoch: this.epoch, requestTimeoutMs: 10_000 });
  }

  /** Compares the RW replicas through the replica protocol (no write may be in flight). */
  async compareOnline(regionBytes: number): Promise<{ regions: number; differing: OfflineDifference[] }> {
    const rows = await this.replicaRows();
    const ports = this.replicaDirs.map((_, i) => i).filter((i) => rows.find((r) => r.address === this.engineAddress(i))?.mode === 'RW').map((i) => this.replicaPorts[i]);
    return compareReplicasOnline(ports, { secret: this.secret, epoch: this.epoch, sizeBytes: this.sizeBytes, regionBytes });
  }

  /** Clean stop: frontend, engine, replicas with SIGTERM. */
  async stop(): Promise<void> {
    await FaultCluster.signal(this.frontend, 'SIGTERM');
    await FaultCluster.signal(this.engine, 'SIGTERM');
    await Promise.all(this.replicaProcs.map((p) => FaultCluster.signal(p, 'SIGTERM')));
    for (const p of this.proxies) await p?.close();
  }

  /** SIGKILLs whatever still runs (end of test). */
  async destroy(): Promise<void> {
    const children = [...this.all];
    for (const c of children) c.kill('SIGKILL');
    await Promise.all(children.map((c) => (c.exitCode !== null || c.signalCode !== null ? null : new Promise((r) => c.once('exit', r)))));
    for (const p of this.proxies) await p?.close().catch(() => {});
  }
}

/**
 * A free port below the kernel's ephemeral range (32768+): a replica restarted on its fixed port
 * must not find it taken by some outgoing connection's ephemeral port meanwhile.
 */
async function fixedPort(taken: number[]): Promise<number> {
  for (;;) {
    const port = 20000 + Math.floor(Math.random() * 12000);
    if (taken.includes(port)) continue;
    const free = await new Promise<boolean>((resolve) => {
      const srv = net.createServer();
      srv.once('error', () => resolve(false));
      srv.listen(port, '127.0.0.1', () => srv.close(() => resolve(true)));
    });
    if (free) return port;
  }
}
