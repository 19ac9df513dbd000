/**
 * Serves a block backend (a Replica, or an Engine for its frontend) over the data protocol
 * (src/protocol/frames.ts). Each connection must
 * authenticate first; then requests run concurrently (the replica orders overlapping ones) and
 * replies go out as they finish. Bad input gets an error reply; input the framing cannot recover
 * from (bad magic, oversized payload) gets an error reply and that one connection is closed.
 */
import net from 'node:net';
import { randomBytes } from 'node:crypto';
import { ZebuError, ErrorCode, AssertionFailure, errorToWire, toZebuError, invalid, assert } from '../errors.ts';
import type { FrameReader } from './frame-reader.ts';
import { ioBuffers, POOLED_MIN_BYTES } from './buffer-pool.ts';
import { SocketReceiver, connectionReader } from './socket-receiver.ts';
import { adoptAccepted } from './accepted-socket.ts';
import { TickBatcher } from './tick-batcher.ts';
import { listenOnUnixSocket } from './unix-socket.ts';
import type { StreamSocket, Transport } from './transport.ts';
import { CopySources, parseSourceAddress } from './copy-sources.ts';
import { systemClock, type Clock, type ClockTimer } from '../os/clock.ts';
import {
  Op,
  OpName,
  RequestFlag,
  REQUEST_MAGIC,
  REQUEST_HEADER_BYTES,
  RESPONSE_HEADER_BYTES,
  MAX_IO_BYTES,
  MAX_RANGE_BYTES,
  decodeRequestHeader,
  encodeResponseHeader,
  encodeExtents,
  maxPayloadFor,
  readU64,
  FLUSH_CONFIRMED_BYTES,
  LEASE_ID_BYTES,
  MISSED_KEY,
  READ_REPORT_BYTES,
  type RequestHeader,
} from './frames.ts';
import { encodeHello, checkAuth, newNonce, AUTH_BYTES } from './auth.ts';
import type { FaultyDisk, FaultRule } from '../replica/faulty-disk.ts';
import type { BlockBackend } from './backend.ts';
import type { PowerLossMode } from '../replica/power-loss-disk.ts';

export interface DataServerOptions {
  secret: Buffer;
  /** When set, FAULT_INJECT requests add rules to this disk (tests only). */
  faultDisk?: FaultyDisk;
  /**
   * When set, FAULT_INJECT {"powerLoss": {seed, mode}} calls it (tests only): it simulates a
   * power failure and ends the process, so it does not return.
   */
  powerLoss?: (seed: number, mode: PowerLossMode) => void;
  /**
   * Added to every INFO and OPEN reply: who serves (a replica's name, so that an engine can tell
   * a stale address from the replica it wants; an engine's process, so that its frontend can
   * kill it when it hangs).
   */
  identity?: Record<string, unknown>;
  handshakeTimeoutMs?: number;
  maxInflightPerConnection?: number;
  log?: (event: Record<string, unknown>) => void;
  /**
   * The backend holds no reference to a WRITE's (or COPY_WRITE's) payload once the write has answered (a Replica:
   * its disk writes are done, and a disk that keeps unsynced data keeps a copy), so a large
   * payload's buffer is reused for the next one instead of being left to the garbage collector.
   * Not for an engine: a replica connection may still hold the payload after the answer (one
   * that timed out with it queued); an engine uses lendsWritePayloads.
   */
  reusesWritePayloads?: boolean;
  /**
   * Large WRITE payloads are received into ioBuffers buffers and lent to the backend's writeLent,
   * which gives each back once nothing holds it (an engine: after the answer and after every
   * replica connection let go of it).
   */
  lendsWritePayloads?: boolean;
  /** Default: the system clock (the simulator passes its own). */
  clock?: Clock;
  /** How a rebuild target reaches its source replicas (COPY_FROM); default: the real network. */
  transport?: Transport;
}

const EMPTY = Buffer.alloc(0);
/** Regions one INTENT_RELEASE names at most (a start-up releases a few at a time). */
const MAX_RELEASE_REGIONS = 4096;
/** A READ_VIEW is answered after this long at most, changed or not. */
const MAX_VIEW_HOLD_MS = 60_000;

