/**
 * Pipelined client of the data protocol (DataServer's peer): the engine's link to each replica,
 * and the frontend's link to its engine. Any number of requests in flight on one connection,
 * matched by id, each failed with TIMEOUT when its deadline passes. The connection authenticates
 * before the first request. Every request carries `epoch`.
 */
import { ZebuError, ErrorCode, errorFromWire, assert } from '../errors.ts';
import { SocketReceiver } from './socket-receiver.ts';
import { ioBuffers, POOLED_MIN_BYTES } from './buffer-pool.ts';
import { TickBatcher } from './tick-batcher.ts';
import { netTransport, type StreamSocket, type Transport } from './transport.ts';
import { AnswerDeadline, STALL_MS, systemClock, type Clock, type ClockTimer } from '../os/clock.ts';
import { answerHello, checkResult, HELLO_BYTES, RESULT_BYTES } from './auth.ts';
import {
  Op,
  OpName,
  RequestFlag,
  REQUEST_HEADER_BYTES,
  RESPONSE_HEADER_BYTES,
  RESPONSE_MAGIC,
  MAX_IO_BYTES,
  encodeRequestHeader,
  encodeFlushConfirmed,
  LEASE_ID_BYTES,
  writeU64,
  decodeExtents,
  type WireExtent,
} from './frames.ts';
import type { ReplicaInfo, SnapshotInfo } from '../replica/replica.ts';
import type { RebuildKind } from '../replica/meta.ts';
import type { IntentSummary } from './backend.ts';
import type { FaultRule } from '../replica/faulty-disk.ts';

export interface DataClientOptions {
  host?: string;
  port?: number;
  /** UNIX socket path instead of host/port. */
  path?: string;
  secret: Buffer;
  epoch?: number;
  /** Per-request deadline. */
  requestTimeoutMs?: number;
  connectTimeoutMs?: number;
  /** What the peer is, for error messages ("replica", "engine"). */
  peerLabel?: string;
  /** Defaults: the real network and the system clock (the simulator passes its own). */
  transport?: Transport;
  clock?: Clock;
}

export type ResponseCallback = (err: ZebuError | null, payload: Buffer) => void;

interface Pending {
  callback: ResponseCallback;
  deadlineMs: number;
  op: number;
}

const EMPTY = Buffer.alloc(0);
const MAX_RESPONSE_BYTES = MAX_IO_BYTES + 1024 * 1024;

export class DataClient {
  /** Sent with every request; the replica fences lower ones. */
  epoch: number;
  readonly address: string;
  private readonly socket: StreamSocket;
  private readonly clock: Clock;
  private readonly out: TickBatcher;
  private readonly receiver: SocketReceiver;
  private readonly pending = new Map<number, Pending>();
  private readonly requestTimeoutMs: number;
  private readonly sweepTimer: ClockTimer;
  private readonly sweepMs: number;
  private lastSweepMs: number;
  private nextId = 1;
  private closedError: ZebuError | null = null;
  private responseHeader: { requestId: number; status: number; length: number } | null = null;
  private closeListeners: ((err: ZebuError) => void)[] = [];

  private constructor(socket: StreamSocket, receiver: SocketReceiver, options: DataClientOptions, address: string) {
    this.socket = socket;
    this.clock = options.clock ?? systemClock;
    this.receiver = receiver;
    this.out = new TickBatcher(socket);
    this.address = address;
    this.epoch = options.epoch ?? 0;
    this.requestTimeoutMs = options.requestTimeoutMs ?? 8000;
    receiver.onStaged = () => this.parse();
    socket.on('error', (err) => this.shutDown(new ZebuError(ErrorCode.DISCONNECTED, `${address}: ${err.message}`)));
    socket.on('close', () => this.shutDown(new ZebuError(ErrorCode.DISCONNECTED, `${address}: connection closed`)));
    this.sweepMs = Math.max(10, Math.min(1000, Math.floor(this.requestTimeoutMs / 4)));
    this.lastSweepMs = this.clock.nowMs();
    this.sweepTimer = this.clock.setInterval(() => this.sweep(), this.sweepMs).unref();
  }

