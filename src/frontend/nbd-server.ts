/**
 * NBD server (fixed newstyle). Serves named exports from a registry; each request is forwarded
 * to its export's target and answered when the target answers. Every malformed request gets an
 * NBD error reply, or, where the stream cannot be parsed any further, a disconnect of that one
 * client. The process never dies of input.
 *
 * The registry may change while clients are connected: a connection is bound to the export object
 * it negotiated (and to the size it was told), so one export can be drained and its clients
 * closed (`drainExport`) without touching the others.
 */
import net from 'node:net';
import { assert, type ZebuError } from '../errors.ts';
import type { FrameReader } from '../protocol/frame-reader.ts';
import { SocketReceiver, connectionReader } from '../protocol/socket-receiver.ts';
import { adoptAccepted } from '../protocol/accepted-socket.ts';
import { POOLED_MIN_BYTES } from '../protocol/buffer-pool.ts';
import { ioBuffers } from '../protocol/buffer-pool.ts';
import { TickBatcher } from '../protocol/tick-batcher.ts';
import { listenOnUnixSocket } from '../protocol/unix-socket.ts';
import { errnoFor } from '../error-status.ts';
import {
  NBDMAGIC, IHAVEOPT, HandshakeFlag, ClientFlag, Opt, Rep, Info, TransmissionFlag, Cmd, CmdFlag, ReplyType, ReplyFlag,
  NbdErrno, BASE_ALLOCATION, BASE_ALLOCATION_ID, AllocationFlag, REQUEST_MAGIC, REQUEST_HEADER_BYTES,
  MIN_BLOCK_BYTES, PREFERRED_BLOCK_BYTES, MAX_BLOCK_BYTES, MAX_OPTION_BYTES,
  optionReply, simpleReplyHeader, structuredHeader, structuredError, structuredNone,
} from './nbd-protocol.ts';

export interface NbdExtent {
  offset: number;
  length: number;
  data: boolean;
}

/** What an export forwards to (the engine link). Callbacks run exactly once. */
export interface NbdExport {
  readonly name: string;
  readonly sizeBytes: number;
  readonly description: string;
  read(offset: number, length: number, cb: (err: ZebuError | null, data: Buffer) => void): void;
  write(offset: number, data: Buffer, fua: boolean, cb: (err: ZebuError | null) => void): void;
  /** As write, with `data` lent from ioBuffers: the export gives it back once nothing holds it. */
  writeLent?(offset: number, data: Buffer, fua: boolean, cb: (err: ZebuError | null) => void): void;
  /** TRIM, or WRITE_ZEROES (`noHole`: the client wants the range to stay allocated). */
  zero(offset: number, length: number, trim: boolean, fua: boolean, noHole: boolean, cb: (err: ZebuError | null) => void): void;
  flush(cb: (err: ZebuError | null) => void): void;
  blockStatus(offset: number, length: number, cb: (err: ZebuError | null, extents: NbdExtent[]) => void): void;
}

export interface ExportRegistry {
  get(name: string): NbdExport | null;
  list(): NbdExport[];
}

/** What `drainExport` did. */
export interface DrainResult {
  /** Connections of the export that were closed. */
  connections: number;
  /** False when some requests were still unanswered at the deadline (their clients were cut off). */
  drained: boolean;
}

export interface NbdServerOptions {
  registry: ExportRegistry;
  maxInflightPerConnection?: number;
  handshakeTimeoutMs?: number;
  log?: (event: Record<string, unknown>) => void;
}

const TRANSMISSION_FLAGS =
  TransmissionFlag.HAS_FLAGS |
  TransmissionFlag.SEND_FLUSH |
  TransmissionFlag.SEND_FUA |
  TransmissionFlag.SEND_TRIM |
  TransmissionFlag.SEND_WRITE_ZEROES |
  TransmissionFlag.SEND_DF |
  // Safe: every connection reaches the same engine, whose FLUSH covers all completed writes.
  TransmissionFlag.CAN_MULTI_CONN |
  TransmissionFlag.SEND_CACHE |
  TransmissionFlag.SEND_FAST_ZERO;