export class DataServer {
  private readonly backend: BlockBackend;
  private readonly options: Required<Omit<DataServerOptions, 'faultDisk' | 'powerLoss' | 'identity' | 'transport'>> & Pick<DataServerOptions, 'faultDisk' | 'powerLoss' | 'identity' | 'transport'>;
  /** Connections to the replicas this one pulls rebuild copies from (made on first COPY_FROM). */
  private sources: CopySources | null = null;
  private readonly server: net.Server;
  private readonly connections = new Set<Connection>();
  private inflight = 0;
  private idleWaiters: (() => void)[] = [];
  /**
   * This server process's instance, in every INFO and OPEN reply: a frontend reading a replica
   * directly checks it is the process its engine holds open, not one restarted at its address.
   */
  readonly instance = randomBytes(8).toString('hex');

  constructor(backend: BlockBackend, options: DataServerOptions) {
    this.backend = backend;
    this.options = {
      handshakeTimeoutMs: 5000,
      maxInflightPerConnection: 256,
      log: () => {},
      clock: systemClock,
      reusesWritePayloads: false,
      lendsWritePayloads: false,
      ...options,
    };
    // Paused on connect: the handle moves to a socket that reads through a SocketReceiver
    // (accepted-socket.ts) before a byte is read.
    this.server = net.createServer({ noDelay: true, pauseOnConnect: true }, (socket) => {
      const receiver = new SocketReceiver();
      const adopted = adoptAccepted(socket, receiver.onread);
      if (adopted === null) {
        this.accept(socket);
        socket.resume();
      } else {
        this.accept(adopted, receiver);
      }
    });
    this.server.on('error', (err) => this.options.log({ event: 'server-error', error: err.message }));
  }

  /**
   * An engine OPENed `by` at `epoch`: every other connection OPENed at the same epoch is closed,
   * and what still arrives on it is never served. An engine opens one connection per replica; an
   * older one is one it gave up (a request timed out, the replica was put out) whose writes may
   * still be on the way — served after the replica was brought back through the new connection,
   * they would put old data over new. (Requests of an older epoch are refused one by one: FENCED
   * tells that engine it was superseded.)
   */
  supersedeOpened(by: Connection, epoch: number): void {
    for (const conn of this.connections) {
      if (conn !== by && conn.openedEpoch === epoch) conn.supersede(epoch);
    }
  }

  /**
   * Serves one connected socket (the listener's, or one the simulator hands over); `receiver`:
   * the socket reads through it (else through 'data' events).
   */
  accept(socket: StreamSocket, receiver: SocketReceiver | null = null): void {
    const conn = new Connection(this, socket, receiver);
    this.connections.add(conn);
    socket.once('close', () => this.connections.delete(conn));
  }

  listen(host: string, port: number): Promise<net.AddressInfo> {
    return new Promise((resolve, reject) => {
      this.server.once('error', reject);
      this.server.listen({ host, port }, () => {
        this.server.off('error', reject);
        resolve(this.server.address() as net.AddressInfo);
      });
    });
  }

  /** Listens on a UNIX socket (an existing stale socket file is replaced). */
  listenPath(socketPath: string): Promise<void> {
    return listenOnUnixSocket(this.server, socketPath);
  }

  /** Stops accepting, waits (bounded) for in-flight requests, closes connections. */
  async close(drainTimeoutMs = 10_000): Promise<void> {
    this.server.close();
    if (this.inflight > 0) {
      await new Promise<void>((resolve) => {
        const timer = this.options.clock.setTimeout(resolve, drainTimeoutMs);
        this.idleWaiters.push(() => {
          this.options.clock.clear(timer);
          resolve();
        });
      });
    }
    for (const conn of this.connections) conn.socket.destroy();
    this.sources?.close();
  }

  get copySources(): CopySources {
    this.sources ??= new CopySources({ secret: this.options.secret, transport: this.options.transport, clock: this.options.clock });
    return this.sources;
  }

  get backendRef(): BlockBackend {
    return this.backend;
  }
  get opts(): DataServer['options'] {
    return this.options;
  }

  requestStarted(): void {
    this.inflight++;
  }
  requestFinished(): void {
    this.inflight--;
    if (this.inflight === 0) {
      const waiters = this.idleWaiters;
      this.idleWaiters = [];
      for (const w of waiters) w();
    }
  }
}

