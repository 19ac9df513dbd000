/**
 * The volume controller: one engine per attached volume, over N replica connections.
 * See ../../../shared/DESIGN.md §3.
 *
 * - Writes, trims, zeroes and flushes go to every RW and WO replica and succeed when all
 *   succeed. A replica that fails or times out is set ERR, disconnected and never used again by
 *   this engine; the request still succeeds while at least one RW replica took it. With no RW
 *   replica left the volume is faulted and every request fails at once with EIO.
 * - Reads go to one RW replica (a local one first, then least outstanding); on error that
 *   replica is set ERR and the read is retried on another.
 * - Overlapping requests reach every replica in the same order (one connection each), and each
 *   replica applies overlapping writes in arrival order, so replicas cannot diverge.
 */
import os from 'node:os';
import { ZebuError, ErrorCode, assert } from '../errors.ts';
import { ReplicaClient } from '../protocol/client.ts';
import { Op, RequestFlag, decodeExtents } from '../protocol/frames.ts';
import type { BlockBackend, BackendExtent } from '../protocol/backend.ts';
import type { ReplicaInfo, SnapshotInfo } from '../replica/replica.ts';
import { chooseStartupModes, type StartupCandidate } from './startup.ts';

export const ReplicaMode = { RW: 'RW', WO: 'WO', ERR: 'ERR' } as const;
export type ReplicaMode = (typeof ReplicaMode)[keyof typeof ReplicaMode];

export interface EngineOptions {
  name: string;
  sizeBytes: number;
  /** HOST:PORT of each replica. */
  replicas: string[];
  secret: Buffer;
  epoch: number;
  requestTimeoutMs?: number;
  pingIntervalMs?: number;
  log?: (event: Record<string, unknown>) => void;
}

export interface EngineReplicaStatus {
  address: string;
  mode: ReplicaMode;
  inflight: number;
  local: boolean;
  reason: string | null;
  revision: number | null;
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
}

interface EngineReplica {
  address: string;
  host: string;
  port: number;
  local: boolean;
  client: ReplicaClient | null;
  mode: ReplicaMode;
  reason: string | null;
  info: ReplicaInfo | null;
}

type Done = (err: ZebuError | null) => void;

const EMPTY = Buffer.alloc(0);
const MAX_QUEUED_WHILE_PAUSED = 4096;
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

export class Engine implements BlockBackend {
  readonly name: string;
  readonly sizeBytes: number;
  readonly epoch: number;
  private readonly replicas: EngineReplica[];
  private readonly options: Required<Omit<EngineOptions, 'replicas'>>;
  private faultedReason: string | null = null;
  private superseded = false;
  private inflight = 0;
  private paused = false;
  private queued: (() => void)[] = [];
  private drainWaiters: (() => void)[] = [];
  private pingTimer: NodeJS.Timeout | null = null;
  private closed = false;
  readonly stats: EngineStats = {
    reads: 0, writes: 0, zeroes: 0, flushes: 0, readBytes: 0, writeBytes: 0, errors: 0, readLatencyMsTotal: 0, writeLatencyMsTotal: 0,
  };

  private constructor(options: EngineOptions) {
    this.name = options.name;
    this.sizeBytes = options.sizeBytes;
    this.epoch = options.epoch;
    this.options = { requestTimeoutMs: 8000, pingIntervalMs: 2000, log: () => {}, ...options };
    this.replicas = options.replicas.map((address) => {
      const { host, port } = parseAddress(address);
      return { address, host, port, local: isLocalHost(host), client: null, mode: ReplicaMode.ERR, reason: 'not connected', info: null };
    });
  }

  /** Connects to every replica with the volume's epoch and decides their modes. */
  static async start(options: EngineOptions): Promise<Engine> {
    if (options.replicas.length === 0) throw new ZebuError(ErrorCode.EINVAL, 'a volume needs at least one replica');
    if (new Set(options.replicas).size !== options.replicas.length) throw new ZebuError(ErrorCode.EINVAL, 'replica addresses must be distinct');
    const engine = new Engine(options);
    await engine.connectAll();
    engine.pingTimer = setInterval(() => engine.pingAll(), engine.options.pingIntervalMs);
    engine.pingTimer.unref();
    return engine;
  }