const MAX_BLOCK_STATUS_BYTES = 1024 * 1024 * 1024;

/** Write payloads up to this size are read and discarded when the request is refused. */
const MAX_DISCARD_BYTES = 64 * 1024 * 1024;

export class NbdServer {
  private readonly options: Required<NbdServerOptions>;
  private readonly servers: net.Server[] = [];
  private readonly connections = new Set<NbdConnection>();

  constructor(options: NbdServerOptions) {
    this.options = { maxInflightPerConnection: 256, handshakeTimeoutMs: 30_000, log: () => {}, ...options };
  }

  get registry(): ExportRegistry {
    return this.options.registry;
  }
  get opts(): Required<NbdServerOptions> {
    return this.options;
  }

  private newServer(): net.Server {
    // Paused on connect: the handle moves to a socket that reads through a SocketReceiver
    // (accepted-socket.ts), so a large WRITE is read straight into its own buffer.
    const server = net.createServer({ noDelay: true, pauseOnConnect: true }, (accepted) => {
      const receiver = new SocketReceiver();
      const adopted = adoptAccepted(accepted, receiver.onread);
      const socket = adopted ?? accepted;
      const conn = new NbdConnection(this, socket, adopted === null ? null : receiver);
      this.connections.add(conn);
      socket.once('close', () => this.connections.delete(conn));
      if (adopted === null) accepted.resume();
    });
    server.on('error', (err) => this.options.log({ event: 'nbd-server-error', error: err.message }));
    this.servers.push(server);
    return server;
  }

  listenTcp(host: string, port: number): Promise<net.AddressInfo> {
    const server = this.newServer();
    return new Promise((resolve, reject) => {
      server.once('error', reject);
      server.listen({ host, port }, () => {
        server.off('error', reject);
        resolve(server.address() as net.AddressInfo);
      });
    });
  }

  listenUnix(socketPath: string): Promise<void> {
    return listenOnUnixSocket(this.newServer(), socketPath);
  }

  /**
   * Listens on an inherited, already bound socket (kept-listener.ts). Closing the server closes
   * only this process's descriptor: the socket stays bound and listening in its keeper.
   */
  listenFd(fd: number): Promise<net.AddressInfo | string> {
    const server = this.newServer();
    return new Promise((resolve, reject) => {
      server.once('error', reject);
      server.listen({ fd }, () => {
        server.off('error', reject);
        resolve(server.address() as net.AddressInfo | string);
      });
    });
  }

  get connectionCount(): number {
    return this.connections.size;
  }

  /** Open connections in the transmission phase on `target`. */
  connectionsTo(target: NbdExport): number {
    let count = 0;
    for (const c of this.connections) if (c.exportTarget === target) count++;
    return count;
  }

  /**
   * Ends every connection on `target`: requests already in flight are answered (up to
   * `drainTimeoutMs`), requests that arrive meanwhile get ESHUTDOWN, then each connection is
   * closed. Remove `target` from the registry first, so that no new client binds to it.
   */
  drainExport(target: NbdExport, drainTimeoutMs = 10_000): Promise<DrainResult> {
    return this.drainConnections([...this.connections].filter((c) => c.exportTarget === target), drainTimeoutMs);
  }

  private async drainConnections(conns: NbdConnection[], drainTimeoutMs: number): Promise<DrainResult> {
    const closed = conns.map((c) => c.shutDown());
    let timer: NodeJS.Timeout | undefined;
    const deadline = new Promise<'timeout'>((resolve) => (timer = setTimeout(() => resolve('timeout'), drainTimeoutMs)));
    const outcome = await Promise.race([Promise.all(closed).then(() => 'drained' as const), deadline]);
    clearTimeout(timer);
    if (outcome === 'timeout') {
      for (const c of conns) c.forceClose('requests still unanswered at the drain deadline');
      await Promise.all(closed);
    }
    return { connections: conns.length, drained: outcome === 'drained' };
  }