class Connection {
  readonly socket: StreamSocket;
  /** The epoch this connection was OPENed at by an engine (null: never opened). */
  openedEpoch: number | null = null;
  private readonly out: TickBatcher;
  private readonly owner: DataServer;
  private readonly reader: FrameReader;
  /** Reads into buffers it chooses (null: the socket's 'data' events are pushed to `reader`). */
  private readonly receiver: SocketReceiver | null;
  /** A large payload is being read straight into its buffer. */
  private receiving = false;
  private readonly serverNonce = newNonce();
  private authenticated = false;
  private header: RequestHeader | null = null;
  /** Bytes of an unwanted payload (unknown op) still to discard. */
  private discard = 0;
  private inflight = 0;
  private paused = false;
  private closing = false;
  private readonly handshakeTimer: ClockTimer;
  /** The READ_VIEW this connection waits on (at most one), and how to stop waiting. */
  private viewWatch: { requestId: number; cancel: () => void } | null = null;

  constructor(owner: DataServer, socket: StreamSocket, receiver: SocketReceiver | null) {
    this.owner = owner;
    this.socket = socket;
    this.receiver = receiver;
    this.out = new TickBatcher(socket);
    this.reader = connectionReader(socket, receiver, () => this.onData());
    socket.on('error', () => {});
    socket.on('close', () => {
      this.closing = true;
      owner.opts.clock.clear(this.handshakeTimer);
      this.viewWatch?.cancel();
      this.viewWatch = null;
    });
    this.handshakeTimer = owner.opts.clock.setTimeout(() => {
      if (!this.authenticated) {
        this.log({ event: 'handshake-timeout' });
        socket.destroy();
      }
    }, owner.opts.handshakeTimeoutMs);
    socket.write(encodeHello(this.serverNonce));
  }

  private log(event: Record<string, unknown>): void {
    this.owner.opts.log({ ...event, peer: `${this.socket.remoteAddress}:${this.socket.remotePort}` });
  }

  /** A newer OPEN (see DataServer.supersedeOpened): nothing more is read from this connection. */
  supersede(byEpoch: number): void {
    if (this.closing) return;
    this.log({ event: 'connection-superseded', openedEpoch: this.openedEpoch, byEpoch });
    this.closing = true;
    this.socket.destroy();
  }

  /** Bytes were added to `reader`. */
  private onData(): void {
    if (this.closing) return;
    if (!this.authenticated) {
      const auth = this.reader.take(AUTH_BYTES);
      if (auth === null) return;
      const { ok, result } = checkAuth(this.owner.opts.secret, this.serverNonce, auth);
      this.socket.write(result);
      if (!ok) {
        this.log({ event: 'auth-failed' });
        this.closing = true;
        this.socket.end(() => this.socket.destroy());
        return;
      }
      this.owner.opts.clock.clear(this.handshakeTimer);
      this.authenticated = true;
    }
    this.parse();
  }

  private parse(): void {
    while (!this.closing && !this.paused && !this.receiving) {
      if (this.discard > 0) {
        this.discard -= this.reader.skip(this.discard);
        if (this.discard > 0) return;
      }
      if (this.header === null) {
        const raw = this.reader.take(REQUEST_HEADER_BYTES);
        if (raw === null) return;
        if (raw.readUInt32BE(0) !== REQUEST_MAGIC) return this.fatal(0, 'bad request magic');
        this.header = decodeRequestHeader(raw);
        if (this.header.payloadLength > maxPayloadFor(this.header.op)) {
          return this.fatal(this.header.requestId, `payload of ${this.header.payloadLength} bytes exceeds the limit for this op`);
        }
      }
      const header = this.header;
      if (this.receiver !== null && header.payloadLength >= POOLED_MIN_BYTES && this.reader.available < header.payloadLength) {
        this.receivePayload(this.receiver, header);
        continue;
      }
      const payload = this.reader.take(header.payloadLength);
      if (payload === null) return;
      this.header = null;
      this.dispatch(header, payload);
    }
  }

  /** A large payload not all here yet: the kernel reads the rest straight into its own buffer. */
  private receivePayload(receiver: SocketReceiver, header: RequestHeader): void {
    const pooled = (header.op === Op.WRITE && (this.owner.opts.reusesWritePayloads || this.owner.opts.lendsWritePayloads))
      || (header.op === Op.COPY_WRITE && this.owner.opts.reusesWritePayloads);
    const payload = pooled ? ioBuffers.acquire(header.payloadLength) : Buffer.allocUnsafeSlow(header.payloadLength);
    this.receiving = true;
    receiver.receiveInto(payload, 0, payload.length, () => {
      this.receiving = false;
      this.header = null;
      if (this.closing) return;
      this.dispatch(header, payload);
      this.parse();
    });
  }