  private log(event: Record<string, unknown>): void {
    this.options.log({ volume: this.name, ...event });
  }

  private async connectAll(): Promise<void> {
    const candidates: StartupCandidate[] = await Promise.all(
      this.replicas.map(async (r) => {
        try {
          const client = await ReplicaClient.connect({
            host: r.host, port: r.port, secret: this.options.secret, epoch: this.epoch,
            requestTimeoutMs: this.options.requestTimeoutMs, connectTimeoutMs: this.options.requestTimeoutMs,
          });
          r.client = client;
          const info = await client.open();
          r.info = info;
          return { address: r.address, info, error: null };
        } catch (err) {
          return { address: r.address, info: null, error: (err as Error).message };
        }
      }),
    );
    const decisions = chooseStartupModes(this.sizeBytes, candidates);
    for (const [i, r] of this.replicas.entries()) {
      const decision = decisions[i];
      if (decision.mode === ReplicaMode.RW) {
        r.mode = ReplicaMode.RW;
        r.reason = null;
        const client = r.client!;
        client.onClose((err) => {
          if (r.client === client) this.setErr(r, err);
        });
      } else {
        r.mode = ReplicaMode.ERR;
        r.reason = decision.reason;
        const client = r.client;
        r.client = null;
        client?.close();
      }
    }
    if (!this.replicas.some((r) => r.mode === ReplicaMode.RW)) {
      this.faultedReason = `no replica could be opened: ${this.replicas.map((r) => `${r.address}: ${r.reason}`).join('; ')}`;
      this.log({ event: 'faulted', reason: this.faultedReason });
    }
    this.log({ event: 'started', replicas: this.replicaStatus() });
  }

  replicaStatus(): EngineReplicaStatus[] {
    return this.replicas.map((r) => ({
      address: r.address,
      mode: r.mode,
      inflight: r.client?.inflight ?? 0,
      local: r.local,
      reason: r.reason,
      revision: r.info?.revision ?? null,
    }));
  }

  get faulted(): boolean {
    return this.faultedReason !== null;
  }