  /** Stops listening, lets in-flight requests finish (bounded), then closes every client. */
  async close(drainTimeoutMs = 10_000): Promise<void> {
    for (const s of this.servers) s.close();
    await this.drainConnections([...this.connections], drainTimeoutMs);
  }
}

type Phase = 'greeting' | 'options' | 'transmission' | 'closed';

class NbdConnection {
  readonly socket: net.Socket;
  /** Transmission-phase replies, batched per tick. */
  private readonly out: TickBatcher;
  private readonly owner: NbdServer;
  private readonly reader: FrameReader;
  /** Reads into buffers it chooses (null: 'data' events are pushed to `reader`). */
  private readonly receiver: SocketReceiver | null;
  /** A large WRITE payload is being read straight into its buffer. */
  private receiving = false;
  private phase: Phase = 'greeting';
  private noZeroes = false;
  private structured = false;
  private metaContext = false;
  private target: NbdExport | null = null;
  /** The size the client was told at the handshake: an open connection keeps it. */
  private sizeBytes = 0;
  inflight = 0;
  /** Set by shutDown: answer what is in flight, refuse the rest, then close. */
  private shuttingDown = false;
  private readonly closedPromise: Promise<void>;
  private paused = false;
  private disconnectRequested = false;
  private optionHeader: { option: number; length: number } | null = null;
  private requestHeader: { flags: number; type: number; cookie: Buffer; offset: number; length: number } | null = null;
  private discard = 0;
  private readonly handshakeTimer: NodeJS.Timeout;

  constructor(owner: NbdServer, socket: net.Socket, receiver: SocketReceiver | null) {
    this.owner = owner;
    this.socket = socket;
    this.receiver = receiver;
    this.out = new TickBatcher(socket);
    this.reader = connectionReader(socket, receiver, () => this.onData());
    socket.on('error', () => {});
    this.closedPromise = new Promise((resolve) =>
      socket.on('close', () => {
        this.phase = 'closed';
        clearTimeout(this.handshakeTimer);
        resolve();
      }),
    );
    this.handshakeTimer = setTimeout(() => {
      if (this.phase !== 'transmission') this.drop('handshake timed out');
    }, owner.opts.handshakeTimeoutMs);
    const greeting = Buffer.alloc(18);
    NBDMAGIC.copy(greeting, 0);
    IHAVEOPT.copy(greeting, 8);
    greeting.writeUInt16BE(HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES, 16);
    socket.write(greeting);
  }

  private log(event: Record<string, unknown>): void {
    this.owner.opts.log({ ...event, peer: this.socket.remoteAddress ?? 'unix' });
  }

  /** The export this connection is bound to (null before the handshake is done). */
  get exportTarget(): NbdExport | null {
    return this.target;
  }

  /**
   * Begins a clean end: a connection still in the handshake is closed now; one in transmission
   * answers its in-flight requests, replies ESHUTDOWN to new ones, and closes when none is left.
   * Resolves when the socket is closed.
   */
  shutDown(): Promise<void> {
    if (this.phase !== 'transmission') {
      this.drop('server shutting down');
    } else if (!this.shuttingDown) {
      this.shuttingDown = true;
      if (this.inflight === 0) this.drop('export removed or server stopping');
    }
    return this.closedPromise;
  }

  forceClose(reason: string): void {
    this.drop(reason);
    this.socket.destroy();
  }

  private drop(reason: string): void {
    if (this.phase === 'closed') return;
    this.log({ event: 'nbd-disconnect', reason });
    this.phase = 'closed';
    this.socket.end();
    setTimeout(() => this.socket.destroy(), 1000).unref();
  }

