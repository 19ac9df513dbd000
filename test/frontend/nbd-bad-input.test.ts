/**
 * Malformed NBD input, byte by byte (NetworkBlockDevice/nbd doc/proto.md). Part one drives an
 * in-process NbdServer over a fake in-memory export with raw sockets and checks the exact reply
 * bytes; part two sends some of the same input to a real `zebu volume serve` (TCP and UNIX
 * socket) and then runs qemu-io against it. After every case the server must still serve.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import { NbdServer, type NbdExport, type NbdExtent, type ExportRegistry } from '../../src/frontend/nbd-server.ts';
import {
  NBDMAGIC, IHAVEOPT, OPTION_REPLY_MAGIC_HI, OPTION_REPLY_MAGIC_LO, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC,
  HandshakeFlag, ClientFlag, Opt, Rep, Info, TransmissionFlag, Cmd, CmdFlag, ReplyType, ReplyFlag, NbdErrno, AllocationFlag,
} from '../../src/frontend/nbd-protocol.ts';
import type { ZebuError } from '../../src/errors.ts';
import { tempDir, pattern, testSeed } from '../support/tmp.ts';
import { startVolume, run } from '../support/volume-cluster.ts';

// ---- a raw NBD peer -----------------------------------------------------------------------------

type Target = { port: number; host?: string } | { path: string };

class Peer {
  readonly socket: net.Socket;
  private buf: Buffer = Buffer.alloc(0);
  private wake: (() => void) | null = null;
  ended = false;
  readonly closed: Promise<void>;

  private constructor(socket: net.Socket) {
    this.socket = socket;
    socket.on('data', (d: Buffer) => {
      this.buf = this.buf.length === 0 ? d : Buffer.concat([this.buf, d]);
      this.notify();
    });
    socket.on('end', () => {
      this.ended = true;
      this.notify();
    });
    socket.on('error', () => {});
    this.closed = new Promise((resolve) =>
      socket.once('close', () => {
        this.ended = true;
        this.notify();
        resolve();
      }),
    );
  }

  static connect(target: Target): Promise<Peer> {
    return new Promise((resolve, reject) => {
      const socket = 'path' in target ? net.connect({ path: target.path }) : net.connect({ port: target.port, host: target.host ?? '127.0.0.1' });
      socket.setNoDelay?.(true);
      socket.once('error', reject);
      socket.once('connect', () => {
        socket.off('error', reject);
        resolve(new Peer(socket));
      });
    });
  }

  private notify(): void {
    const w = this.wake;
    this.wake = null;
    w?.();
  }

  get pending(): number {
    return this.buf.length;
  }

  send(...parts: Buffer[]): void {
    for (const p of parts) this.socket.write(p);
  }

  /** Exactly n bytes from the server; fails if the server closes first or nothing comes in time. */
  async read(n: number, timeoutMs = 5000): Promise<Buffer> {
    const deadline = Date.now() + timeoutMs;
    while (this.buf.length < n) {
      if (this.ended) throw new Error(`server closed the connection with ${this.buf.length} of ${n} awaited bytes`);
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`timed out waiting for ${n} bytes (have ${this.buf.length})`);
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, left);
        this.wake = () => {
          clearTimeout(timer);
          resolve();
        };
      });
    }
    const out = this.buf.subarray(0, n);
    this.buf = this.buf.subarray(n);
    return out;
  }

  /** The server closes the connection without sending anything more. */
  async expectClosed(why: string, timeoutMs = 3000): Promise<void> {
    const timer = new Promise<'timeout'>((resolve) => setTimeout(() => resolve('timeout'), timeoutMs).unref());
    const r = await Promise.race([this.closed.then(() => 'closed' as const), timer]);
    this.socket.destroy();
    assert.equal(r, 'closed', `server should disconnect: ${why}`);
    assert.equal(this.buf.length, 0, `no reply bytes before the disconnect (${why}): ${this.buf.subarray(0, 64).toString('hex')}`);
  }

  destroy(): void {
    this.socket.destroy();
  }
}

// ---- encoders / decoders ------------------------------------------------------------------------

function u16(v: number): Buffer {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(v);
  return b;
}
function u32(v: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(v);
  return b;
}
function u64(v: bigint | number): Buffer {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(BigInt(v));
  return b;
}

function option(opt: number, data: Buffer = Buffer.alloc(0), declaredLength = data.length): Buffer {
  return Buffer.concat([IHAVEOPT, u32(opt), u32(declaredLength), data]);
}

function infoData(name: string, requests: number[] = []): Buffer {
  const n = Buffer.from(name);
  return Buffer.concat([u32(n.length), n, u16(requests.length), ...requests.map(u16)]);
}

function metaData(name: string, queries: string[]): Buffer {
  const n = Buffer.from(name);
  return Buffer.concat([u32(n.length), n, u32(queries.length), ...queries.flatMap((q) => [u32(Buffer.byteLength(q)), Buffer.from(q)])]);
}

interface OptReply {
  option: number;
  type: number;
  data: Buffer;
}

async function readOptReply(p: Peer): Promise<OptReply> {
  const h = await p.read(20);
  assert.equal(h.readUInt32BE(0), OPTION_REPLY_MAGIC_HI, 'option reply magic');
  assert.equal(h.readUInt32BE(4), OPTION_REPLY_MAGIC_LO, 'option reply magic');
  const length = h.readUInt32BE(16);
  return { option: h.readUInt32BE(8), type: h.readUInt32BE(12), data: await p.read(length) };
}

