/**
 * The frontend's side of the frontend <-> engine socket. Keeps the table of requests it has
 * forwarded and not yet answered. When the engine connection drops, those requests are held,
 * the link reconnects (the supervisor restarts the engine), and they are sent again: reads and
 * writes are idempotent at block level, so the client sees a delay, not an error. Requests
 * still held after `holdTimeoutMs` fail with EIO.
 *
 * The size served is the engine's INFO at connect time; `refreshSize` reads it again after the
 * engine was expanded online (new NBD connections see the new size).
 */
import { ZebuError, ErrorCode } from '../errors.ts';
import { ReplicaClient } from '../protocol/client.ts';
import { Op, RequestFlag, decodeExtents } from '../protocol/frames.ts';
import type { NbdExport, NbdExtent } from './nbd-server.ts';

export interface EngineLinkOptions {
  name: string;
  socketPath: string;
  secret: Buffer;
  requestTimeoutMs?: number;
  holdTimeoutMs?: number;
  /** Bound on one connect + authenticate attempt. */
  connectTimeoutMs?: number;
  log?: (event: Record<string, unknown>) => void;
}

interface Forwarded {
  op: number;
  flags: number;
  offset: number;
  length: number;
  payload: Buffer;
  callback: (err: ZebuError | null, data: Buffer) => void;
  sinceMs: number;
}

const EMPTY = Buffer.alloc(0);

function sizeFromInfo(info: unknown, socketPath: string): number {
  const sizeBytes = (info as { sizeBytes?: unknown } | null)?.sizeBytes;
  if (typeof sizeBytes !== 'number' || !Number.isSafeInteger(sizeBytes) || sizeBytes < 0) {
    throw new ZebuError(ErrorCode.PROTOCOL, `engine at ${socketPath} reported no valid sizeBytes in INFO`);
  }
  return sizeBytes;
}
const MAX_TABLE = 65536;

export class EngineLink implements NbdExport {
  readonly name: string;
  readonly description: string;
  sizeBytes = 0;
  private readonly options: Required<EngineLinkOptions>;
  private client: ReplicaClient | null = null;
  private readonly table = new Set<Forwarded>();
  private held: Forwarded[] = [];
  private reconnecting = false;
  private closed = false;
  private holdTimer: NodeJS.Timeout | null = null;

  private constructor(options: EngineLinkOptions) {
    this.options = { requestTimeoutMs: 60_000, holdTimeoutMs: 60_000, connectTimeoutMs: 5000, log: () => {}, ...options };
    this.name = options.name;
    this.description = `Zebu volume ${options.name}`;
  }

  static async connect(options: EngineLinkOptions): Promise<EngineLink> {
    const link = new EngineLink(options);
    await link.connectOnce();
    return link;
  }

  get outstanding(): number {
    return this.table.size;
  }

  get socketPath(): string {
    return this.options.socketPath;
  }

  /** True while a connection to the engine is up (false while it restarts). */
  get engineConnected(): boolean {
    return this.client !== null;
  }

  /** Reads the engine's size again (after an online expand); returns it. */
  async refreshSize(): Promise<number> {
    const client = this.client;
    if (this.closed) throw new ZebuError(ErrorCode.CLOSED, `export ${this.name} is closed`);
    if (client === null) throw new ZebuError(ErrorCode.DISCONNECTED, `engine of export ${this.name} is not connected (restarting?); try again`);
    const sizeBytes = sizeFromInfo(await client.info(), this.options.socketPath);
    if (sizeBytes !== this.sizeBytes) this.options.log({ event: 'export-size-changed', fromBytes: this.sizeBytes, toBytes: sizeBytes });
    this.sizeBytes = sizeBytes;
    return sizeBytes;
  }

  private async connectOnce(): Promise<void> {
    const client = await ReplicaClient.connect({
      path: this.options.socketPath,
      peerLabel: 'engine',
      secret: this.options.secret,
      requestTimeoutMs: this.options.requestTimeoutMs,
      connectTimeoutMs: this.options.connectTimeoutMs,
    });
    let sizeBytes: number;
    try {
      sizeBytes = sizeFromInfo(await client.info(), this.options.socketPath);
    } catch (err) {
      client.close();
      throw err;
    }
    if (this.closed) {
      // Closed while this attempt was under way: nothing may be left connected.
      client.close();
      throw new ZebuError(ErrorCode.CLOSED, `export ${this.name} is closed`);
    }
    this.sizeBytes = sizeBytes;
    this.client = client;
    client.onClose((err) => {
      if (this.client !== client) return; // already replaced (see sendNow)
      this.client = null;
      if (!this.closed) {
        this.options.log({ event: 'engine-disconnected', reason: err.message, outstanding: this.table.size });
        void this.reconnect();
      }
    });
  }