  /** Bytes were added to `reader`. */
  private onData(): void {
    if (this.phase === 'closed') return;
    try {
      this.pump();
    } catch (err) {
      // A bug, not input: keep the process, lose the connection, say why.
      this.log({ event: 'nbd-internal-error', error: (err as Error).stack });
      this.drop('internal error');
    }
  }

  private pump(): void {
    while (this.phase !== 'closed' && !this.paused && !this.receiving) {
      if (this.discard > 0) {
        this.discard -= this.reader.skip(this.discard);
        if (this.discard > 0) return;
      }
      if (this.phase === 'greeting') {
        const flags = this.reader.take(4);
        if (flags === null) return;
        const clientFlags = flags.readUInt32BE(0);
        if ((clientFlags & ClientFlag.FIXED_NEWSTYLE) === 0) return this.drop('client does not speak fixed newstyle');
        if ((clientFlags & ~(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES)) !== 0) return this.drop('unknown client flags');
        this.noZeroes = (clientFlags & ClientFlag.NO_ZEROES) !== 0;
        this.phase = 'options';
      } else if (this.phase === 'options') {
        if (!this.stepOption()) return;
      } else if (this.phase === 'transmission') {
        if (!this.stepRequest()) return;
      }
    }
  }

  // ---- options -------------------------------------------------------------------------------

  private stepOption(): boolean {
    if (this.optionHeader === null) {
      const raw = this.reader.take(16);
      if (raw === null) return false;
      if (!raw.subarray(0, 8).equals(IHAVEOPT)) {
        this.drop('bad option magic');
        return false;
      }
      const option = raw.readUInt32BE(8);
      const length = raw.readUInt32BE(12);
      if (length > MAX_OPTION_BYTES) {
        if (length <= MAX_DISCARD_BYTES) {
          this.discard = length;
          this.socket.write(optionReply(option, Rep.ERR_TOO_BIG, Buffer.from('option data too long')));
          return true;
        }
        this.drop(`option of ${length} bytes`);
        return false;
      }
      this.optionHeader = { option, length };
    }
    const { option, length } = this.optionHeader;
    const data = this.reader.take(length);
    if (data === null) return false;
    this.optionHeader = null;
    this.handleOption(option, data);
    return true;
  }

  private replyOption(option: number, type: number, data?: Buffer | string): void {
    this.socket.write(optionReply(option, type, typeof data === 'string' ? Buffer.from(data) : data));
  }

  private handleOption(option: number, data: Buffer): void {
    const registry = this.owner.registry;
    switch (option) {
      case Opt.EXPORT_NAME: {
        const target = this.lookup(data.toString('utf8'));
        if (target === null) return this.drop(`unknown export ${JSON.stringify(data.toString('utf8'))}`);
        const sizeBytes = target.sizeBytes;
        const reply = Buffer.alloc(this.noZeroes ? 10 : 134);
        writeU64(reply, sizeBytes, 0);
        reply.writeUInt16BE(TRANSMISSION_FLAGS, 8);
        this.socket.write(reply);
        return this.enterTransmission(target, sizeBytes);
      }
      case Opt.ABORT:
        this.replyOption(option, Rep.ACK);
        return this.drop('client aborted');
      case Opt.LIST:
        if (data.length !== 0) return this.replyOption(option, Rep.ERR_INVALID, 'LIST takes no data');
        for (const exp of registry.list()) {
          const name = Buffer.from(exp.name);
          const body = Buffer.allocUnsafe(4 + name.length);
          body.writeUInt32BE(name.length, 0);
          name.copy(body, 4);
          this.replyOption(option, Rep.SERVER, body);
        }
        return this.replyOption(option, Rep.ACK);
      case Opt.STRUCTURED_REPLY:
        if (data.length !== 0) return this.replyOption(option, Rep.ERR_INVALID, 'STRUCTURED_REPLY takes no data');
        if (this.structured) return this.replyOption(option, Rep.ERR_INVALID, 'structured replies already negotiated');
        this.structured = true;
        return this.replyOption(option, Rep.ACK);
      case Opt.INFO:
      case Opt.GO:
        return this.handleInfo(option, data);
      case Opt.LIST_META_CONTEXT:
      case Opt.SET_META_CONTEXT:
        return this.handleMetaContext(option, data);
      case Opt.STARTTLS:
        return this.replyOption(option, Rep.ERR_UNSUP, 'TLS is not offered by this server');
      default:
        return this.replyOption(option, Rep.ERR_UNSUP, `option ${option} is not supported`);
    }
  }

