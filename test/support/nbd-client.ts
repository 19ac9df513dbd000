/**
 * A small pipelined NBD client for tests (fixed newstyle, NBD_OPT_GO, simple replies): WRITE
 * (optionally FUA), WRITE_ZEROES, TRIM, FLUSH, READ. It shows exactly which request got which
 * answer: a request either gets the server's errno (0: success) or rejects with
 * NbdConnectionLost when the connection goes away first — its outcome is then unknown (it may or
 * may not have been applied). An error reply to NBD_OPT_GO is an NbdOptionError.
 */
import net from 'node:net';
import {
  NBDMAGIC, IHAVEOPT, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC, OPTION_REPLY_MAGIC_HI, ClientFlag, Opt, Rep, Info, Cmd, CmdFlag,
} from '../../src/frontend/nbd-protocol.ts';

export type NbdTarget = { host: string; port: number } | { path: string };

/** Parses nbd://HOST:PORT/NAME into a target and an export name. */
export function parseNbdUri(uri: string): { target: NbdTarget; name: string } {
  const m = /^nbd:\/\/([^/:]+):(\d+)\/(.+)$/.exec(uri);
  if (m === null) throw new Error(`not an nbd://HOST:PORT/NAME URI: ${uri}`);
  return { target: { host: m[1], port: Number(m[2]) }, name: decodeURIComponent(m[3]) };
}

export class NbdConnectionLost extends Error {}

/** Replies to NBD_OPT_GO that are errors (ERR_UNKNOWN and so on). */
export class NbdOptionError extends Error {
  readonly reply: number;
  constructor(reply: number, message: string) {
    super(message);
    this.reply = reply;
  }
}

interface Pending {
  cmd: number;
  length: number;
  resolve: (r: { errno: number; data: Buffer }) => void;
  reject: (err: Error) => void;
}

const MAX_PENDING = 1024;

export class NbdClient {
  readonly sizeBytes: number;
  private readonly socket: net.Socket;
  private buf: Buffer;
  private readonly pending = new Map<bigint, Pending>();
  private nextCookie = 1n;
  private lost: NbdConnectionLost | null = null;
  readonly closed: Promise<void>;

  private constructor(socket: net.Socket, sizeBytes: number, rest: Buffer) {
    this.socket = socket;
    this.sizeBytes = sizeBytes;
    this.buf = rest;
    this.closed = new Promise((resolve) => {
      socket.once('close', () => {
        this.lost ??= new NbdConnectionLost('NBD connection closed (by the server, or lost)');
        for (const p of this.pending.values()) p.reject(this.lost);
        this.pending.clear();
        resolve();
      });
    });
    socket.on('error', () => {});
    socket.on('data', (d: Buffer) => {
      this.buf = this.buf.length === 0 ? d : Buffer.concat([this.buf, d]);
      this.parse();
    });
    this.parse();
  }

  get isClosed(): boolean {
    return this.lost !== null;
  }

  get inflight(): number {
    return this.pending.size;
  }