  /** Connects and authenticates. */
  static connect(options: DataClientOptions): Promise<DataClient> {
    const address = `${options.peerLabel ?? 'replica'} ${options.path ?? `${options.host ?? '127.0.0.1'}:${options.port}`}`;
    const connectTimeoutMs = options.connectTimeoutMs ?? 5000;
    return new Promise((resolve, reject) => {
      const receiver = new SocketReceiver();
      const clock = options.clock ?? systemClock;
      const socket = (options.transport ?? netTransport).connect({ path: options.path, host: options.host, port: options.port }, receiver.onread);
      const reader = receiver.reader;
      let expectedProof: Buffer | null = null;
      let settled = false;
      const fail = (err: ZebuError): void => {
        if (settled) return;
        settled = true;
        deadline.cancel();
        socket.destroy();
        reject(err);
      };
      const deadline = new AnswerDeadline(clock, connectTimeoutMs, () => fail(new ZebuError(ErrorCode.TIMEOUT, `${address}: handshake timed out after ${connectTimeoutMs} ms`)));
      socket.on('error', (err) => fail(new ZebuError(ErrorCode.DISCONNECTED, `${address}: ${err.message}`, { cause: err })));
      socket.on('close', () => fail(new ZebuError(ErrorCode.DISCONNECTED, `${address}: connection closed during handshake`)));
      receiver.onStaged = (): void => {
        if (settled) return;
        try {
          if (expectedProof === null) {
            const hello = reader.take(HELLO_BYTES);
            if (hello === null) return;
            const answer = answerHello(options.secret, hello);
            expectedProof = answer.expectedServerProof;
            socket.write(answer.auth);
          }
          const result = reader.take(RESULT_BYTES);
          if (result === null) return;
          checkResult(result, expectedProof);
        } catch (err) {
          return fail(err as ZebuError);
        }
        settled = true;
        deadline.cancel();
        socket.removeAllListeners('error');
        socket.removeAllListeners('close');
        const client = new DataClient(socket, receiver, options, address);
        // Responses cannot come before requests; anything staged already is a peer's error.
        if (reader.available > 0) client.parse();
        resolve(client);
      };
    });
  }

  get inflight(): number {
    return this.pending.size;
  }

  get closed(): boolean {
    return this.closedError !== null;
  }

  /** Called once when the connection ends, with the reason. */
  onClose(listener: (err: ZebuError) => void): void {
    if (this.closedError !== null) listener(this.closedError);
    else this.closeListeners.push(listener);
  }

  /**
   * Sends one request; `callback` runs exactly once. The hot path: no promise. `prefix`, when
   * given, is sent before `payload` as part of it (no copy of the payload to join them).
   * `payloadDone`, when given, runs once this connection holds no reference to `payload` any
   * more: its bytes are in the kernel, or the socket was destroyed with them unsent, or (closed
   * already) they were never taken. Usually that is before `callback` (a peer answers after
   * reading the whole payload), but a request that timed out may still sit in a stalled
   * socket's queue: a payload reused afterwards waits for both.
   */
  send(op: number, flags: number, offset: number, length: number, payload: Buffer, callback: ResponseCallback, prefix: Buffer | null = null, payloadDone: (() => void) | null = null): void {
    if (this.closedError !== null) {
      const err = this.closedError;
      process.nextTick(() => callback(err, EMPTY));
      payloadDone?.();
      return;
    }
    const requestId = this.nextId;
    this.nextId = this.nextId === 0xffffffff ? 1 : this.nextId + 1;
    assert(!this.pending.has(requestId), 'request id in use');
    this.pending.set(requestId, { callback, deadlineMs: this.clock.nowMs() + this.requestTimeoutMs, op });
    const header = Buffer.allocUnsafe(REQUEST_HEADER_BYTES);
    encodeRequestHeader(header, { op, flags, requestId, epoch: this.epoch, offset, length, payloadLength: payload.length + (prefix?.length ?? 0) });
    this.out.write(header);
    if (prefix !== null) this.out.write(prefix);
    if (payload.length > 0) this.out.write(payload, payloadDone ?? undefined);
    else payloadDone?.();
  }

  request(op: number, flags: number, offset: number, length: number, payload: Buffer = EMPTY): Promise<Buffer> {
    return new Promise((resolve, reject) => {
      this.send(op, flags, offset, length, payload, (err, data) => (err ? reject(err) : resolve(data)));
    });
  }