  private async reconnect(): Promise<void> {
    if (this.reconnecting || this.closed) return;
    this.reconnecting = true;
    this.holdTimer ??= setInterval(() => this.expireHeld(), 1000);
    let delayMs = 50;
    while (!this.closed && this.client === null) {
      try {
        await this.connectOnce();
      } catch {
        await new Promise((r) => setTimeout(r, delayMs));
        delayMs = Math.min(1000, delayMs * 2);
      }
    }
    this.reconnecting = false;
    if (this.client !== null) {
      this.options.log({ event: 'engine-reconnected', reissued: this.held.length });
      const held = this.held;
      this.held = [];
      for (const f of held) this.sendNow(f);
    }
    if (this.held.length === 0 && this.holdTimer !== null) {
      clearInterval(this.holdTimer);
      this.holdTimer = null;
    }
  }

  private expireHeld(): void {
    const now = Date.now();
    const keep: Forwarded[] = [];
    for (const f of this.held) {
      if (now - f.sinceMs < this.options.holdTimeoutMs) {
        keep.push(f);
        continue;
      }
      this.table.delete(f);
      f.callback(new ZebuError(ErrorCode.EIO, `engine of volume ${this.name} unreachable for ${this.options.holdTimeoutMs} ms`), EMPTY);
    }
    this.held = keep;
  }

  private forward(op: number, flags: number, offset: number, length: number, payload: Buffer, callback: Forwarded['callback']): void {
    if (this.closed) return callback(new ZebuError(ErrorCode.CLOSED, 'frontend is stopping'), EMPTY);
    if (this.table.size >= MAX_TABLE) return callback(new ZebuError(ErrorCode.BUSY, 'too many requests outstanding'), EMPTY);
    const f: Forwarded = { op, flags, offset, length, payload, callback, sinceMs: Date.now() };
    this.table.add(f);
    this.sendNow(f);
  }

  private sendNow(f: Forwarded): void {
    const client = this.client;
    if (client === null) {
      this.held.push(f);
      return;
    }
    client.send(f.op, f.flags, f.offset, f.length, f.payload, (err, data) => {
      if (err !== null && (err.code === ErrorCode.DISCONNECTED || err.code === ErrorCode.CLOSED) && !this.closed) {
        // The engine went away with this request unanswered: hold it for the next engine.
        if (this.client === client) {
          this.client = null;
          this.options.log({ event: 'engine-disconnected', reason: err.message, outstanding: this.table.size });
        }
        this.held.push(f);
        void this.reconnect();
        return;
      }
      this.table.delete(f);
      f.callback(err, data);
    });
  }

  read(offset: number, length: number, cb: (err: ZebuError | null, data: Buffer) => void): void {
    this.forward(Op.READ, 0, offset, length, EMPTY, cb);
  }
  write(offset: number, data: Buffer, fua: boolean, cb: (err: ZebuError | null) => void): void {
    this.forward(Op.WRITE, fua ? RequestFlag.FUA : 0, offset, data.length, data, cb);
  }
  zero(offset: number, length: number, trim: boolean, fua: boolean, cb: (err: ZebuError | null) => void): void {
    this.forward(trim ? Op.TRIM : Op.WRITE_ZEROES, fua ? RequestFlag.FUA : 0, offset, length, EMPTY, cb);
  }
  flush(cb: (err: ZebuError | null) => void): void {
    this.forward(Op.FLUSH, 0, 0, 0, EMPTY, cb);
  }
  blockStatus(offset: number, length: number, cb: (err: ZebuError | null, extents: NbdExtent[]) => void): void {
    this.forward(Op.BLOCK_STATUS, 0, offset, length, EMPTY, (err, data) => {
      if (err !== null) return cb(err, []);
      try {
        cb(null, decodeExtents(data));
      } catch (e) {
        cb(new ZebuError(ErrorCode.EIO, `bad block status from engine: ${(e as Error).message}`), []);
      }
    });
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    if (this.holdTimer !== null) clearInterval(this.holdTimer);
    for (const f of this.held) f.callback(new ZebuError(ErrorCode.CLOSED, 'frontend is stopping'), EMPTY);
    this.held = [];
    this.client?.close();
  }
}