async function expectOptReply(p: Peer, opt: number, type: number): Promise<Buffer> {
  const r = await readOptReply(p);
  assert.equal(r.option, opt, 'option echoed');
  assert.equal(r.type >>> 0, type >>> 0, `reply type for option ${opt}: got 0x${r.type.toString(16)} ${r.data.toString()}`);
  return r.data;
}

/** The exact 20 bytes of an option ACK. */
async function expectAck(p: Peer, opt: number): Promise<void> {
  const bytes = await p.read(20);
  assert.deepEqual(bytes, Buffer.concat([u32(OPTION_REPLY_MAGIC_HI), u32(OPTION_REPLY_MAGIC_LO), u32(opt), u32(Rep.ACK), u32(0)]));
}

let cookieCounter = 1n;
function nextCookie(): Buffer {
  return u64(cookieCounter++ * 0x0101010101n);
}

function request(type: number, cookie: Buffer, offset: bigint | number, length: number, flags = 0): Buffer {
  return Buffer.concat([u32(REQUEST_MAGIC), u16(flags), u16(type), cookie, u64(offset), u32(length)]);
}

const GREETING = Buffer.concat([NBDMAGIC, IHAVEOPT, u16(HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES)]);

/** Connects, checks the greeting byte for byte, sends the client flags. */
async function open(target: Target, clientFlags = ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES): Promise<Peer> {
  const p = await Peer.connect(target);
  assert.deepEqual(await p.read(18), GREETING, 'greeting: NBDMAGIC IHAVEOPT FIXED_NEWSTYLE|NO_ZEROES');
  p.send(u32(clientFlags));
  return p;
}

interface Session {
  p: Peer;
  structured: boolean;
  contextId: number | null;
  size: number;
}

/** Option haggling up to transmission: optional STRUCTURED_REPLY and base:allocation, then GO. */
async function session(target: Target, name: string, o: { structured?: boolean; meta?: boolean } = {}): Promise<Session> {
  const p = await open(target);
  const structured = o.structured ?? false;
  let contextId: number | null = null;
  if (structured) {
    p.send(option(Opt.STRUCTURED_REPLY));
    await expectAck(p, Opt.STRUCTURED_REPLY);
  }
  if (o.meta) {
    p.send(option(Opt.SET_META_CONTEXT, metaData(name, ['base:allocation'])));
    const ctx = await expectOptReply(p, Opt.SET_META_CONTEXT, Rep.META_CONTEXT);
    assert.equal(ctx.subarray(4).toString(), 'base:allocation');
    contextId = ctx.readUInt32BE(0);
    assert.notEqual(contextId, 0);
    await expectAck(p, Opt.SET_META_CONTEXT);
  }
  p.send(option(Opt.GO, infoData(name)));
  let size = -1;
  for (;;) {
    const r = await readOptReply(p);
    assert.equal(r.option, Opt.GO);
    if (r.type === Rep.ACK) break;
    assert.equal(r.type, Rep.INFO, `GO reply: 0x${r.type.toString(16)} ${r.data.toString()}`);
    if (r.data.readUInt16BE(0) === Info.EXPORT) size = Number(r.data.readBigUInt64BE(2));
  }
  assert.ok(size > 0, 'GO gave NBD_INFO_EXPORT');
  return { p, structured, contextId, size };
}

interface Chunk {
  flags: number;
  type: number;
  cookie: Buffer;
  payload: Buffer;
}

async function readChunk(p: Peer): Promise<Chunk> {
  const h = await p.read(20);
  assert.equal(h.readUInt32BE(0), STRUCTURED_REPLY_MAGIC, `structured reply magic (got ${h.toString('hex')})`);
  return { flags: h.readUInt16BE(4), type: h.readUInt16BE(6), cookie: Buffer.from(h.subarray(8, 16)), payload: await p.read(h.readUInt32BE(16)) };
}

/** Expects the one reply of `cookie` to be the error `errno`, in the session's reply style, exactly. */
async function expectError(s: Session, cookie: Buffer, errno: number): Promise<void> {
  if (!s.structured) {
    assert.deepEqual(await s.p.read(16), Buffer.concat([u32(SIMPLE_REPLY_MAGIC), u32(errno), cookie]), `simple reply with errno ${errno}`);
    return;
  }
  const c = await readChunk(s.p);
  assert.equal(c.flags, ReplyFlag.DONE);
  assert.equal(c.type, ReplyType.ERROR, `ERROR chunk (got type ${c.type})`);
  assert.deepEqual(c.cookie, cookie);
  assert.ok(c.payload.length >= 6);
  assert.equal(c.payload.readUInt32BE(0), errno, `errno in the ERROR chunk: ${c.payload.subarray(6).toString()}`);
  assert.equal(c.payload.readUInt16BE(4), c.payload.length - 6, 'message length');
}

async function expectOk(s: Session, cookie: Buffer): Promise<void> {
  if (!s.structured) {
    assert.deepEqual(await s.p.read(16), Buffer.concat([u32(SIMPLE_REPLY_MAGIC), u32(0), cookie]));
    return;
  }
  const c = await readChunk(s.p);
  assert.deepEqual(c, { flags: ReplyFlag.DONE, type: ReplyType.NONE, cookie, payload: Buffer.alloc(0) });
}