  private lookup(name: string): NbdExport | null {
    const registry = this.owner.registry;
    if (name === '') {
      const all = registry.list();
      return all.length === 1 ? all[0] : null;
    }
    return registry.get(name);
  }

  private handleInfo(option: number, data: Buffer): void {
    if (data.length < 6) return this.replyOption(option, Rep.ERR_INVALID, 'INFO/GO data too short');
    const nameLength = data.readUInt32BE(0);
    if (4 + nameLength + 2 > data.length) return this.replyOption(option, Rep.ERR_INVALID, 'export name length exceeds the option');
    const name = data.toString('utf8', 4, 4 + nameLength);
    const count = data.readUInt16BE(4 + nameLength);
    if (6 + nameLength + count * 2 !== data.length) return this.replyOption(option, Rep.ERR_INVALID, 'information request count does not match the option length');
    const requests: number[] = [];
    for (let i = 0; i < count; i++) requests.push(data.readUInt16BE(6 + nameLength + i * 2));
    const target = this.lookup(name);
    if (target === null) return this.replyOption(option, Rep.ERR_UNKNOWN, `no export named ${JSON.stringify(name)}`);

    const sizeBytes = target.sizeBytes;
    const exportInfo = Buffer.alloc(12);
    exportInfo.writeUInt16BE(Info.EXPORT, 0);
    writeU64(exportInfo, sizeBytes, 2);
    exportInfo.writeUInt16BE(TRANSMISSION_FLAGS, 10);
    this.replyOption(option, Rep.INFO, exportInfo);
    if (requests.includes(Info.NAME)) this.replyOption(option, Rep.INFO, infoString(Info.NAME, target.name));
    if (requests.includes(Info.DESCRIPTION)) this.replyOption(option, Rep.INFO, infoString(Info.DESCRIPTION, target.description));
    const blockSize = Buffer.alloc(14);
    blockSize.writeUInt16BE(Info.BLOCK_SIZE, 0);
    blockSize.writeUInt32BE(MIN_BLOCK_BYTES, 2);
    blockSize.writeUInt32BE(PREFERRED_BLOCK_BYTES, 6);
    blockSize.writeUInt32BE(MAX_BLOCK_BYTES, 10);
    this.replyOption(option, Rep.INFO, blockSize);
    this.replyOption(option, Rep.ACK);
    if (option === Opt.GO) this.enterTransmission(target, sizeBytes);
  }