  /** The stream cannot be trusted any more: say why, then close this connection only. */
  private fatal(requestId: number, message: string): void {
    this.log({ event: 'protocol-error', message });
    this.reply(requestId, new ZebuError(ErrorCode.PROTOCOL, message), EMPTY);
    this.closing = true;
    // Flush the error reply, then release the socket even if the peer never closes its side.
    this.socket.end(() => this.socket.destroy());
  }

  private dispatch(h: RequestHeader, payload: Buffer): void {
    if (h.op === Op.READ_VIEW) return this.watchView(h);
    this.inflight++;
    this.owner.requestStarted();
    if (this.inflight >= this.owner.opts.maxInflightPerConnection && !this.paused) {
      this.paused = true;
      this.socket.pause();
    }
    this.execute(h, payload).then(
      (result) => this.finish(h, null, result, payload),
      (err) => this.finish(h, err, EMPTY, payload),
    );
  }

  /**
   * READ_VIEW: waits outside the in-flight count (it holds no work: a drain does not wait for it),
   * one per connection (an earlier one is answered BUSY). The answer is written the moment the
   * backend gives it, so it precedes every reply the backend completes after the change.
   */
  private watchView(h: RequestHeader): void {
    const backend = this.owner.backendRef;
    if (backend.watchReadView === undefined) return this.reply(h.requestId, unsupported(h.op), EMPTY);
    const earlier = this.viewWatch;
    if (earlier !== null) {
      this.viewWatch = null;
      earlier.cancel();
      this.reply(earlier.requestId, new ZebuError(ErrorCode.BUSY, 'READ_VIEW superseded by a newer one on this connection'), EMPTY);
    }
    const holdMs = Math.min(h.length, MAX_VIEW_HOLD_MS);
    const watch = { requestId: h.requestId, cancel: () => {} };
    let answered = false;
    const cancel = backend.watchReadView(h.offset, holdMs, (view) => {
      assert(!answered, 'a READ_VIEW was answered twice');
      answered = true;
      if (this.viewWatch === watch) this.viewWatch = null;
      this.reply(h.requestId, null, json(view));
    });
    if (answered) return;
    watch.cancel = cancel;
    this.viewWatch = watch;
  }

  private finish(h: RequestHeader, err: unknown, result: Buffer | ReadReply, payload: Buffer): void {
    this.inflight--;
    // The backend is done with it (reusesWritePayloads); a buffer the pool did not lend is ignored.
    if ((h.op === Op.WRITE || h.op === Op.COPY_WRITE) && this.owner.opts.reusesWritePayloads) ioBuffers.release(payload);
    this.owner.requestFinished();
    if (err instanceof AssertionFailure) {
      // A bug, not an I/O error: no reply (the client would take it for a failed disk and go
      // on); the process is stopping (errors.ts), and the peer sees the connection end.
      this.closing = true;
      this.socket.destroy();
      return;
    }
    this.reply(h.requestId, err === null ? null : toZebuError(err), result);
    if (this.paused && this.inflight < this.owner.opts.maxInflightPerConnection / 2) {
      this.paused = false;
      this.socket.resume();
      this.parse();
    }
  }

  private reply(requestId: number, err: ZebuError | null, result: Buffer | ReadReply): void {
    if (this.socket.destroyed) return;
    if (err !== null) {
      const message = Buffer.from(err.message.slice(0, 4000));
      const header = Buffer.allocUnsafe(RESPONSE_HEADER_BYTES);
      encodeResponseHeader(header, requestId, errorToWire(err.code), message.length);
      this.out.write(header);
      this.out.write(message);
      return;
    }
    if (result instanceof ReadReply) {
      // READ: the data was read straight into the reply buffer, after room for the header.
      const full = result.full;
      encodeResponseHeader(full, requestId, 0, full.length - RESPONSE_HEADER_BYTES);
      this.out.write(full, () => ioBuffers.release(full));
      return;
    }
    const header = Buffer.allocUnsafe(RESPONSE_HEADER_BYTES);
    encodeResponseHeader(header, requestId, 0, result.length);
    this.out.write(header);
    if (result.length > 0) this.out.write(result);
  }

  /** A replica's state (INFO, OPEN, and the answers that report it) with the server's identity fields added. */
  private identified(info: unknown): unknown {
    const identity = this.owner.opts.identity;
    return { ...(info as Record<string, unknown>), ...identity, instance: this.owner.instance };
  }