async function expectReadData(s: Session, cookie: Buffer, offset: number, length: number): Promise<Buffer> {
  if (!s.structured) {
    assert.deepEqual(await s.p.read(16), Buffer.concat([u32(SIMPLE_REPLY_MAGIC), u32(0), cookie]), 'simple read reply');
    return s.p.read(length);
  }
  const c = await readChunk(s.p);
  assert.equal(c.type, ReplyType.OFFSET_DATA, `OFFSET_DATA chunk (got ${c.type}: ${c.payload.subarray(6).toString()})`);
  assert.equal(c.flags, ReplyFlag.DONE);
  assert.deepEqual(c.cookie, cookie);
  assert.equal(c.payload.length, 8 + length);
  assert.equal(Number(c.payload.readBigUInt64BE(0)), offset);
  return c.payload.subarray(8);
}

async function readOn(s: Session, offset: number, length: number): Promise<Buffer> {
  const cookie = nextCookie();
  s.p.send(request(Cmd.READ, cookie, offset, length));
  return expectReadData(s, cookie, offset, length);
}

async function disconnect(s: Session): Promise<void> {
  s.p.send(request(Cmd.DISC, nextCookie(), 0, 0));
  await s.p.expectClosed('NBD_CMD_DISC');
}

// ---- a fake in-memory export --------------------------------------------------------------------

const SIZE = 1024 * 1024;
const EXTENT = 64 * 1024;

class MemoryExport implements NbdExport {
  readonly name = 'disk';
  readonly description = 'in-memory test export';
  readonly sizeBytes = SIZE;
  readonly data = Buffer.alloc(SIZE);
  /** The next read is answered after this delay. */
  nextReadDelayMs = 0;
  writes = 0;

  constructor() {
    // Even 64 KiB extents hold data, odd ones are zero: block status has several extents.
    for (let off = 0; off < SIZE; off += 2 * EXTENT) pattern(off + 1, EXTENT).copy(this.data, off);
  }

  read(offset: number, length: number, cb: (err: ZebuError | null, data: Buffer) => void): void {
    assert.ok(offset >= 0 && length > 0 && offset + length <= SIZE, `export read ${offset}+${length} in range`);
    const out = Buffer.from(this.data.subarray(offset, offset + length));
    const delay = this.nextReadDelayMs;
    this.nextReadDelayMs = 0;
    if (delay > 0) setTimeout(() => cb(null, out), delay);
    else setImmediate(() => cb(null, out));
  }
  write(offset: number, data: Buffer, _fua: boolean, cb: (err: ZebuError | null) => void): void {
    assert.ok(offset >= 0 && offset + data.length <= SIZE, `export write ${offset}+${data.length} in range`);
    data.copy(this.data, offset);
    this.writes++;
    setImmediate(() => cb(null));
  }
  zero(offset: number, length: number, _trim: boolean, _fua: boolean, _noHole: boolean, cb: (err: ZebuError | null) => void): void {
    assert.ok(offset >= 0 && offset + length <= SIZE, `export zero ${offset}+${length} in range`);
    this.data.fill(0, offset, offset + length);
    setImmediate(() => cb(null));
  }
  flush(cb: (err: ZebuError | null) => void): void {
    setImmediate(() => cb(null));
  }
  blockStatus(offset: number, length: number, cb: (err: ZebuError | null, extents: NbdExtent[]) => void): void {
    assert.ok(offset >= 0 && length > 0 && offset + length <= SIZE, `export block status ${offset}+${length} in range`);
    const extents: NbdExtent[] = [];
    for (let at = offset; at < offset + length; ) {
      const end = Math.min(offset + length, (Math.floor(at / EXTENT) + 1) * EXTENT);
      const data = this.data.subarray(at, end).some((b) => b !== 0);
      const last = extents.at(-1);
      if (last !== undefined && last.data === data) last.length += end - at;
      else extents.push({ offset: at, length: end - at, data });
      at = end;
    }
    setImmediate(() => cb(null, extents));
  }
}

/** Seeded xorshift32. */
function rng(seed: number): (n: number) => number {
  let x = seed >>> 0 || 1;
  return (n: number) => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x % n;
  };
}

// ---- part one: in-process server ----------------------------------------------------------------