  private handleMetaContext(option: number, data: Buffer): void {
    if (option === Opt.SET_META_CONTEXT && !this.structured) {
      return this.replyOption(option, Rep.ERR_INVALID, 'SET_META_CONTEXT needs structured replies first');
    }
    if (data.length < 8) return this.replyOption(option, Rep.ERR_INVALID, 'meta context data too short');
    const nameLength = data.readUInt32BE(0);
    if (4 + nameLength + 4 > data.length) return this.replyOption(option, Rep.ERR_INVALID, 'export name length exceeds the option');
    const name = data.toString('utf8', 4, 4 + nameLength);
    const count = data.readUInt32BE(4 + nameLength);
    const queries: string[] = [];
    let at = 8 + nameLength;
    for (let i = 0; i < count; i++) {
      if (at + 4 > data.length) return this.replyOption(option, Rep.ERR_INVALID, 'meta context query truncated');
      const length = data.readUInt32BE(at);
      if (at + 4 + length > data.length) return this.replyOption(option, Rep.ERR_INVALID, 'meta context query truncated');
      queries.push(data.toString('utf8', at + 4, at + 4 + length));
      at += 4 + length;
    }
    if (at !== data.length) return this.replyOption(option, Rep.ERR_INVALID, 'trailing bytes after meta context queries');
    if (this.lookup(name) === null) return this.replyOption(option, Rep.ERR_UNKNOWN, `no export named ${JSON.stringify(name)}`);
    let matched = false;
    const wanted =
      option === Opt.LIST_META_CONTEXT
        ? queries.length === 0 || queries.some((q) => q === 'base:' || q === BASE_ALLOCATION)
        : queries.includes(BASE_ALLOCATION);
    if (wanted) {
      const ctx = Buffer.from(BASE_ALLOCATION);
      const body = Buffer.allocUnsafe(4 + ctx.length);
      body.writeUInt32BE(option === Opt.SET_META_CONTEXT ? BASE_ALLOCATION_ID : 0, 0);
      ctx.copy(body, 4);
      this.replyOption(option, Rep.META_CONTEXT, body);
      matched = true;
    }
    if (option === Opt.SET_META_CONTEXT) this.metaContext = matched;
    this.replyOption(option, Rep.ACK);
  }

  private enterTransmission(target: NbdExport, sizeBytes: number): void {
    assert(Number.isSafeInteger(sizeBytes) && sizeBytes >= 0, `export size ${sizeBytes}`);
    this.target = target;
    this.sizeBytes = sizeBytes;
    this.phase = 'transmission';
    clearTimeout(this.handshakeTimer);
    this.log({ event: 'nbd-connected', export: target.name, structured: this.structured, metaContext: this.metaContext });
  }

  // ---- transmission --------------------------------------------------------------------------

  private stepRequest(): boolean {
    if (this.requestHeader === null) {
      const raw = this.reader.take(REQUEST_HEADER_BYTES);
      if (raw === null) return false;
      if (raw.readUInt32BE(0) !== REQUEST_MAGIC) {
        this.drop('bad request magic');
        return false;
      }
      this.requestHeader = {
        flags: raw.readUInt16BE(4),
        type: raw.readUInt16BE(6),
        cookie: Buffer.from(raw.subarray(8, 16)),
        offset: readU64(raw, 16),
        length: raw.readUInt32BE(24),
      };
    }
    const h = this.requestHeader;
    if (h.type === Cmd.WRITE) {
      if (h.length > MAX_BLOCK_BYTES) {
        this.requestHeader = null;
        if (h.length > MAX_DISCARD_BYTES) {
          this.drop(`write of ${h.length} bytes`);
          return false;
        }
        this.discard = h.length;
        this.replyError(h.cookie, NbdErrno.EOVERFLOW, `write of ${h.length} bytes exceeds the maximum block size ${MAX_BLOCK_BYTES}`);
        return true;
      }
      if (this.receiver !== null && h.length >= POOLED_MIN_BYTES && this.reader.available < h.length) {
        // Not all here yet: the kernel reads the rest straight into the payload's own buffer, one
        // the export gives back for reuse when it can (writeLent).
        const payload = ioBuffers.acquire(h.length);
        this.receiving = true;
        this.receiver.receiveInto(payload, 0, h.length, () => {
          this.receiving = false;
          this.requestHeader = null;
          if (this.phase === 'closed') return;
          try {
            this.execute(h.flags, h.type, h.cookie, h.offset, h.length, payload);
            this.pump();
          } catch (err) {
            this.log({ event: 'nbd-internal-error', error: (err as Error).stack });
            this.drop('internal error');
          }
        });
        return false;
      }
      const payload = this.reader.take(h.length);
      if (payload === null) return false;
      this.requestHeader = null;
      this.execute(h.flags, h.type, h.cookie, h.offset, h.length, payload);
      return true;
    }
    this.requestHeader = null;
    this.execute(h.flags, h.type, h.cookie, h.offset, h.length, null);
    return true;
  }

