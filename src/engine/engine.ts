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
import { ZebuError, ErrorCode, assert, toZebuError } from '../errors.ts';
import { ReplicaClient } from '../protocol/client.ts';
import { Op, RequestFlag, decodeExtents } from '../protocol/frames.ts';
import type { BlockBackend, BackendExtent } from '../protocol/backend.ts';
import type { ReplicaInfo, SnapshotInfo } from '../replica/replica.ts';
import { chooseStartupModes, type StartupCandidate } from './startup.ts';
import { Rebuild } from './rebuild.ts';

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
  /** While this replica is being rebuilt (WO). */
  rebuild: RebuildProgress | null;
}

export interface RebuildProgress {
  copiedBytes: number;
  totalBytes: number;
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
  rebuild: RebuildProgress | null;
  /** Whether writes go to it: false for a replica being rebuilt until it joins. */
  inWriteSet: boolean;
}

type Done = (err: ZebuError | null) => void;

const EMPTY = Buffer.alloc(0);
/** A rebuild copies the volume in regions of this size (a multiple of 4 KiB, at most MAX_IO_BYTES). */
const REBUILD_REGION_BYTES = 4 * 1024 * 1024;
/** Regions copied at once by a rebuild. */
const REBUILD_COPIERS = 4;
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
  /** Grows with an online expansion (expand()). */
  sizeBytes: number;
  readonly epoch: number;
  private readonly replicas: EngineReplica[];
  private readonly options: Required<Omit<EngineOptions, 'replicas'>>;
  private faultedReason: string | null = null;
  private superseded = false;
  private inflight = 0;
  /** Control operations holding I/O paused (snapshot, revert, expansion, a rebuild's join/end): nested. */
  private pauseDepth = 0;
  private queued: (() => void)[] = [];
  private drainWaiters: (() => void)[] = [];
  private pingTimer: NodeJS.Timeout | null = null;
  private closed = false;
  /** The rebuild under way, if any: at most one at a time. */
  private rebuilding: Rebuild<EngineReplica> | null = null;
  /** Settles (never rejects) when the rebuild's copy has stopped, whether done or failed. */
  private rebuildRun: Promise<void> = Promise.resolve();
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
      return { address, host, port, local: isLocalHost(host), client: null, mode: ReplicaMode.ERR, reason: 'not connected', info: null, rebuild: null, inWriteSet: true };
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
          let info = await client.open();
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
      rebuild: r.rebuild === null ? null : { ...r.rebuild },
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
    if (this.rebuilding !== null && this.rebuilding.target === r) {
      // The copy stops at its next step; from now on nothing says it is under way.
      this.rebuilding.cancelled ??= `target failed: ${err.message}`;
      r.rebuild = null;
    }
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

  // ---- fan-out -------------------------------------------------------------------------------

  /** Sends one request to every RW and WO replica; `done` once all have answered. */
  private fanOut(op: number, flags: number, offset: number, length: number, payload: Buffer, done: Done): void {
    if (this.faultedReason !== null) return done(this.faultError());
    let remaining = 0;
    for (const r of this.replicas) if (r.mode !== ReplicaMode.ERR && r.client !== null && r.inWriteSet) remaining++;
    if (remaining === 0) return done(this.faultError());
    let acceptedByRw = 0;
    // Replicas that called the request invalid (error path only: allocated on first use).
    let refused: { r: EngineReplica; client: ReplicaClient; err: ZebuError }[] | null = null;
    const targets = this.replicas.filter((r) => r.mode !== ReplicaMode.ERR && r.client !== null && r.inWriteSet);
    for (const r of targets) {
      const client = r.client!;
      client.send(op, flags, offset, length, payload, (err) => {
        if (err !== null) {
          // EINVAL: the request itself is bad (the replica says so), not the replica's fault —
          // unless another replica took it, which is decided once all have answered.
          if (err.code === ErrorCode.EINVAL) (refused ??= []).push({ r, client, err });
          else if (r.client === client) this.setErr(r, err);
        } else if (r.mode === ReplicaMode.RW && r.client === client) {
          acceptedByRw++;
        }
        remaining--;
        if (remaining > 0) return;
        if (acceptedByRw > 0) {
          // A replica that refused what a RW replica applied no longer holds the same bytes.
          for (const x of refused ?? []) {
            if (x.r.client === x.client) this.setErr(x.r, new ZebuError(ErrorCode.EIO, `refused a request the other replicas applied: ${x.err.message}`));
          }
          done(null);
        } else if (refused !== null) {
          done(refused[0].err);
        } else {
          done(this.faultedReason !== null ? this.faultError() : new ZebuError(ErrorCode.EIO, `volume ${this.name}: no RW replica accepted the request`));
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
      const done = (err: ZebuError | null): void => {
        this.finished();
        if (err !== null) {
          this.stats.errors++;
          return reject(err);
        }
        resolve();
      };
      this.admit(() => {
        const rebuild = this.rebuilding;
        if (rebuild === null || op === Op.FLUSH) return this.fanOut(op, flags, offset, length, payload, done);
        // A rebuild copies ranges: a write must not fall between a copy's read and its write.
        rebuild.whenRangeFree(offset, length, () => {
          const token = rebuild.writeStarted(offset, length);
          this.fanOut(op, flags, offset, length, payload, (err) => {
            rebuild.writeDone(token);
            done(err);
          });
        });
      });
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
      rebuilding: this.rebuilding !== null && this.rebuilding.cancelled === null,
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
    this.refuseDuringRebuild('delete a snapshot');
    await this.onEveryActive((client) => client.snapshotDelete(name), false);
  }


  async snapshotRevert(name: string): Promise<void> {
    this.refuseDuringRebuild('revert to a snapshot');
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

  // ---- replica set changes: add (rebuild), remove, expand -----------------------------------

  /**
   * Adds a new, empty replica and starts rebuilding it from the RW replicas; returns at once
   * (progress is in replicaStatus()). The copy: the snapshots of the current chain, oldest
   * first, each then snapshotted under the same name on the new replica; then the replica joins
   * the write set as WO and the live volume is copied region by region, each region claimed
   * against client writes (rebuild.ts). At the end, with I/O paused: flush, the source's write
   * counter, RW. A full copy, skipping what the source does not hold.
   */
  async addReplica(address: string): Promise<EngineReplicaStatus[]> {
    if (this.closed) throw new ZebuError(ErrorCode.CLOSED, `volume ${this.name}: the engine is closing`);
    if (this.faultedReason !== null) throw this.faultError();
    const { host, port } = parseAddress(address);
    if (this.replicas.some((r) => r.address === address)) throw new ZebuError(ErrorCode.EXISTS, `replica ${address} is already in volume ${this.name}`);
    // A rebuild that was stopped (target failed or removed) ends at its next step: wait for it.
    if (this.rebuilding !== null && this.rebuilding.cancelled !== null) await this.rebuildRun;
    if (this.rebuilding !== null) throw new ZebuError(ErrorCode.BUSY, `volume ${this.name}: replica ${this.rebuilding.target.address} is being rebuilt; one rebuild at a time`);
    if (this.paused) throw new ZebuError(ErrorCode.BUSY, `volume ${this.name} is busy (snapshot or expansion); try again`);
    const client = await ReplicaClient.connect({
      host, port, secret: this.options.secret, epoch: this.epoch,
      requestTimeoutMs: this.options.requestTimeoutMs, connectTimeoutMs: this.options.requestTimeoutMs,
    });
    let info: ReplicaInfo;
    let snapshots: SnapshotInfo[];
    try {
      info = await client.open();
      if (info.revision !== 0 || info.layerCount !== 1 || info.hasBase || info.rebuilding) {
        throw new ZebuError(ErrorCode.EINVAL, `replica ${address} is not empty (revision ${info.revision}, ${info.layerCount} layer(s)): only a new replica can be rebuilt`);
      }
      if (info.sizeBytes < this.sizeBytes) info = await client.expand(this.sizeBytes);
      if (info.sizeBytes !== this.sizeBytes) throw new ZebuError(ErrorCode.EINVAL, `replica ${address} has ${info.sizeBytes} bytes, the volume ${this.sizeBytes}`);
      snapshots = await this.snapshotList();
      // Checked again, with no await until the rebuild is registered: the awaits above let other
      // control requests in (an expansion or a snapshot would leave the new replica behind).
      if (this.rebuilding !== null || this.paused || this.replicas.some((r) => r.address === address) || this.closed || this.faultedReason !== null) {
        throw new ZebuError(ErrorCode.BUSY, `volume ${this.name} changed while replica ${address} was being opened; try again`);
      }
      if (info.sizeBytes !== this.sizeBytes) throw new ZebuError(ErrorCode.BUSY, `volume ${this.name} grew while replica ${address} was being opened; try again`);
    } catch (err) {
      client.close();
      throw err;
    }
    const plan = snapshotCopyPlan(snapshots);
    const target: EngineReplica = {
      address, host, port, local: isLocalHost(host), client, mode: ReplicaMode.WO, reason: 'rebuilding', info, inWriteSet: false,
      rebuild: { copiedBytes: 0, totalBytes: this.sizeBytes * (snapshots.length + 1) },
    };
    // Not in the write set until its snapshots are copied: `joined` says when it is.
    const rebuild = new Rebuild(target, target.rebuild!);
    this.rebuilding = rebuild;
    this.replicas.push(target);
    client.onClose((err) => {
      if (target.client === client) this.setErr(target, err);
    });
    this.log({ event: 'rebuild-started', replica: address, snapshots: snapshots.map((x) => x.name) });
    this.rebuildRun = this.runRebuild(rebuild, target, plan).then(
      () => this.log({ event: 'rebuild-done', replica: address }),
      (err) => {
        const e = toZebuError(err);
        this.log({ event: 'rebuild-failed', replica: address, reason: e.message });
        if (target.mode !== ReplicaMode.ERR) this.setErr(target, new ZebuError(e.code, `rebuild failed: ${e.message}`));
        target.rebuild = null;
      },
    );
    return this.replicaStatus();
  }

  private async runRebuild(rebuild: Rebuild<EngineReplica>, target: EngineReplica, plan: SnapshotCopyPlan): Promise<void> {
    const progress = target.rebuild!;
    const regionBytes = REBUILD_REGION_BYTES;
    const check = (): void => {
      if (target.mode === ReplicaMode.ERR || target.client === null) throw new ZebuError(ErrorCode.EIO, `target failed: ${target.reason}`);
      if (rebuild.cancelled !== null) throw new ZebuError(ErrorCode.CLOSED, rebuild.cancelled);
      if (this.faultedReason !== null) throw this.faultError();
    };
    /** Reads from a RW replica; a failing source is set ERR and the next one tried. */
    const readSource = async (fn: (client: ReplicaClient) => Promise<Buffer>): Promise<Buffer> => {
      for (;;) {
        check();
        const source = this.pickReader(new Set([target]));
        if (source === null) throw this.faultError();
        const client = source.client!;
        try {
          return await fn(client);
        } catch (err) {
          const e = toZebuError(err);
          if (e.code === ErrorCode.EINVAL || e.code === ErrorCode.NOT_FOUND) throw e;
          if (source.client === client) this.setErr(source, e);
        }
      }
    };
    try {
      // 0. From now until the end the copy is incomplete, and says so durably.
      await target.client!.setRebuilding(true);
      // 1. Every snapshot, parents before children: the target's head is moved (revert) onto the
      //    snapshot's parent, the snapshot's view is written over it — zeroing the regions that
      //    hold data below but read as zeros in the snapshot — and snapshotted under its name.
      //    At the end the head goes back onto the live volume's parent snapshot. (A second root —
      //    its parent deleted — is written over the current tip: same data, another parent.)
      const nonZeroOf = new Map<string | null, Set<number>>([[null, new Set()]]);
      let tip: string | null = null;
      for (const { name, parent } of plan.order) {
        if (parent !== null && parent !== tip) {
          await target.client!.snapshotRevert(parent);
          tip = parent;
        }
        const below = nonZeroOf.get(tip)!;
        const nonZero = new Set<number>();
        await this.forEachRegion(regionBytes, async (offset, length) => {
          const data = await readSource((c) => c.readSnapshot(name, offset, length));
          check();
          const region = offset / regionBytes;
          if (!isAllZero(data)) {
            await target.client!.write(offset, data);
            nonZero.add(region);
          } else if (below.has(region)) {
            await target.client!.writeZeroes(offset, length);
          }
          progress.copiedBytes += length;
        });
        check();
        await target.client!.snapshotCreate(name);
        nonZeroOf.set(name, nonZero);
        tip = name;
      }
      if (plan.headParent !== null && plan.headParent !== tip) {
        await target.client!.snapshotRevert(plan.headParent);
        tip = plan.headParent;
      }
      const nonZero = nonZeroOf.get(tip)!;

      // 2. Join the write set (no write in flight while it joins), then copy the live volume.
      await this.pauseAndDrain();
      try {
        check();
        target.inWriteSet = true;
      } finally {
        this.resume();
      }
      await this.forEachRegion(regionBytes, async (offset, length) => {
        const claim = await rebuild.claim(offset, offset + length);
        try {
          check();
          // A region the source holds nothing of is skipped (or zeroed over an older snapshot's
          // data); any other is copied whole: one read and one write, however fragmented.
          const extents = decodeExtents(await readSource((c) => c.request(Op.BLOCK_STATUS, 0, offset, length)));
          if (extents.some((extent) => extent.data)) {
            const data = await readSource((c) => c.read(offset, length));
            check();
            await target.client!.write(offset, data);
          } else if (nonZero.has(offset / regionBytes)) {
            await target.client!.writeZeroes(offset, length);
          }
        } finally {
          rebuild.release(claim);
        }
        progress.copiedBytes += length;
      });

      // 3. Quiesce, make the copy durable with the source's write counter, and serve reads from it.
      await this.pauseAndDrain();
      try {
        check();
        await new Promise<void>((resolve, reject) => this.fanOut(Op.FLUSH, 0, 0, 0, EMPTY, (err) => (err ? reject(err) : resolve())));
        check();
        const sourceInfo = JSON.parse((await readSource((c) => c.request(Op.INFO, 0, 0, 0))).toString('utf8')) as ReplicaInfo;
        await target.client!.setRevision(sourceInfo.revision);
        target.info = await target.client!.setRebuilding(false);
        check();
        target.mode = ReplicaMode.RW;
        target.reason = null;
        target.rebuild = null;
      } finally {
        this.rebuilding = null;
        this.resume();
      }
    } finally {
      if (this.rebuilding === rebuild) this.rebuilding = null;
      rebuild.releaseAll();
    }
  }

  /**
   * Runs `fn` over the volume in regions, REBUILD_COPIERS at a time (a copy is round trips to
   * two replicas: several in flight keep both busy). The first failure stops the others.
   */
  private async forEachRegion(regionBytes: number, fn: (offset: number, length: number) => Promise<void>): Promise<void> {
    let next = 0;
    let failure: unknown = null;
    const worker = async (): Promise<void> => {
      while (failure === null && next < this.sizeBytes) {
        const offset = next;
        next += regionBytes;
        try {
          await fn(offset, Math.min(regionBytes, this.sizeBytes - offset));
        } catch (err) {
          failure ??= err;
        }
      }
    };
    await Promise.all(Array.from({ length: REBUILD_COPIERS }, worker));
    if (failure !== null) throw failure;
  }

  /** Takes a replica out of the volume for good (disconnects it). The last RW replica stays. */
  async removeReplica(address: string): Promise<EngineReplicaStatus[]> {
    const at = this.replicas.findIndex((r) => r.address === address);
    if (at < 0) throw new ZebuError(ErrorCode.NOT_FOUND, `replica ${address} is not in volume ${this.name}`);
    const r = this.replicas[at];
    if (r.mode === ReplicaMode.RW && !this.replicas.some((x) => x !== r && x.mode === ReplicaMode.RW)) {
      throw new ZebuError(ErrorCode.BUSY, `replica ${address} is the last RW replica of volume ${this.name}`);
    }
    if (this.rebuilding?.target === r) this.rebuilding.cancelled = `replica ${address} was removed`;
    // ERR first: requests in flight to it no longer count, and its client closes.
    this.setErr(r, new ZebuError(ErrorCode.CLOSED, 'removed from the volume'));
    this.replicas.splice(this.replicas.indexOf(r), 1);
    this.log({ event: 'replica-removed', replica: address });
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
    if (this.faultedReason !== null) throw this.faultError();
    await this.pauseAndDrain();
    try {
      await this.onEveryActive((client) => client.expand(sizeBytes), true);
      this.sizeBytes = sizeBytes;
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
    if (this.pingTimer !== null) clearInterval(this.pingTimer);
    if (this.faultedReason === null) await this.flush().catch(() => {});
    for (const r of this.replicas) {
      const client = r.client;
      r.client = null;
      client?.close();
    }
  }
}

interface SnapshotCopyPlan {
  /** Every snapshot by name with its parent snapshot's name (null: none), parents first. */
  order: { name: string; parent: string | null }[];
  /** The snapshot the live volume sits on (the newest of its chain), or null. */
  headParent: string | null;
}

/** The order in which a rebuild recreates a snapshot tree: depth first, oldest child first. */
export function snapshotCopyPlan(snapshots: SnapshotInfo[]): SnapshotCopyPlan {
  const byId = new Map(snapshots.map((x) => [x.id, x]));
  const parentOf = (x: SnapshotInfo): string | null => (x.parent !== null ? byId.get(x.parent)?.name ?? null : null);
  const children = new Map<string | null, SnapshotInfo[]>();
  for (const x of snapshots) {
    const p = parentOf(x);
    if (!children.has(p)) children.set(p, []);
    children.get(p)!.push(x);
  }
  for (const list of children.values()) list.sort((a, b) => a.createdAt.localeCompare(b.createdAt) || a.id.localeCompare(b.id));
  const order: SnapshotCopyPlan['order'] = [];
  const visit = (parent: string | null): void => {
    for (const x of children.get(parent) ?? []) {
      order.push({ name: x.name, parent });
      visit(x.name);
    }
  };
  visit(null);
  assert(order.length === snapshots.length, 'every snapshot is reached from a root');
  // The head's parent is the in-chain snapshot none of whose children is in the chain.
  const inChain = snapshots.filter((x) => x.inChain);
  const headParent = inChain.find((x) => !inChain.some((y) => parentOf(y) === x.name))?.name ?? null;
  return { order, headParent };
}

function isAllZero(data: Buffer): boolean {
  for (let at = 0; at < data.length; at += 8) {
    if (at + 8 <= data.length ? data.readBigUInt64LE(at) !== 0n : data.subarray(at).some((b) => b !== 0)) return false;
  }
  return true;
}