  /** Takes a replica out for good: ERR, disconnected, never used again by this engine. */
  private setErr(r: EngineReplica, err: ZebuError): void {
    if (r.mode === ReplicaMode.ERR && r.client === null) return;
    const wasActive = r.mode !== ReplicaMode.ERR;
    r.mode = ReplicaMode.ERR;
    r.reason = err.message;
    const client = r.client;
    r.client = null;
    client?.close();
    if (err.code === ErrorCode.FENCED) {
      // A newer engine owns the volume: stop serving it at all.
      this.superseded = true;
      this.faultedReason = `superseded by a newer epoch: ${err.message}`;
    }
    if (wasActive) this.log({ event: 'replica-error', replica: r.address, reason: err.message });
    if (!this.replicas.some((x) => x.mode === ReplicaMode.RW) && this.faultedReason === null) {
      this.faultedReason = `no healthy replica left (last: ${r.address}: ${err.message})`;
      this.log({ event: 'faulted', reason: this.faultedReason });
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

  private admit(fn: () => void): void {
    if (!this.paused) {
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

  private async pauseAndDrain(): Promise<void> {
    this.paused = true;
    if (this.inflight > 0) await new Promise<void>((resolve) => this.drainWaiters.push(resolve));
  }

  private resume(): void {
    this.paused = false;
    const queued = this.queued;
    this.queued = [];
    for (const fn of queued) fn();
  }

  // ---- fan-out -------------------------------------------------------------------------------

  /** Sends one request to every RW and WO replica; `done` once all have answered. */
  private fanOut(op: number, flags: number, offset: number, length: number, payload: Buffer, done: Done): void {
    if (this.faultedReason !== null) return done(this.faultError());
    let remaining = 0;
    for (const r of this.replicas) if (r.mode !== ReplicaMode.ERR && r.client !== null) remaining++;
    if (remaining === 0) return done(this.faultError());
    let acceptedByRw = 0;
    const targets = this.replicas.filter((r) => r.mode !== ReplicaMode.ERR && r.client !== null);
    for (const r of targets) {
      const client = r.client!;
      client.send(op, flags, offset, length, payload, (err) => {
        if (err !== null) {
          if (err.code === ErrorCode.EINVAL) {
            // The request itself is bad (the replica says so): not the replica's fault.
            remaining--;
            if (remaining === 0) done(err);
            return;
          }
          if (r.client === client) this.setErr(r, err);
        } else if (r.mode === ReplicaMode.RW && r.client === client) {
          acceptedByRw++;
        }
        remaining--;
        if (remaining === 0) {
          if (acceptedByRw > 0) done(null);
          else done(this.faultedReason !== null ? this.faultError() : new ZebuError(ErrorCode.EIO, `volume ${this.name}: no RW replica accepted the request`));
        }
      });
    }
  }

  /** Picks a RW replica for a read: local first, then least outstanding. */
  private pickReader(exclude: Set<EngineReplica>): EngineReplica | null {
    let best: EngineReplica | null = null;
    for (const r of this.replicas) {
      if (r.mode !== ReplicaMode.RW || r.client === null || exclude.has(r)) continue;
      if (best === null) {
        best = r;
        continue;
      }
      if (r.local !== best.local) {
        if (r.local) best = r;
        continue;
      }
      if (r.client.inflight < best.client!.inflight) best = r;
    }
    return best;
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
    const started = performance.now();
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
          this.stats.reads++;
          this.stats.readBytes += length;
          this.stats.readLatencyMsTotal += performance.now() - started;
          resolve();
        }),
      );
    });
  }

  readSnapshot(name: string, offset: number, length: number, out: Buffer, outOffset: number): Promise<void> {
    this.checkRange(offset, length);
    const r = this.pickReader(new Set());
    if (r === null) return Promise.reject(this.faultError());
    return r.client!.readSnapshot(name, offset, length).then((data) => {
      data.copy(out, outOffset);
    });
  }

  private fanOutPromise(op: number, flags: number, offset: number, length: number, payload: Buffer): Promise<void> {
    return new Promise((resolve, reject) => {
      this.admit(() =>
        this.fanOut(op, flags, offset, length, payload, (err) => {
          this.finished();
          if (err !== null) {
            this.stats.errors++;
            return reject(err);
          }
          resolve();
        }),
      );
    });
  }

  async write(offset: number, data: Buffer, options: { fua?: boolean } = {}): Promise<void> {
    this.checkRange(offset, data.length);
    const started = performance.now();
    await this.fanOutPromise(Op.WRITE, options.fua ? RequestFlag.FUA : 0, offset, data.length, data);
    this.stats.writes++;
    this.stats.writeBytes += data.length;
    this.stats.writeLatencyMsTotal += performance.now() - started;
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
      sizeBytes: this.sizeBytes,
      epoch: this.epoch,
      faulted: this.faulted,
      faultedReason: this.faultedReason,
      replicas: this.replicaStatus(),
      stats: this.stats,
    };
  }

  /** Drains in-flight I/O, flushes, snapshots every replica with the same name, resumes. */
  async snapshotCreate(name: string): Promise<SnapshotInfo> {
    if (this.faultedReason !== null) throw this.faultError();
    await this.pauseAndDrain();
    try {
      await new Promise<void>((resolve, reject) => this.fanOut(Op.FLUSH, 0, 0, 0, EMPTY, (err) => (err ? reject(err) : resolve())));
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
    await this.onEveryActive((client) => client.snapshotDelete(name), false);
  }

  async snapshotRevert(name: string): Promise<void> {
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
  private async onEveryActive<T>(fn: (client: ReplicaClient) => Promise<T>, allMustHaveIt: boolean): Promise<T[]> {
    if (this.faultedReason !== null) throw this.faultError();
    const active = this.replicas.filter((r) => r.mode !== ReplicaMode.ERR && r.client !== null);
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

  /** Flushes what it can and disconnects from the replicas. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    if (this.pingTimer !== null) clearInterval(this.pingTimer);
    if (this.faultedReason === null) await this.flush().catch(() => {});
    for (const r of this.replicas) {
      const client = r.client;
      r.client = null;
      client?.close();
    }
  }
}