  private begin(): void {
    this.inflight++;
    if (this.inflight >= this.owner.opts.maxInflightPerConnection && !this.paused) {
      this.paused = true;
      this.socket.pause();
    }
  }

  /** Called after the request's reply is written: a pending DISC may close the connection here. */
  private end(): void {
    this.inflight--;
    if (this.paused && this.inflight < this.owner.opts.maxInflightPerConnection / 2) {
      this.paused = false;
      this.socket.resume();
      this.pump();
    }
    if (this.disconnectRequested && this.inflight === 0) this.drop('client disconnected (NBD_CMD_DISC)');
    else if (this.shuttingDown && this.inflight === 0) this.drop('export removed or server stopping');
  }

  private execute(flags: number, type: number, cookie: Buffer, offset: number, length: number, payload: Buffer | null): void {
    const target = this.target!;
    if (this.disconnectRequested) return; // nothing after DISC is served
    if (this.shuttingDown && type !== Cmd.DISC) return this.replyError(cookie, NbdErrno.ESHUTDOWN, 'export is being removed or the server is stopping');
    const sizeBytes = this.sizeBytes;
    const inRange = Number.isSafeInteger(offset + length) && offset + length <= sizeBytes;
    const fua = (flags & CmdFlag.FUA) !== 0;
    switch (type) {
      case Cmd.READ: {
        if (length === 0 || length > MAX_BLOCK_BYTES) return this.replyError(cookie, length === 0 ? NbdErrno.EINVAL : NbdErrno.EOVERFLOW, `read length ${length} outside 1..${MAX_BLOCK_BYTES}`);
        if (!inRange) return this.replyError(cookie, NbdErrno.EINVAL, `read ${offset}+${length} beyond the end of the export (${sizeBytes})`);
        this.begin();
        target.read(offset, length, (err, data) => {
          if (err !== null) this.replyError(cookie, errnoFor(err.code), err.message);
          else this.replyRead(cookie, offset, data);
          this.end();
        });
        return;
      }
      case Cmd.WRITE: {
        if (!inRange) return this.replyError(cookie, NbdErrno.EINVAL, `write ${offset}+${length} beyond the end of the export (${sizeBytes})`);
        if (length === 0) return this.replyOk(cookie);
        this.begin();
        const written = (err: ZebuError | null): void => {
          if (err !== null) this.replyError(cookie, errnoFor(err.code), err.message);
          else this.replyOk(cookie);
          this.end();
        };
        if (target.writeLent !== undefined && ioBuffers.lends(payload!)) target.writeLent(offset, payload!, fua, written);
        else target.write(offset, payload!, fua, written);
        return;
      }
      case Cmd.TRIM:
      case Cmd.WRITE_ZEROES: {
        if (!inRange) return this.replyError(cookie, NbdErrno.EINVAL, `range ${offset}+${length} beyond the end of the export (${sizeBytes})`);
        if (length === 0) return this.replyOk(cookie);
        // FAST_ZERO: zeroing is a presence-map change here, always faster than writing zeros.
        this.begin();
        target.zero(offset, length, type === Cmd.TRIM, fua, type === Cmd.WRITE_ZEROES && (flags & CmdFlag.NO_HOLE) !== 0, (err) => {
          if (err !== null) this.replyError(cookie, errnoFor(err.code), err.message);
          else this.replyOk(cookie);
          this.end();
        });
        return;
      }
      case Cmd.FLUSH:
        this.begin();
        target.flush((err) => {
          if (err !== null) this.replyError(cookie, errnoFor(err.code), err.message);
          else this.replyOk(cookie);
          this.end();
        });
        return;
      case Cmd.CACHE:
        if (!inRange) return this.replyError(cookie, NbdErrno.EINVAL, `range ${offset}+${length} beyond the end of the export (${sizeBytes})`);
        return this.replyOk(cookie);
      case Cmd.BLOCK_STATUS: {
        if (!this.structured || !this.metaContext) return this.replyError(cookie, NbdErrno.EINVAL, 'BLOCK_STATUS needs structured replies and the base:allocation context');
        if (length === 0 || !inRange) return this.replyError(cookie, NbdErrno.EINVAL, `block status ${offset}+${length} outside the export (${sizeBytes})`);
        this.begin();
        // Answering for less than asked is allowed; it bounds the reply of a fragmented volume.
        target.blockStatus(offset, Math.min(length, MAX_BLOCK_STATUS_BYTES), (err, extents) => {
          if (err !== null) this.replyError(cookie, errnoFor(err.code), err.message);
          else this.replyBlockStatus(cookie, extents, (flags & CmdFlag.REQ_ONE) !== 0);
          this.end();
        });
        return;
      }
      case Cmd.DISC:
        this.disconnectRequested = true;
        if (this.inflight === 0) this.drop('client disconnected (NBD_CMD_DISC)');
        return;
      default:
        return this.replyError(cookie, NbdErrno.EINVAL, `unknown command ${type}`);
    }
  }