  read(offset: number, length: number): Promise<Buffer> {
    return this.request(Op.READ, 0, offset, length);
  }
  /** Where `snapshot` (null: the live volume) may differ from `base`, or with `aboveImage` from the backing image. */
  async snapshotChanges(snapshot: string | null, base: string | null, offset: number, length: number, aboveImage = false): Promise<WireExtent[]> {
    const spec = aboveImage ? { snapshot, base, aboveImage } : { snapshot, base };
    return decodeExtents(await this.request(Op.SNAPSHOT_CHANGES, 0, offset, length, Buffer.from(JSON.stringify(spec))));
  }

  readSnapshot(name: string, offset: number, length: number): Promise<Buffer> {
    return this.request(Op.READ, 0, offset, length, Buffer.from(name));
  }
  async write(offset: number, data: Buffer, options: { fua?: boolean } = {}): Promise<void> {
    await this.request(Op.WRITE, options.fua ? RequestFlag.FUA : 0, offset, data.length, data);
  }
  /** A rebuild's copy write to its target under lease `leaseId` (data null: the range reads as zeros). */
  async copyWrite(leaseId: number, offset: number, data: Buffer | null, length: number): Promise<void> {
    const lease = Buffer.allocUnsafe(LEASE_ID_BYTES);
    writeU64(lease, leaseId, 0);
    await new Promise<void>((resolve, reject) => {
      this.send(data === null ? Op.COPY_ZERO : Op.COPY_WRITE, 0, offset, length, data ?? EMPTY, (err) => (err ? reject(err) : resolve()), lease);
    });
  }
  async leaseRevoke(leaseId: number): Promise<void> {
    await this.request(Op.LEASE_REVOKE, 0, leaseId, 0);
  }
  async trim(offset: number, length: number): Promise<void> {
    await this.request(Op.TRIM, 0, offset, length);
  }
  async writeZeroes(offset: number, length: number): Promise<void> {
    await this.request(Op.WRITE_ZEROES, 0, offset, length);
  }
  /**
   * `seq`: the engine's flush number (0: unnumbered); `confirmed`: every FLUSH numbered <= it
   * has completed on every replica (the replica's write-intent log lets regions go on it).
   */
  async flush(seq = 0, confirmed = 0): Promise<void> {
    await this.request(Op.FLUSH, 0, seq, 0, confirmed === 0 ? EMPTY : encodeFlushConfirmed(confirmed));
  }
  async blockStatus(offset: number, length: number): Promise<WireExtent[]> {
    return decodeExtents(await this.request(Op.BLOCK_STATUS, 0, offset, length));
  }
  async ping(): Promise<void> {
    await this.request(Op.PING, 0, 0, 0);
  }
  async info(): Promise<ReplicaInfo> {
    return JSON.parse((await this.request(Op.INFO, 0, 0, 0)).toString('utf8'));
  }
  /** Opens the replica for this client's epoch (persisted by the replica; lower epochs are then fenced). */
  async open(): Promise<ReplicaInfo> {
    return JSON.parse((await this.request(Op.OPEN, 0, 0, 0)).toString('utf8'));
  }
  async snapshotCreate(name: string): Promise<SnapshotInfo> {
    return JSON.parse((await this.request(Op.SNAPSHOT_CREATE, 0, 0, 0, Buffer.from(name))).toString('utf8'));
  }
  async snapshotList(): Promise<SnapshotInfo[]> {
    return JSON.parse((await this.request(Op.SNAPSHOT_LIST, 0, 0, 0)).toString('utf8'));
  }
  async snapshotDelete(name: string): Promise<void> {
    await this.request(Op.SNAPSHOT_DELETE, 0, 0, 0, Buffer.from(name));
  }
  async snapshotRevert(name: string): Promise<void> {
    await this.request(Op.SNAPSHOT_REVERT, 0, 0, 0, Buffer.from(name));
  }
  /** Grows the replica (online volume expansion); never shrinks. */
  async expand(sizeBytes: number): Promise<ReplicaInfo> {
    return JSON.parse((await this.request(Op.EXPAND, 0, sizeBytes, 0)).toString('utf8'));
  }
  /** The end of a rebuild: the copy takes the source's write counter, durably. */
  async setRevision(revision: number): Promise<ReplicaInfo> {
    return JSON.parse((await this.request(Op.SET_REVISION, 0, revision, 0)).toString('utf8'));
  }
  /** Marks (or clears) the replica as being rebuilt, durably. */
  /** Marks (or, with null, clears) the replica as the target of a full or delta rebuild. */
  async setRebuilding(kind: RebuildKind | null): Promise<ReplicaInfo> {
    return JSON.parse((await this.request(Op.SET_REBUILDING, 0, kind === null ? 0 : kind === 'full' ? 1 : 2, 0)).toString('utf8'));
  }
  async intentGet(): Promise<IntentSummary> {
    return JSON.parse((await this.request(Op.INTENT_GET, 0, 0, 0)).toString('utf8'));
  }
  /** Starts (or extends) the missed-write map of replica `key`; resolves once it is durable. */
  async missedStart(key: string): Promise<void> {
    await this.request(Op.MISSED_START, 0, 0, 0, Buffer.from(key));
  }
  /** The regions written since MISSED_START(key); NOT_FOUND when there is no such map. */
  async missedGet(key: string): Promise<number[]> {
    return (await this.missedMap(key)).regions;
  }
  /** The regions of key's map, and those a rebuild copied in part (an older replica: none). */
  async missedMap(key: string): Promise<{ regions: number[]; partial: [number, number][] }> {
    const map = JSON.parse((await this.request(Op.MISSED_GET, 0, 0, 0, Buffer.from(key))).toString('utf8')) as { regions: number[]; partial?: [number, number][] };
    return { regions: map.regions, partial: map.partial ?? [] };
  }
  /** Adds regions to key's missed-write map, or (invalid) marks it invalid. */
  async missedMerge(key: string, regions: number[], invalid = false): Promise<void> {
    await this.request(Op.MISSED_MERGE, 0, 0, 0, Buffer.from(JSON.stringify({ key, regions, invalid })));
  }
  /**
   * COPY_FROM: the target (this replica) reads [offset, offset+length) from the source replica at
   * `source` (named `name`, when known) and writes it under lease `leaseId`; with `zeros`, a
   * chunk of zeros is marked zero; with `snapshot`, the source's snapshot of that name is read
   * instead of its live volume. SOURCE_FAILED when the source could not be read.
   */
  async copyFrom(leaseId: number, source: string, name: string | null, offset: number, length: number, zeros: boolean, snapshot: string | null = null): Promise<void> {
    const spec = Buffer.from(JSON.stringify(snapshot === null ? { source, name, zeros } : { source, name, zeros, snapshot }));
    const payload = Buffer.allocUnsafe(LEASE_ID_BYTES + spec.length);
    writeU64(payload, leaseId, 0);
    spec.copy(payload, LEASE_ID_BYTES);
    await this.request(Op.COPY_FROM, 0, offset, length, payload);
  }
  /**
   * A rebuild copied these regions to replica `key`, and the first bytes of those in `progress`
   * ([region, bytes from its start]): see Op.MISSED_CLEAR.
   */
  async missedClear(key: string, regions: number[], progress: [number, number][] = []): Promise<void> {
    await this.request(Op.MISSED_CLEAR, 0, 0, 0, Buffer.from(JSON.stringify(progress.length > 0 ? { key, regions, progress } : { key, regions })));
  }
  async missedDrop(key: string): Promise<void> {
    await this.request(Op.MISSED_DROP, 0, 0, 0, Buffer.from(key));
  }
  /** Drops every missed-write map whose key is not in `keep`. */
  async missedPrune(keep: string[]): Promise<void> {
    await this.request(Op.MISSED_PRUNE, 0, 0, 0, Buffer.from(JSON.stringify(keep)));
  }
  /** These regions are the same and durable everywhere: they leave the write-intent log (INTENT_RELEASE). */
  async intentRelease(regions: number[]): Promise<void> {
    await this.request(Op.INTENT_RELEASE, 0, 0, 0, Buffer.from(JSON.stringify(regions)));
  }
  /** SHA-256 of the live volume's (or snapshot `snapshot`'s) bytes in the range (at most MAX_IO_BYTES). */
  async regionHash(offset: number, length: number, snapshot: string | null = null): Promise<Buffer> {
    return this.request(Op.REGION_HASH, 0, offset, length, snapshot === null ? undefined : Buffer.from(snapshot));
  }
  /**
   * Tests only, replica started with `--disk-mode power-loss`: loses a seeded part of the
   * unsynced writes and kills the replica process (exit 137); the request never gets a reply.
   */
  powerFail(seed: number, mode: 'drop' | 'tear'): void {
    this.send(Op.FAULT_INJECT, 0, 0, 0, Buffer.from(JSON.stringify({ powerLoss: { seed, mode } })), () => {});
  }
  /** Tests only: the replica must run with fault injection enabled. */
  async injectFaults(spec: { clear?: boolean; rules?: FaultRule[] }): Promise<void> {
    await this.request(Op.FAULT_INJECT, 0, 0, 0, Buffer.from(JSON.stringify(spec)));
  }