  private async execute(h: RequestHeader, payload: Buffer): Promise<Buffer | ReadReply> {
    const replica = this.owner.backendRef;
    switch (h.op) {
      case Op.PING:
        return EMPTY;
      case Op.INFO:
        return json(this.identified(replica.info()));
      case Op.OPEN:
        await replica.checkEpoch(h.epoch);
        if (this.closing) throw new ZebuError(ErrorCode.CLOSED, 'connection superseded');
        this.openedEpoch = h.epoch;
        this.owner.supersedeOpened(this, h.epoch);
        replica.engineOpened?.();
        return json(this.identified(replica.info()));
    }
    // Everything up to the first await below runs at arrival, in request order: FLUSH bookkeeping
    // and MISSED_START rely on it (they must be ordered with the writes of this connection).
    if (h.epoch !== replica.epoch) await replica.checkEpoch(h.epoch);
    switch (h.op) {
      case Op.READ: {
        if (h.length > MAX_IO_BYTES) throw invalid(`read of ${h.length} bytes exceeds ${MAX_IO_BYTES}`);
        const full = ioBuffers.acquire(RESPONSE_HEADER_BYTES + h.length);
        // A payload names a snapshot to read instead of the live volume.
        if (payload.length > 0) await replica.readSnapshot(textArg(payload), h.offset, h.length, full, RESPONSE_HEADER_BYTES);
        else await replica.read(h.offset, h.length, full, RESPONSE_HEADER_BYTES);
        return new ReadReply(full);
      }
      case Op.WRITE:
        if (h.length !== payload.length) throw invalid(`write length ${h.length} differs from payload length ${payload.length}`);
        if (this.owner.opts.lendsWritePayloads && replica.writeLent !== undefined && ioBuffers.lends(payload)) await replica.writeLent(h.offset, payload);
        else await replica.write(h.offset, payload);
        if ((h.flags & RequestFlag.FUA) !== 0) await replica.flush();
        return EMPTY;
      case Op.COPY_WRITE:
      case Op.COPY_ZERO: {
        if (replica.copyWrite === undefined) throw unsupported(h.op);
        if (payload.length < LEASE_ID_BYTES) throw invalid(`the payload must start with an ${LEASE_ID_BYTES}-byte lease id`);
        const leaseId = readU64(payload, 0);
        if (!Number.isSafeInteger(leaseId) || leaseId === 0) throw invalid(`bad lease id ${leaseId}`);
        if (h.op === Op.COPY_ZERO) {
          if (payload.length !== LEASE_ID_BYTES) throw invalid(`the payload must be the ${LEASE_ID_BYTES}-byte lease id only`);
          if (h.length > MAX_RANGE_BYTES) throw invalid(`range of ${h.length} bytes exceeds ${MAX_RANGE_BYTES}`);
          await replica.copyWrite(leaseId, h.offset, null, h.length);
        } else {
          if (h.length !== payload.length - LEASE_ID_BYTES) throw invalid(`copy write length ${h.length} differs from its data length ${payload.length - LEASE_ID_BYTES}`);
          await replica.copyWrite(leaseId, h.offset, payload.subarray(LEASE_ID_BYTES), h.length);
        }
        return EMPTY;
      }
      case Op.COPY_FROM: {
        if (replica.copyPull === undefined) throw unsupported(h.op);
        if (payload.length < LEASE_ID_BYTES) throw invalid(`the payload must start with an ${LEASE_ID_BYTES}-byte lease id`);
        const leaseId = readU64(payload, 0);
        if (!Number.isSafeInteger(leaseId) || leaseId === 0) throw invalid(`bad lease id ${leaseId}`);
        if (h.length > MAX_IO_BYTES) throw invalid(`copy of ${h.length} bytes exceeds ${MAX_IO_BYTES}`);
        const arg = jsonArg(payload.subarray(LEASE_ID_BYTES)) as { source?: unknown; name?: unknown; zeros?: unknown; snapshot?: unknown };
        if (typeof arg !== 'object' || arg === null || typeof arg.source !== 'string') throw invalid('COPY_FROM takes the lease id, then a JSON object {source: "HOST:PORT", name?, zeros?, snapshot?}');
        if (arg.snapshot !== undefined && (typeof arg.snapshot !== 'string' || arg.snapshot === '')) throw invalid('COPY_FROM snapshot must be a snapshot name');
        if (arg.name !== undefined && arg.name !== null && typeof arg.name !== 'string') throw invalid('COPY_FROM name must be a string');
        if (arg.zeros !== undefined && typeof arg.zeros !== 'boolean') throw invalid('COPY_FROM zeros must be a boolean');
        const source = arg.source;
        parseSourceAddress(source);
        const name = typeof arg.name === 'string' ? arg.name : null;
        const epoch = h.epoch;
        const sources = this.owner.copySources;
        const snapshot = typeof arg.snapshot === 'string' ? arg.snapshot : null;
        // The source's reply lands in a pooled buffer (client.ts); once the pull resolved the
        // backend is done with it, and the next pull reuses it instead of faulting in fresh memory.
        let pulled: Buffer | null = null;
        try {
          await replica.copyPull(leaseId, h.offset, h.length, arg.zeros === true, async () => (pulled = await sources.read(source, name, epoch, h.offset, h.length, snapshot)));
        } finally {
          if (pulled !== null) ioBuffers.release(pulled);
        }
        return EMPTY;
      }
      case Op.LEASE_REVOKE:
        if (replica.leaseRevoke === undefined) throw unsupported(h.op);
        if (!Number.isSafeInteger(h.offset) || h.offset === 0) throw invalid(`bad lease id ${h.offset}`);
        await replica.leaseRevoke(h.offset);
        return EMPTY;
      case Op.TRIM:
      case Op.WRITE_ZEROES:
        if (h.length > MAX_RANGE_BYTES) throw invalid(`range of ${h.length} bytes exceeds ${MAX_RANGE_BYTES}`);
        await replica.zero(h.offset, h.length, { noHole: (h.flags & RequestFlag.NO_HOLE) !== 0 });
        if ((h.flags & RequestFlag.FUA) !== 0) await replica.flush();
        return EMPTY;
      case Op.FLUSH: {
        if (payload.length !== 0 && payload.length !== FLUSH_CONFIRMED_BYTES) {
          throw invalid(`FLUSH payload must be empty or ${FLUSH_CONFIRMED_BYTES} bytes, got ${payload.length}`);
        }
        const confirmed = payload.length === 0 ? 0 : readU64(payload, 0);
        if (!Number.isSafeInteger(h.offset) || !Number.isSafeInteger(confirmed)) throw invalid('FLUSH sequence numbers out of range');
        replica.flushArrived?.(h.offset, confirmed, (h.flags & RequestFlag.EVICT) !== 0);
        await replica.flush();
        return EMPTY;
      }
      case Op.INTENT_GET:
        if (replica.intentGet === undefined) throw unsupported(h.op);
        return json(replica.intentGet());
      case Op.MISSED_START:
        if (replica.missedStart === undefined) throw unsupported(h.op);
        await replica.missedStart(missedKey(payload));
        return EMPTY;
      case Op.MISSED_GET: {
        if (replica.missedGet === undefined) throw unsupported(h.op);
        const key = missedKey(payload);
        return json({ regions: replica.missedGet(key), partial: replica.missedPartial?.(key) ?? [] });
      }
      case Op.MISSED_DROP:
        if (replica.missedDrop === undefined) throw unsupported(h.op);
        await replica.missedDrop(missedKey(payload));
        return EMPTY;
      case Op.MISSED_MERGE: {
        if (replica.missedMerge === undefined) throw unsupported(h.op);
        const arg = jsonArg(payload) as { key?: unknown; regions?: unknown; invalid?: unknown };
        if (typeof arg !== 'object' || arg === null) throw invalid('MISSED_MERGE takes a JSON object {key, regions, invalid}');
        const regions = arg.regions ?? [];
        if (!Array.isArray(regions) || !regions.every((r) => Number.isSafeInteger(r) && r >= 0)) throw invalid('MISSED_MERGE regions must be whole numbers >= 0');
        if (arg.invalid !== undefined && typeof arg.invalid !== 'boolean') throw invalid('MISSED_MERGE invalid must be a boolean');
        await replica.missedMerge(checkMissedKey(arg.key), regions as number[], arg.invalid === true);
        return EMPTY;
      }
      case Op.MISSED_CLEAR: {
        if (replica.missedClear === undefined) throw unsupported(h.op);
        const arg = jsonArg(payload) as { key?: unknown; regions?: unknown; progress?: unknown };
        if (typeof arg !== 'object' || arg === null) throw invalid('MISSED_CLEAR takes a JSON object {key, regions, progress?}');
        const regions = arg.regions;
        if (!Array.isArray(regions) || !regions.every((r) => Number.isSafeInteger(r) && r >= 0)) throw invalid('MISSED_CLEAR regions must be whole numbers >= 0');
        const progress = arg.progress ?? [];
        if (!Array.isArray(progress) || !progress.every((p) => Array.isArray(p) && p.length === 2 && p.every((n) => Number.isSafeInteger(n) && n >= 0))) {
          throw invalid('MISSED_CLEAR progress must be [region, bytes] pairs of whole numbers >= 0');
        }
        await replica.missedClear(checkMissedKey(arg.key), regions as number[], progress as [number, number][]);
        return EMPTY;
      }
      case Op.MISSED_PRUNE: {
        if (replica.missedPrune === undefined) throw unsupported(h.op);
        const keep = jsonArg(payload);
        if (!Array.isArray(keep)) throw invalid('MISSED_PRUNE takes a JSON array of replica keys');
        await replica.missedPrune(keep.map((k) => checkMissedKey(k)));
        return EMPTY;
      }
      case Op.INTENT_RELEASE: {
        if (replica.intentRelease === undefined) throw unsupported(h.op);
        const regions = jsonArg(payload);
        if (!Array.isArray(regions) || regions.length > MAX_RELEASE_REGIONS || !regions.every((r) => Number.isSafeInteger(r) && r >= 0)) {
          throw invalid(`INTENT_RELEASE takes a JSON array of at most ${MAX_RELEASE_REGIONS} region numbers`);
        }
        await replica.intentRelease(regions as number[]);
        return EMPTY;
      }
      case Op.REGION_HASH:
        if (replica.regionHash === undefined) throw unsupported(h.op);
        if (h.length > MAX_IO_BYTES) throw invalid(`REGION_HASH of ${h.length} bytes exceeds ${MAX_IO_BYTES}`);
        return replica.regionHash(h.offset, h.length, payload.length > 0 ? textArg(payload) : null);
      case Op.BLOCK_STATUS:
        return encodeExtents(await replica.blockStatus(h.offset, h.length));
      case Op.SNAPSHOT_CHANGES: {
        if (replica.snapshotChanges === undefined) throw unsupported(h.op);
        const spec = jsonArg(payload) as { snapshot?: unknown; base?: unknown; aboveImage?: unknown };
        if (typeof spec !== 'object' || spec === null || (spec.snapshot !== null && typeof spec.snapshot !== 'string') || (spec.base !== null && typeof spec.base !== 'string')
          || (spec.aboveImage !== undefined && typeof spec.aboveImage !== 'boolean')) {
          throw invalid('SNAPSHOT_CHANGES takes a JSON object {snapshot: string | null, base: string | null, aboveImage?: boolean}');
        }
        return encodeExtents(await replica.snapshotChanges(spec.snapshot as string | null, spec.base as string | null, h.offset, h.length, spec.aboveImage === true));
      }
      case Op.SNAPSHOT_CREATE:
        return json(await replica.snapshotCreate(textArg(payload)));
      case Op.SNAPSHOT_LIST:
        return json(replica.snapshotList());
      case Op.SNAPSHOT_DELETE:
        await replica.snapshotDelete(textArg(payload));
        return EMPTY;
      case Op.SNAPSHOT_REVERT:
        await replica.snapshotRevert(textArg(payload));
        return EMPTY;
      case Op.EXPAND:
        if (replica.expand === undefined) throw new ZebuError(ErrorCode.UNSUPPORTED, 'EXPAND is not served here');
        return json(this.identified(await replica.expand(h.offset)));
      case Op.SET_REVISION:
        if (replica.setRevision === undefined) throw new ZebuError(ErrorCode.UNSUPPORTED, 'SET_REVISION is not served here');
        return json(this.identified(await replica.setRevision(h.offset)));
      case Op.SET_REBUILDING:
        if (replica.setRebuilding === undefined) throw new ZebuError(ErrorCode.UNSUPPORTED, 'SET_REBUILDING is not served here');
        if (h.offset !== 0 && h.offset !== 1 && h.offset !== 2) throw invalid(`SET_REBUILDING takes 0 (none), 1 (full) or 2 (delta), got ${h.offset}`);
        return json(this.identified(await replica.setRebuilding(h.offset === 0 ? null : h.offset === 1 ? 'full' : 'delta')));
      case Op.READ_REPORT: {
        if (replica.reportReads === undefined) throw unsupported(h.op);
        if (payload.length !== READ_REPORT_BYTES) throw invalid(`READ_REPORT takes ${READ_REPORT_BYTES} bytes, got ${payload.length}`);
        const reads = readU64(payload, 0);
        const bytes = readU64(payload, 8);
        const micros = readU64(payload, 16);
        if (!Number.isSafeInteger(reads) || !Number.isSafeInteger(bytes) || !Number.isSafeInteger(micros)) throw invalid('READ_REPORT counts out of range');
        replica.reportReads(reads, bytes, micros);
        return EMPTY;
      }
      case Op.READ_FAILED: {
        if (replica.readFailed === undefined) throw unsupported(h.op);
        const arg = jsonArg(payload) as { host?: unknown; port?: unknown; instance?: unknown; error?: unknown };
        if (typeof arg !== 'object' || arg === null || typeof arg.host !== 'string' || !Number.isSafeInteger(arg.port) || typeof arg.instance !== 'string' || typeof arg.error !== 'string') {
          throw invalid('READ_FAILED takes {host, port, instance, error}');
        }
        replica.readFailed({ host: arg.host, port: arg.port as number, instance: arg.instance }, arg.error.slice(0, 1000));
        return EMPTY;
      }
      case Op.FAULT_INJECT: {
        const spec = jsonArg(payload) as { clear?: boolean; rules?: FaultRule[]; powerLoss?: { seed?: unknown; mode?: unknown } };
        if (typeof spec !== 'object' || spec === null) throw invalid('FAULT_INJECT takes a JSON object');
        if (spec.powerLoss !== undefined) {
          const powerLoss = this.owner.opts.powerLoss;
          if (powerLoss === undefined) throw new ZebuError(ErrorCode.UNSUPPORTED, 'power-loss simulation is not enabled on this replica');
          const { seed, mode } = spec.powerLoss ?? {};
          if (!Number.isSafeInteger(seed)) throw invalid('powerLoss.seed must be an integer');
          if (mode !== 'drop' && mode !== 'tear') throw invalid('powerLoss.mode must be "drop" or "tear"');
          powerLoss(seed as number, mode);
          return EMPTY;
        }
        const disk = this.owner.opts.faultDisk;
        if (disk === undefined) throw new ZebuError(ErrorCode.UNSUPPORTED, 'fault injection is not enabled on this replica');
        const rules = spec;
        if (rules.clear === true) disk.clearRules();
        for (const rule of rules.rules ?? []) disk.addRule(validateRule(rule));
        return EMPTY;
      }
      default:
        throw new ZebuError(ErrorCode.UNSUPPORTED, `unknown op ${h.op}${OpName[h.op] ? ` (${OpName[h.op]})` : ''}`);
    }
  }
}