  static connect(target: NbdTarget, name: string, timeoutMs = 10_000): Promise<NbdClient> {
    return new Promise((resolve, reject) => {
      const socket = 'path' in target ? net.connect({ path: target.path }) : net.connect({ host: target.host, port: target.port, noDelay: true });
      let buf = Buffer.alloc(0);
      let greeted = false;
      let sizeBytes = -1;
      let settled = false;
      const fail = (err: Error): void => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        socket.destroy();
        reject(err);
      };
      const timer = setTimeout(() => fail(new NbdConnectionLost(`NBD handshake for ${name} timed out`)), timeoutMs);
      socket.on('error', (err) => fail(new NbdConnectionLost(`NBD connect: ${err.message}`)));
      socket.on('close', () => fail(new NbdConnectionLost(`closed during the NBD handshake for ${name}`)));
      const onData = (d: Buffer): void => {
        buf = Buffer.concat([buf, d]);
        if (!greeted) {
          if (buf.length < 18) return;
          if (!buf.subarray(0, 8).equals(NBDMAGIC) || !buf.subarray(8, 16).equals(IHAVEOPT)) return fail(new Error('bad NBD greeting'));
          buf = buf.subarray(18);
          greeted = true;
          const flags = Buffer.alloc(4);
          flags.writeUInt32BE(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES);
          const nameBytes = Buffer.from(name);
          const data = Buffer.alloc(4 + nameBytes.length + 2);
          data.writeUInt32BE(nameBytes.length, 0);
          nameBytes.copy(data, 4);
          const header = Buffer.alloc(16);
          IHAVEOPT.copy(header, 0);
          header.writeUInt32BE(Opt.GO, 8);
          header.writeUInt32BE(data.length, 12);
          socket.write(Buffer.concat([flags, header, data]));
        }
        for (;;) {
          if (buf.length < 20) return;
          if (buf.readUInt32BE(0) !== OPTION_REPLY_MAGIC_HI) return fail(new Error('bad NBD option reply magic'));
          const type = buf.readUInt32BE(12);
          const length = buf.readUInt32BE(16);
          if (buf.length < 20 + length) return;
          const body = buf.subarray(20, 20 + length);
          buf = buf.subarray(20 + length);
          // An unknown export (the frontend restarting, the export not yet re-added): the fault
          // writer retries any failed connect.
          if (type >= 2 ** 31) return fail(new NbdOptionError(type, `NBD_OPT_GO ${name}: error reply ${type - 2 ** 31} ${body.toString()}`));
          if (type === Rep.INFO && body.readUInt16BE(0) === Info.EXPORT) sizeBytes = Number(body.readBigUInt64BE(2));
          if (type === Rep.ACK) {
            if (sizeBytes < 0) return fail(new Error('no export info before ACK'));
            settled = true;
            clearTimeout(timer);
            socket.removeAllListeners('error');
            socket.removeAllListeners('close');
            socket.off('data', onData);
            return resolve(new NbdClient(socket, sizeBytes, buf));
          }
        }
      };
      socket.on('data', onData);
    });
  }

  private parse(): void {
    for (;;) {
      if (this.buf.length < 16) return;
      if (this.buf.readUInt32BE(0) !== SIMPLE_REPLY_MAGIC) {
        this.lost ??= new NbdConnectionLost(`bad NBD reply magic ${this.buf.subarray(0, 4).toString('hex')}`);
        this.socket.destroy();
        return;
      }
      const errno = this.buf.readUInt32BE(4);
      const cookie = this.buf.readBigUInt64BE(8);
      const p = this.pending.get(cookie);
      if (p === undefined) {
        this.lost ??= new NbdConnectionLost(`NBD reply for unknown cookie ${cookie}`);
        this.socket.destroy();
        return;
      }
      const dataBytes = p.cmd === Cmd.READ && errno === 0 ? p.length : 0;
      if (this.buf.length < 16 + dataBytes) return;
      const data = Buffer.from(this.buf.subarray(16, 16 + dataBytes));
      this.buf = this.buf.subarray(16 + dataBytes);
      this.pending.delete(cookie);
      p.resolve({ errno, data });
    }
  }

  private request(cmd: number, flags: number, offset: number, length: number, payload?: Buffer): Promise<{ errno: number; data: Buffer }> {
    if (this.lost !== null) return Promise.reject(this.lost);
    if (this.pending.size >= MAX_PENDING) return Promise.reject(new Error(`more than ${MAX_PENDING} NBD requests in flight`));
    const cookie = this.nextCookie++;
    const header = Buffer.alloc(28);
    header.writeUInt32BE(REQUEST_MAGIC, 0);
    header.writeUInt16BE(flags, 4);
    header.writeUInt16BE(cmd, 6);
    header.writeBigUInt64BE(cookie, 8);
    header.writeBigUInt64BE(BigInt(offset), 16);
    header.writeUInt32BE(length, 24);
    return new Promise((resolve, reject) => {
      this.pending.set(cookie, { cmd, length, resolve, reject });
      this.socket.write(payload === undefined ? header : Buffer.concat([header, payload]));
    });
  }

  async write(offset: number, data: Buffer, options: { fua?: boolean } = {}): Promise<number> {
    return (await this.request(Cmd.WRITE, options.fua ? CmdFlag.FUA : 0, offset, data.length, data)).errno;
  }

  async writeZeroes(offset: number, length: number, options: { fua?: boolean } = {}): Promise<number> {
    return (await this.request(Cmd.WRITE_ZEROES, options.fua ? CmdFlag.FUA : 0, offset, length)).errno;
  }

  async trim(offset: number, length: number): Promise<number> {
    return (await this.request(Cmd.TRIM, 0, offset, length)).errno;
  }

  async flush(): Promise<number> {
    return (await this.request(Cmd.FLUSH, 0, 0, 0)).errno;
  }

  read(offset: number, length: number): Promise<{ errno: number; data: Buffer }> {
    return this.request(Cmd.READ, 0, offset, length);
  }

  /** NBD_CMD_DISC, then waits (bounded) for the server to close. */
  async disconnect(timeoutMs = 5000): Promise<void> {
    if (this.lost === null) {
      const header = Buffer.alloc(28);
      header.writeUInt32BE(REQUEST_MAGIC, 0);
      header.writeUInt16BE(Cmd.DISC, 6);
      this.socket.write(header);
    }
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([this.closed, new Promise((r) => (timer = setTimeout(r, timeoutMs)))]);
    clearTimeout(timer);
    this.socket.destroy();
  }

  destroy(): void {
    this.socket.destroy();
  }
}