  close(): void {
    this.shutDown(new ZebuError(ErrorCode.CLOSED, `${this.address}: client closed`));
  }

  private parse(): void {
    const reader = this.receiver.reader;
    while (this.closedError === null && !this.receiver.receiving) {
      if (this.responseHeader === null) {
        const raw = reader.take(RESPONSE_HEADER_BYTES);
        if (raw === null) return;
        const length = raw.readUInt32BE(12);
        if (raw.readUInt32BE(0) !== RESPONSE_MAGIC || length > MAX_RESPONSE_BYTES) {
          this.shutDown(new ZebuError(ErrorCode.PROTOCOL, `${this.address}: malformed response`));
          return;
        }
        this.responseHeader = { requestId: raw.readUInt32BE(4), status: raw.readUInt32BE(8), length };
      }
      const { requestId, status, length } = this.responseHeader;
      if (length >= POOLED_MIN_BYTES) {
        // A large payload (READ data) goes into a pooled buffer (the receiver of a READ may
        // give it back): the socket reads what is not staged yet straight into it.
        this.responseHeader = null;
        const payload = ioBuffers.acquire(length);
        this.receiver.receiveInto(payload, 0, length, () => this.deliver(requestId, status, payload));
        continue;
      }
      const payload = reader.take(length);
      if (payload === null) return;
      this.responseHeader = null;
      this.deliver(requestId, status, payload);
    }
  }

