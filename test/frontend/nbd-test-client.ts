/**
 * A small pipelined NBD client for tests (fixed newstyle, OPT_GO, simple replies): it shows
 * exactly which requests got which answer, and when the server closed the connection.
 */
import net from 'node:net';
import {
  NBDMAGIC, IHAVEOPT, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC, OPTION_REPLY_MAGIC_HI, ClientFlag, Opt, Rep, Info, Cmd,
} from '../../src/frontend/nbd-protocol.ts';

export type NbdTarget = { host: string; port: number } | { path: string };

/** Replies to NBD_OPT_GO that are errors (ERR_UNKNOWN and so on). */
export class NbdOptionError extends Error {
  readonly reply: number;
  constructor(reply: number, message: string) {
    super(message);
    this.reply = reply;
  }
}

interface Pending {
  type: number;
  length: number;
  resolve: (r: { errno: number; data: Buffer }) => void;
  reject: (err: Error) => void;
}

export class NbdTestClient {
  readonly sizeBytes: number;
  private readonly socket: net.Socket;
  private buf: Buffer;
  private readonly pending = new Map<bigint, Pending>();
  private nextCookie = 1n;
  private closedError: Error | null = null;
  readonly closed: Promise<void>;

  private constructor(socket: net.Socket, sizeBytes: number, rest: Buffer) {
    this.socket = socket;
    this.sizeBytes = sizeBytes;
    this.buf = rest;
    socket.on('data', (d: Buffer) => {
      this.buf = this.buf.length === 0 ? d : Buffer.concat([this.buf, d]);
      this.parse();
    });
    this.closed = new Promise((resolve) =>
      socket.once('close', () => {
        this.closedError = new Error('server closed the connection');
        for (const p of this.pending.values()) p.reject(this.closedError);
        this.pending.clear();
        resolve();
      }),
    );
    socket.on('error', () => {});
    this.parse();
  }

  get isClosed(): boolean {
    return this.closedError !== null;
  }

  get inflight(): number {
    return this.pending.size;
  }

  /** Connects and negotiates export `name` with NBD_OPT_GO. */
  static connect(target: NbdTarget, name: string, timeoutMs = 10_000): Promise<NbdTestClient> {
    return new Promise((resolve, reject) => {
      const socket = 'path' in target ? net.connect({ path: target.path }) : net.connect({ host: target.host, port: target.port });
      let buf = Buffer.alloc(0);
      let step: 'greeting' | 'go' = 'greeting';
      let sizeBytes = -1;
      const timer = setTimeout(() => fail(new Error(`NBD handshake for ${name} timed out`)), timeoutMs);
      const fail = (err: Error): void => {
        clearTimeout(timer);
        socket.destroy();
        reject(err);
      };
      socket.once('error', fail);
      socket.once('close', () => fail(new Error(`server closed the connection during the handshake for ${name}`)));
      socket.on('data', function onData(d: Buffer) {
        buf = Buffer.concat([buf, d]);
        if (step === 'greeting') {
          if (buf.length < 18) return;
          if (!buf.subarray(0, 8).equals(NBDMAGIC) || !buf.subarray(8, 16).equals(IHAVEOPT)) return fail(new Error('bad greeting'));
          buf = buf.subarray(18);
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
          step = 'go';
        }
        for (;;) {
          if (buf.length < 20) return;
          if (buf.readUInt32BE(0) !== OPTION_REPLY_MAGIC_HI) return fail(new Error('bad option reply magic'));
          const type = buf.readUInt32BE(12);
          const length = buf.readUInt32BE(16);
          if (buf.length < 20 + length) return;
          const body = buf.subarray(20, 20 + length);
          buf = buf.subarray(20 + length);
          if (type >= 2 ** 31) return fail(new NbdOptionError(type, `NBD_OPT_GO ${name}: error reply ${type - 2 ** 31} ${body.toString()}`));
          if (type === Rep.INFO && body.readUInt16BE(0) === Info.EXPORT) sizeBytes = Number(body.readBigUInt64BE(2));
          if (type === Rep.ACK) {
            clearTimeout(timer);
            socket.removeAllListeners('error');
            socket.removeAllListeners('close');
            socket.off('data', onData);
            if (sizeBytes < 0) return reject(new Error('no export info before ACK'));
            return resolve(new NbdTestClient(socket, sizeBytes, buf));
          }
        }
      });
    });
  }

  private parse(): void {
    for (;;) {
      if (this.buf.length < 16) return;
      if (this.buf.readUInt32BE(0) !== SIMPLE_REPLY_MAGIC) throw new Error(`bad reply magic ${this.buf.subarray(0, 4).toString('hex')}`);
      const errno = this.buf.readUInt32BE(4);
      const cookie = this.buf.readBigUInt64BE(8);
      const p = this.pending.get(cookie);
      if (p === undefined) throw new Error(`reply for unknown cookie ${cookie}`);
      const dataBytes = p.type === Cmd.READ && errno === 0 ? p.length : 0;
      if (this.buf.length < 16 + dataBytes) return;
      const data = Buffer.from(this.buf.subarray(16, 16 + dataBytes));
      this.buf = this.buf.subarray(16 + dataBytes);
      this.pending.delete(cookie);
      p.resolve({ errno, data });
    }
  }

  private request(type: number, offset: number, length: number, payload?: Buffer): Promise<{ errno: number; data: Buffer }> {
    if (this.closedError !== null) return Promise.reject(this.closedError);
    const cookie = this.nextCookie++;
    const header = Buffer.alloc(28);
    header.writeUInt32BE(REQUEST_MAGIC, 0);
    header.writeUInt16BE(0, 4);
    header.writeUInt16BE(type, 6);
    header.writeBigUInt64BE(cookie, 8);
    header.writeBigUInt64BE(BigInt(offset), 16);
    header.writeUInt32BE(length, 24);
    return new Promise((resolve, reject) => {
      this.pending.set(cookie, { type, length, resolve, reject });
      this.socket.write(payload === undefined ? header : Buffer.concat([header, payload]));
    });
  }

  /** Resolves with the NBD errno (0: success). */
  async write(offset: number, data: Buffer): Promise<number> {
    return (await this.request(Cmd.WRITE, offset, data.length, data)).errno;
  }

  read(offset: number, length: number): Promise<{ errno: number; data: Buffer }> {
    return this.request(Cmd.READ, offset, length);
  }

  async flush(): Promise<number> {
    return (await this.request(Cmd.FLUSH, 0, 0)).errno;
  }

  /** NBD_CMD_DISC, then waits for the server to close. */
  async disconnect(): Promise<void> {
    if (this.closedError === null) {
      const header = Buffer.alloc(28);
      header.writeUInt32BE(REQUEST_MAGIC, 0);
      header.writeUInt16BE(Cmd.DISC, 6);
      this.socket.write(header);
    }
    await this.closed;
  }

  destroy(): void {
    this.socket.destroy();
  }
}