/** A READ reply: header room followed by the data. */
class ReadReply {
  readonly full: Buffer;
  constructor(full: Buffer) {
    this.full = full;
  }
}

function json(value: unknown): Buffer {
  return Buffer.from(JSON.stringify(value));
}

function textArg(payload: Buffer): string {
  return payload.toString('utf8');
}

function jsonArg(payload: Buffer): unknown {
  try {
    return JSON.parse(payload.toString('utf8'));
  } catch {
    throw invalid('control payload is not JSON');
  }
}

function unsupported(op: number): ZebuError {
  return new ZebuError(ErrorCode.UNSUPPORTED, `${OpName[op]} is not served here`);
}

function checkMissedKey(key: unknown): string {
  if (typeof key !== 'string' || !MISSED_KEY.test(key)) {
    throw invalid(`replica key must be 1-200 characters of [A-Za-z0-9._:@=-], got ${JSON.stringify(key)?.slice(0, 220)}`);
  }
  return key;
}

function missedKey(payload: Buffer): string {
  return checkMissedKey(payload.toString('utf8'));
}

function validateRule(rule: unknown): FaultRule {
  const r = rule as FaultRule;
  if (typeof r !== 'object' || r === null) throw invalid('fault rule must be an object');
  if (!['read', 'write', 'sync', 'meta', 'any'].includes(r.op)) throw invalid(`fault rule op ${String(r.op)}`);
  if (r.errno !== 'EIO' && r.errno !== 'ENOSPC') throw invalid(`fault rule errno ${String(r.errno)}`);
  return { op: r.op, errno: r.errno, pathIncludes: r.pathIncludes, afterOps: r.afterOps, count: r.count };
}