  private deliver(requestId: number, status: number, payload: Buffer): void {
    if (this.closedError !== null) return;
    const entry = this.pending.get(requestId);
    if (entry === undefined) {
      // Already timed out, or a connection-level error (request id 0) before close.
      if (status !== 0 && requestId === 0) this.shutDown(new ZebuError(errorFromWire(status), `${this.address}: ${payload.toString('utf8')}`));
      return;
    }
    this.pending.delete(requestId);
    if (status === 0) entry.callback(null, payload);
    else entry.callback(new ZebuError(errorFromWire(status), `${this.address}: ${OpName[entry.op] ?? entry.op}: ${payload.toString('utf8')}`), EMPTY);
  }

  private sweep(): void {
    const now = this.clock.nowMs();
    // A sweep far later than its interval means this process did not run (stopped, swapped out,
    // a long pause): replies may be waiting unread in the socket. That time is not the peer's
    // fault, so the deadlines move on by it and the replies get read before the next sweep.
    const stalledMs = now - this.lastSweepMs - this.sweepMs;
    this.lastSweepMs = now;
    if (stalledMs > STALL_MS) {
      for (const entry of this.pending.values()) entry.deadlineMs += stalledMs;
      return;
    }
    // Deadlines are added in increasing order, so the expired ones come first.
    for (const [requestId, entry] of this.pending) {
      if (entry.deadlineMs > now) break;
      this.pending.delete(requestId);
      entry.callback(new ZebuError(ErrorCode.TIMEOUT, `${this.address}: ${OpName[entry.op] ?? entry.op} timed out after ${this.requestTimeoutMs} ms`), EMPTY);
    }
  }

  private shutDown(err: ZebuError): void {
    if (this.closedError !== null) return;
    this.closedError = err;
    this.clock.clear(this.sweepTimer);
    this.socket.destroy();
    const pending = [...this.pending.values()];
    this.pending.clear();
    for (const entry of pending) entry.callback(err, EMPTY);
    for (const listener of this.closeListeners) listener(err);
    this.closeListeners = [];
  }
}