  private replyOk(cookie: Buffer): void {
    if (this.phase === 'closed') return;
    this.out.write(this.structured ? structuredNone(cookie) : simpleReplyHeader(0, cookie));
  }

  private replyError(cookie: Buffer, errno: number, message: string): void {
    if (this.phase === 'closed') return;
    this.out.write(this.structured ? structuredError(cookie, errno, message) : simpleReplyHeader(errno, cookie));
  }

  private replyRead(cookie: Buffer, offset: number, data: Buffer): void {
    if (this.phase === 'closed') return;
    if (this.structured) {
      const header = Buffer.allocUnsafe(28);
      structuredHeader(header, ReplyFlag.DONE, ReplyType.OFFSET_DATA, cookie, 8 + data.length);
      writeU64(header, offset, 20);
      this.out.write(header);
    } else {
      this.out.write(simpleReplyHeader(0, cookie));
    }
    this.out.write(data, () => ioBuffers.release(data));
  }

  private replyBlockStatus(cookie: Buffer, extents: NbdExtent[], one: boolean): void {
    if (this.phase === 'closed') return;
    const list = one ? extents.slice(0, 1) : extents;
    const body = Buffer.allocUnsafe(4 + list.length * 8);
    body.writeUInt32BE(BASE_ALLOCATION_ID, 0);
    list.forEach((e, i) => {
      body.writeUInt32BE(e.length, 4 + i * 8);
      body.writeUInt32BE(e.data ? 0 : AllocationFlag.HOLE | AllocationFlag.ZERO, 8 + i * 8);
    });
    const header = Buffer.allocUnsafe(20);
    structuredHeader(header, ReplyFlag.DONE, ReplyType.BLOCK_STATUS, cookie, body.length);
    this.out.write(header);
    this.out.write(body);
  }
}

function infoString(type: number, text: string): Buffer {
  const bytes = Buffer.from(text);
  const body = Buffer.allocUnsafe(2 + bytes.length);
  body.writeUInt16BE(type, 0);
  bytes.copy(body, 2);
  return body;
}

function writeU64(buf: Buffer, value: number, at: number): void {
  buf.writeUInt32BE(Math.floor(value / 2 ** 32), at);
  buf.writeUInt32BE(value >>> 0, at + 4);
}

function readU64(buf: Buffer, at: number): number {
  return buf.readUInt32BE(at) * 2 ** 32 + buf.readUInt32BE(at + 4);
}