test('NBD server refuses bad input byte-exactly and keeps serving (in-process, fake export)', async (t) => {
  const exp = new MemoryExport();
  const registry: ExportRegistry = { get: (name) => (name === exp.name ? exp : null), list: () => [exp] };
  const events: Record<string, unknown>[] = [];
  const server = new NbdServer({ registry, log: (e) => events.push(e) });
  const { port } = await server.listenTcp('127.0.0.1', 0);
  const target: Target = { port };
  t.after(() => server.close(100));

  let servesCount = 0;
  /** A fresh connection negotiates and reads 4 KiB correctly. */
  const assertServes = async (): Promise<void> => {
    const s = await session(target, 'disk', { structured: servesCount++ % 2 === 1 });
    const off = ((servesCount * 7919) % (SIZE / 4096)) * 4096;
    assert.deepEqual(await readOn(s, off, 4096), exp.data.subarray(off, off + 4096), 'server serves a read after bad input');
    await disconnect(s);
  };
  const check = (name: string, fn: () => Promise<void>) =>
    t.test(name, async () => {
      await fn();
      await assertServes();
    });

  await check('greeting is exact and a good session works', async () => {
    const s = await session(target, 'disk');
    assert.deepEqual(await readOn(s, 0, 512), exp.data.subarray(0, 512));
    await disconnect(s);
  });

  // ---- handshake and options ----

  await check('client flags without FIXED_NEWSTYLE: disconnect', async () => {
    const p = await open(target, ClientFlag.NO_ZEROES);
    await p.expectClosed('client flags 0x2');
  });

  await check('unknown client flags: disconnect', async () => {
    const p = await open(target, ClientFlag.FIXED_NEWSTYLE | 0x80);
    await p.expectClosed('client flags 0x81');
  });

  await check('unknown option: ERR_UNSUP, haggling continues (LIST works)', async () => {
    const p = await open(target);
    p.send(option(99, Buffer.from('whatever')));
    await expectOptReply(p, 99, Rep.ERR_UNSUP);
    p.send(option(Opt.STARTTLS));
    await expectOptReply(p, Opt.STARTTLS, Rep.ERR_UNSUP);
    p.send(option(Opt.LIST));
    const server1 = await expectOptReply(p, Opt.LIST, Rep.SERVER);
    assert.deepEqual(server1, Buffer.concat([u32(4), Buffer.from('disk')]));
    await expectAck(p, Opt.LIST);
    p.send(option(Opt.LIST, Buffer.from('x')));
    await expectOptReply(p, Opt.LIST, Rep.ERR_INVALID);
    p.send(option(Opt.ABORT));
    await expectAck(p, Opt.ABORT);
    await p.expectClosed('after ABORT');
  });

  await check('option with bad magic: disconnect', async () => {
    const p = await open(target);
    p.send(Buffer.concat([Buffer.from('IHAVEOPX'), u32(Opt.LIST), u32(0)]));
    await p.expectClosed('bad option magic');
  });

  await check('option of 100 KiB: ERR_TOO_BIG, its data skipped, haggling continues', async () => {
    const p = await open(target);
    const big = Buffer.alloc(100 * 1024, 0xa5);
    // Data that would parse as an option if it were not skipped.
    option(Opt.ABORT).copy(big, 0);
    p.send(option(Opt.GO, big));
    await expectOptReply(p, Opt.GO, Rep.ERR_TOO_BIG);
    p.send(option(Opt.LIST));
    await expectOptReply(p, Opt.LIST, Rep.SERVER);
    await expectAck(p, Opt.LIST);
    p.destroy();
  });

  await check('option length 0xffffffff: disconnect', async () => {
    const p = await open(target);
    p.send(Buffer.concat([IHAVEOPT, u32(Opt.GO), u32(0xffffffff), Buffer.alloc(1000)]));
    await p.expectClosed('option of 4 GiB');
  });

  await check('INFO/GO with truncated or inconsistent data: ERR_INVALID', async () => {
    const p = await open(target);
    const bad: [string, number, Buffer][] = [
      ['empty', Opt.GO, Buffer.alloc(0)],
      ['3 bytes', Opt.INFO, Buffer.from([0, 0, 0])],
      ['name length beyond the option', Opt.GO, Buffer.concat([u32(100), Buffer.from('disk'), u16(0)])],
      ['name length 0xffffffff', Opt.INFO, Buffer.concat([u32(0xffffffff), Buffer.from('disk'), u16(0)])],
      ['no request count', Opt.GO, Buffer.concat([u32(4), Buffer.from('disk')])],
      ['count 2, one request', Opt.GO, Buffer.concat([u32(4), Buffer.from('disk'), u16(2), u16(Info.NAME)])],
      ['count 0xffff', Opt.INFO, Buffer.concat([u32(4), Buffer.from('disk'), u16(0xffff)])],
      ['trailing byte', Opt.GO, Buffer.concat([infoData('disk', [Info.NAME]), Buffer.from([7])])],
    ];
    for (const [why, opt, data] of bad) {
      p.send(option(opt, data));
      const r = await readOptReply(p);
      assert.equal(r.option, opt, why);
      assert.equal(r.type, Rep.ERR_INVALID, `${why}: 0x${r.type.toString(16)}`);
    }
    // Still haggling: a good INFO answers every field exactly.
    p.send(option(Opt.INFO, infoData('disk', [Info.NAME, Info.DESCRIPTION, Info.BLOCK_SIZE])));
    const infos: Buffer[] = [];
    for (;;) {
      const r = await readOptReply(p);
      assert.equal(r.option, Opt.INFO);
      if (r.type === Rep.ACK) break;
      assert.equal(r.type, Rep.INFO);
      infos.push(r.data);
    }
    const byType = new Map(infos.map((d) => [d.readUInt16BE(0), d]));
    const e = byType.get(Info.EXPORT)!;
    assert.equal(e.length, 12);
    assert.equal(Number(e.readBigUInt64BE(2)), SIZE);
    const flags = e.readUInt16BE(10);
    assert.ok(flags & TransmissionFlag.HAS_FLAGS && flags & TransmissionFlag.SEND_FLUSH && !(flags & TransmissionFlag.READ_ONLY));
    assert.deepEqual(byType.get(Info.NAME), Buffer.concat([u16(Info.NAME), Buffer.from('disk')]));
    assert.deepEqual(byType.get(Info.DESCRIPTION), Buffer.concat([u16(Info.DESCRIPTION), Buffer.from(exp.description)]));
    assert.deepEqual(byType.get(Info.BLOCK_SIZE), Buffer.concat([u16(Info.BLOCK_SIZE), u32(512), u32(4096), u32(32 * 1024 * 1024)]));
    p.destroy();
  });

  await check('GO for an unknown export: ERR_UNKNOWN, then GO for the real one works', async () => {
    const p = await open(target);
    p.send(option(Opt.GO, infoData('nope')));
    await expectOptReply(p, Opt.GO, Rep.ERR_UNKNOWN);
    p.send(option(Opt.INFO, infoData('disk\0')));
    await expectOptReply(p, Opt.INFO, Rep.ERR_UNKNOWN);
    p.send(option(Opt.GO, infoData('')));
    await expectOptReply(p, Opt.GO, Rep.INFO);
    await expectOptReply(p, Opt.GO, Rep.INFO);
    await expectAck(p, Opt.GO);
    const s: Session = { p, structured: false, contextId: null, size: SIZE };
    assert.deepEqual(await readOn(s, 4096, 100), exp.data.subarray(4096, 4196));
    await disconnect(s);
  });

  await check('meta contexts: SET before STRUCTURED_REPLY is ERR_INVALID, LIST "base:" gives base:allocation, bad data ERR_INVALID', async () => {
    const p = await open(target);
    p.send(option(Opt.SET_META_CONTEXT, metaData('disk', ['base:allocation'])));
    await expectOptReply(p, Opt.SET_META_CONTEXT, Rep.ERR_INVALID);
    p.send(option(Opt.LIST_META_CONTEXT, metaData('disk', ['base:'])));
    const ctx = await expectOptReply(p, Opt.LIST_META_CONTEXT, Rep.META_CONTEXT);
    assert.deepEqual(ctx, Buffer.concat([u32(0), Buffer.from('base:allocation')]));
    await expectAck(p, Opt.LIST_META_CONTEXT);
    p.send(option(Opt.LIST_META_CONTEXT, metaData('disk', ['qemu:dirty-bitmap:x'])));
    await expectAck(p, Opt.LIST_META_CONTEXT);
    p.send(option(Opt.LIST_META_CONTEXT, metaData('nope', ['base:'])));
    await expectOptReply(p, Opt.LIST_META_CONTEXT, Rep.ERR_UNKNOWN);
    const truncated = metaData('disk', ['base:allocation']).subarray(0, 20);
    p.send(option(Opt.LIST_META_CONTEXT, truncated));
    await expectOptReply(p, Opt.LIST_META_CONTEXT, Rep.ERR_INVALID);
    p.send(option(Opt.LIST_META_CONTEXT, Buffer.concat([u32(4), Buffer.from('disk'), u32(0xffffffff)])));
    await expectOptReply(p, Opt.LIST_META_CONTEXT, Rep.ERR_INVALID);
    p.send(option(Opt.STRUCTURED_REPLY, Buffer.from('x')));
    await expectOptReply(p, Opt.STRUCTURED_REPLY, Rep.ERR_INVALID);
    p.send(option(Opt.STRUCTURED_REPLY));
    await expectAck(p, Opt.STRUCTURED_REPLY);
    p.send(option(Opt.STRUCTURED_REPLY));
    await expectOptReply(p, Opt.STRUCTURED_REPLY, Rep.ERR_INVALID);
    p.send(option(Opt.SET_META_CONTEXT, Buffer.concat([metaData('disk', ['base:allocation']), Buffer.from([0])])));
    await expectOptReply(p, Opt.SET_META_CONTEXT, Rep.ERR_INVALID);
    p.send(option(Opt.ABORT));
    await expectAck(p, Opt.ABORT);
    await p.expectClosed('after ABORT');
  });

  await check('ABORT: ACK, then close', async () => {
    const p = await open(target);
    p.send(option(Opt.ABORT));
    await expectAck(p, Opt.ABORT);
    await p.expectClosed('after ABORT');
  });

  await check('EXPORT_NAME: unknown name disconnects; a known one gives 10 or 134 bytes', async () => {
    const p = await open(target);
    p.send(option(Opt.EXPORT_NAME, Buffer.from('nope')));
    await p.expectClosed('EXPORT_NAME of an unknown export');

    for (const noZeroes of [true, false]) {
      const q = await open(target, ClientFlag.FIXED_NEWSTYLE | (noZeroes ? ClientFlag.NO_ZEROES : 0));
      q.send(option(Opt.EXPORT_NAME, Buffer.from('disk')));
      const reply = await q.read(noZeroes ? 10 : 134);
      assert.equal(Number(reply.readBigUInt64BE(0)), SIZE);
      assert.ok(reply.readUInt16BE(8) & TransmissionFlag.HAS_FLAGS);
      if (!noZeroes) assert.deepEqual(reply.subarray(10), Buffer.alloc(124));
      const s: Session = { p: q, structured: false, contextId: null, size: SIZE };
      assert.deepEqual(await readOn(s, 0, 4096), exp.data.subarray(0, 4096));
      await disconnect(s);
    }
  });

  // ---- transmission ----

  for (const structured of [false, true]) {
    const mode = structured ? 'structured' : 'simple';

    await check(`${mode}: read beyond the end, read of length 0, read overflowing 2^64: EINVAL, then reads work`, async () => {
      const s = await session(target, 'disk', { structured });
      let c = nextCookie();
      s.p.send(request(Cmd.READ, c, SIZE - 4096, 8192));
      await expectError(s, c, NbdErrno.EINVAL);
      c = nextCookie();
      s.p.send(request(Cmd.READ, c, SIZE, 1));
      await expectError(s, c, NbdErrno.EINVAL);
      c = nextCookie();
      s.p.send(request(Cmd.READ, c, 0, 0));
      await expectError(s, c, NbdErrno.EINVAL);
      c = nextCookie();
      s.p.send(request(Cmd.READ, c, 0xffffffffffffff00n, 4096));
      await expectError(s, c, NbdErrno.EINVAL);
      assert.deepEqual(await readOn(s, SIZE - 4096, 4096), exp.data.subarray(SIZE - 4096));
      await disconnect(s);
    });

    await check(`${mode}: write beyond the end (payload sent): EINVAL, nothing written, connection works`, async () => {
      const s = await session(target, 'disk', { structured });
      const before = Buffer.from(exp.data.subarray(SIZE - 4096));
      const writes = exp.writes;
      const c = nextCookie();
      // The payload holds a valid request header: if it were parsed as a request, replies would differ.
      const payload = Buffer.alloc(4096, 0xee);
      request(Cmd.WRITE, nextCookie(), 0, 0).copy(payload, 0);
      s.p.send(request(Cmd.WRITE, c, SIZE - 100, 4096), payload);
      await expectError(s, c, NbdErrno.EINVAL);
      assert.equal(exp.writes, writes);
      assert.deepEqual(await readOn(s, SIZE - 4096, 4096), before);
      // A good write still works on this connection.
      const w = nextCookie();
      const good = pattern(structured ? 11 : 12, 1000);
      s.p.send(request(Cmd.WRITE, w, 5000, good.length), good);
      await expectOk(s, w);
      assert.deepEqual(await readOn(s, 5000, 1000), good);
      await disconnect(s);
    });

    await check(`${mode}: write of 33 MiB (payload sent): EOVERFLOW, payload skipped, connection works`, async () => {
      const s = await session(target, 'disk', { structured });
      const length = 33 * 1024 * 1024;
      const payload = Buffer.alloc(length, 0x5c);
      // Request headers inside the payload, at its start and across its end, must not be parsed.
      request(Cmd.DISC, nextCookie(), 0, 0).copy(payload, 0);
      request(Cmd.DISC, nextCookie(), 0, 0).copy(payload, length - 28);
      const writes = exp.writes;
      const c = nextCookie();
      s.p.send(request(Cmd.WRITE, c, 0, length), payload);
      await expectError(s, c, NbdErrno.EOVERFLOW);
      assert.equal(exp.writes, writes);
      assert.deepEqual(await readOn(s, 8192, 8192), exp.data.subarray(8192, 16384));
      await disconnect(s);
    });

    await check(`${mode}: unknown command 42: EINVAL, connection continues`, async () => {
      const s = await session(target, 'disk', { structured });
      const c = nextCookie();
      s.p.send(request(42, c, 0, 4096));
      await expectError(s, c, NbdErrno.EINVAL);
      const c2 = nextCookie();
      s.p.send(request(0xffff, c2, 0, 0, 0xffff));
      await expectError(s, c2, NbdErrno.EINVAL);
      assert.deepEqual(await readOn(s, 0, 4096), exp.data.subarray(0, 4096));
      await disconnect(s);
    });

    await check(`${mode}: BLOCK_STATUS without a meta context: EINVAL`, async () => {
      const s = await session(target, 'disk', { structured });
      const c = nextCookie();
      s.p.send(request(Cmd.BLOCK_STATUS, c, 0, 4096));
      await expectError(s, c, NbdErrno.EINVAL);
      assert.deepEqual(await readOn(s, 0, 512), exp.data.subarray(0, 512));
      await disconnect(s);
    });

    await check(`${mode}: request with bad magic: disconnect`, async () => {
      const s = await session(target, 'disk', { structured });
      const r = request(Cmd.READ, nextCookie(), 0, 4096);
      r.writeUInt32BE(0x25609514, 0);
      s.p.send(r);
      await s.p.expectClosed('bad request magic');
    });

    await check(`${mode}: garbage bytes: disconnect`, async () => {
      const s = await session(target, 'disk', { structured });
      s.p.send(Buffer.from('GET / HTTP/1.1\r\nHost: example\r\n\r\n'));
      await s.p.expectClosed('HTTP instead of NBD');
    });

    await check(`${mode}: truncated request, then the client closes`, async () => {
      const s = await session(target, 'disk', { structured });
      s.p.send(request(Cmd.READ, nextCookie(), 0, 4096).subarray(0, 17));
      await new Promise((r) => setTimeout(r, 20));
      s.p.socket.end();
      await s.p.closed;
      const s2 = await session(target, 'disk', { structured });
      s2.p.send(request(Cmd.WRITE, nextCookie(), 0, 4096), Buffer.alloc(1000));
      await new Promise((r) => setTimeout(r, 20));
      s2.p.destroy();
    });

    await check(`${mode}: NBD_CMD_DISC with a read in flight: the reply arrives, then the server closes`, async () => {
      const s = await session(target, 'disk', { structured });
      exp.nextReadDelayMs = 150;
      const c = nextCookie();
      s.p.send(Buffer.concat([request(Cmd.READ, c, 65536, 4096), request(Cmd.DISC, nextCookie(), 0, 0), request(Cmd.READ, nextCookie(), 0, 4096)]));
      assert.deepEqual(await expectReadData(s, c, 65536, 4096), exp.data.subarray(65536, 65536 + 4096), 'in-flight read answered after DISC');
      await s.p.expectClosed('after DISC, once the in-flight request is answered (nothing after DISC is served)');
    });
  }

  await check('BLOCK_STATUS with base:allocation: extents; REQ_ONE gives exactly one descriptor', async () => {
    const s = await session(target, 'disk', { structured: true, meta: true });
    const id = s.contextId!;
    // Extents at 64 KiB: data, hole, data, ... (unless earlier cases wrote there, so compute it).
    const off = 2 * EXTENT + 4096;
    const len = 3 * EXTENT;
    const expected: [number, number][] = [];
    for (let at = off; at < off + len; ) {
      const end = Math.min(off + len, (Math.floor(at / EXTENT) + 1) * EXTENT);
      const flags = exp.data.subarray(at, end).some((b) => b !== 0) ? 0 : AllocationFlag.HOLE | AllocationFlag.ZERO;
      const last = expected.at(-1);
      if (last !== undefined && last[1] === flags) last[0] += end - at;
      else expected.push([end - at, flags]);
      at = end;
    }
    assert.ok(expected.length >= 2, 'the range has several extents');

    let c = nextCookie();
    s.p.send(request(Cmd.BLOCK_STATUS, c, off, len));
    let chunk = await readChunk(s.p);
    assert.equal(chunk.type, ReplyType.BLOCK_STATUS);
    assert.equal(chunk.flags, ReplyFlag.DONE);
    assert.deepEqual(chunk.cookie, c);
    assert.deepEqual(chunk.payload, Buffer.concat([u32(id), ...expected.flatMap(([l, f]) => [u32(l), u32(f)])]));

    c = nextCookie();
    s.p.send(request(Cmd.BLOCK_STATUS, c, off, len, CmdFlag.REQ_ONE));
    chunk = await readChunk(s.p);
    assert.equal(chunk.type, ReplyType.BLOCK_STATUS);
    assert.deepEqual(chunk.cookie, c);
    assert.equal(chunk.payload.length, 4 + 8, 'exactly one descriptor');
    assert.deepEqual(chunk.payload, Buffer.concat([u32(id), u32(expected[0][0]), u32(expected[0][1])]));
    assert.ok(expected[0][0] <= len);

    for (const [o, l] of [[SIZE - 100, 4096], [0, 0], [SIZE, 1]] as const) {
      c = nextCookie();
      s.p.send(request(Cmd.BLOCK_STATUS, c, o, l, CmdFlag.REQ_ONE));
      await expectError(s, c, NbdErrno.EINVAL);
    }
    await disconnect(s);
  });

  await t.test('200 random-garbage connections do not hurt the server', async (st) => {
    const seed = testSeed();
    st.diagnostic(`garbage seed ${seed} (ZEBU_TEST_SEED=${seed} to repeat)`);
    const rand = rng(seed);
    const bytes = (n: number) => {
      const b = Buffer.allocUnsafe(n);
      for (let i = 0; i < n; i++) b[i] = rand(256);
      return b;
    };
    const garbage = () => bytes(rand(8) === 0 ? rand(100_000) : rand(600));
    const pick = <T>(xs: readonly T[]): T => xs[rand(xs.length)];
    const randomRequest = (): Buffer[] => {
      const type = rand(4) === 0 ? rand(65536) : rand(10);
      const offset = pick([0n, BigInt(rand(SIZE)), BigInt(SIZE - rand(8192)), BigInt(SIZE), BigInt(rand(2 ** 31)) * BigInt(rand(2 ** 31) + 1), 0xffffffffffffffffn]);
      const length = pick([0, 1, rand(8192), rand(SIZE), 32 * 1024 * 1024 + 1, rand(2 ** 31) * 2 + rand(2), 0xffffffff]);
      const flags = rand(3) === 0 ? rand(65536) : pick([0, CmdFlag.FUA, CmdFlag.REQ_ONE, CmdFlag.DF]);
      const parts = [request(type, nextCookie(), offset, length, flags)];
      if (type === Cmd.WRITE && length <= 16384 && rand(2) === 0) parts.push(bytes(length));
      return parts;
    };

    const one = async (i: number): Promise<void> => {
      const phase = rand(6);
      const ending = rand(3);
      const structured = rand(2) === 0;
      const meta = structured && rand(2) === 0;
      const extra = [garbage(), ...Array.from({ length: rand(6) }, () => randomRequest().concat(rand(2) === 0 ? [] : [bytes(rand(64))]))].flat();
      const opts = Array.from({ length: 1 + rand(4) }, () => {
        const data = rand(3) === 0 ? infoData(pick(['disk', '', 'x']), [rand(8)]) : bytes(rand(300));
        return option(rand(3) === 0 ? rand(16) : rand(2 ** 31), data, rand(6) === 0 ? rand(2 ** 31) : data.length);
      });
      let p: Peer | null = null;
      try {
        if (phase === 0) {
          p = await Peer.connect(target);
          p.send(garbage());
        } else if (phase === 1) {
          p = await open(target, rand(2) === 0 ? 3 : rand(2 ** 31));
          p.send(garbage());
        } else if (phase === 2) {
          p = await open(target);
          p.send(...opts, garbage());
        } else if (phase === 3) {
          const s = await session(target, 'disk', { structured, meta });
          p = s.p;
          p.send(garbage());
        } else {
          const s = await session(target, 'disk', { structured, meta });
          p = s.p;
          for (let k = 0; k < 1 + rand(8); k++) p.send(...randomRequest());
          if (phase === 5) p.send(...extra);
        }
        if (ending === 0) p.socket.end();
        else if (ending === 1) await new Promise((r) => setTimeout(r, rand(30)));
        else await Promise.race([p.closed, new Promise((r) => setTimeout(r, 200))]);
      } catch (err) {
        throw new Error(`garbage connection ${i} (phase ${phase}, seed ${seed}): ${(err as Error).message}`);
      } finally {
        if (ending !== 0) p?.destroy();
      }
    };

    const firstEvent = events.length;
    const N = 200;
    let next = 0;
    await Promise.all(
      Array.from({ length: 20 }, async () => {
        while (next < N) await one(next++);
      }),
    );
    const deadline = Date.now() + 5000;
    while (server.connectionCount > 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
    assert.equal(server.connectionCount, 0, 'every garbage connection was closed');
    const seen = events.slice(firstEvent);
    const reasons = new Set(seen.filter((e) => e.event === 'nbd-disconnect').map((e) => String(e.reason).replace(/[0-9"].*/, '')));
    st.diagnostic(`${seen.filter((e) => e.event === 'nbd-connected').length} reached transmission; disconnect reasons: ${[...reasons].join(' | ')}`);
    assert.ok(seen.some((e) => e.event === 'nbd-connected') && reasons.size >= 3, 'the garbage reached several phases');
    await assertServes();
    await assertServes();
  });

  await t.test('no internal error was logged', () => {
    const internal = events.filter((e) => e.event === 'nbd-internal-error');
    assert.deepEqual(internal, [], 'an nbd-internal-error is a bug in the server, not a property of the input');
  });
});

// ---- part two: a real volume --------------------------------------------------------------------

test('a real volume frontend survives bad input over TCP and the UNIX socket (then qemu-io works)', async (t) => {
  const dir = tempDir(t);
  const VOL = 16 * 1024 * 1024;
  const vol = await startVolume(t, { dir, replicas: 1, sizeBytes: VOL });
  const tcp: Target = { port: Number(new URL(vol.nbd).port) };
  const unix: Target = { path: vol.nbdSocket };
  const name = vol.name;

  for (const [label, target] of [['TCP', tcp], ['UNIX socket', unix]] as const) {
    await t.test(`${label}: malformed options and requests`, async () => {
      let p = await open(target);
      p.send(option(99, Buffer.from('hello')));
      await expectOptReply(p, 99, Rep.ERR_UNSUP);
      p.send(option(Opt.GO, Buffer.alloc(100 * 1024, 1)));
      await expectOptReply(p, Opt.GO, Rep.ERR_TOO_BIG);
      p.send(option(Opt.GO, Buffer.from([0, 0])));
      await expectOptReply(p, Opt.GO, Rep.ERR_INVALID);
      p.send(option(Opt.GO, infoData('nope')));
      await expectOptReply(p, Opt.GO, Rep.ERR_UNKNOWN);
      p.send(Buffer.concat([Buffer.from('IHAVEOPZ'), u32(Opt.GO), u32(0)]));
      await p.expectClosed('bad option magic');

      for (const structured of [false, true]) {
        const s = await session(target, name, { structured });
        assert.equal(s.size, VOL);
        let c = nextCookie();
        s.p.send(request(Cmd.READ, c, VOL - 512, 4096));
        await expectError(s, c, NbdErrno.EINVAL);
        c = nextCookie();
        s.p.send(request(Cmd.READ, c, 0, 0));
        await expectError(s, c, NbdErrno.EINVAL);
        c = nextCookie();
        s.p.send(request(Cmd.WRITE, c, VOL - 100, 4096), Buffer.alloc(4096, 0xab));
        await expectError(s, c, NbdErrno.EINVAL);
        c = nextCookie();
        s.p.send(request(42, c, 0, 0));
        await expectError(s, c, NbdErrno.EINVAL);
        c = nextCookie();
        s.p.send(request(Cmd.BLOCK_STATUS, c, 0, 4096));
        await expectError(s, c, NbdErrno.EINVAL);
        if (!structured) {
          c = nextCookie();
          s.p.send(request(Cmd.WRITE, c, 0, 33 * 1024 * 1024), Buffer.alloc(33 * 1024 * 1024, 0xcd));
          await expectError(s, c, NbdErrno.EOVERFLOW);
        }
        const data = pattern(structured ? 3 : 4, 4096);
        c = nextCookie();
        s.p.send(request(Cmd.WRITE, c, 1024 * 1024, 4096), data);
        await expectOk(s, c);
        assert.deepEqual(await readOn(s, 1024 * 1024, 4096), data);
        // A read in flight when DISC arrives is still answered.
        c = nextCookie();
        s.p.send(request(Cmd.READ, c, 1024 * 1024, 4096), request(Cmd.DISC, nextCookie(), 0, 0));
        assert.deepEqual(await expectReadData(s, c, 1024 * 1024, 4096), data);
        await s.p.expectClosed('after DISC');
      }

      const bad = await session(target, name, { structured: true });
      bad.p.send(Buffer.from('\x00\x01garbage that is not an NBD request at all'));
      await bad.p.expectClosed('garbage request');
      const cut = await session(target, name);
      cut.p.send(request(Cmd.WRITE, nextCookie(), 0, 65536), Buffer.alloc(1000));
      cut.p.socket.end();
      await cut.p.closed;
      p = await Peer.connect(target);
      p.send(Buffer.from([0xff, 0xff]));
      p.destroy();
    });
  }

  await t.test('qemu-io works over TCP and the UNIX socket afterwards; the frontend is alive', () => {
    for (const uri of [vol.nbd, vol.nbdUnix]) {
      const r = run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x3c 0 64k', '-c', 'read -P 0x3c 0 64k', uri], { timeoutMs: 30_000 });
      assert.equal(r.status, 0, r.stdout + r.stderr);
      assert.doesNotMatch(r.stdout + r.stderr, /Pattern verification failed|error/i);
      assert.match(r.stdout, /read 65536\/65536 bytes/);
    }
    assert.equal(vol.volume.exitCode, null, 'the volume process is still running');
    assert.equal(vol.volume.signalCode, null);
  });
});
