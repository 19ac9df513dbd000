/**
 * A real replica process fed bad input on the data protocol, over raw sockets and through
 * DataClient: garbage instead of AUTH, a wrong secret, bad magic, truncated frames, oversized
 * payload lengths, out-of-range requests, unknown ops, stale epochs, a peer that never
 * authenticates. Each bad connection gets an error (and, where the framing is lost, is closed);
 * the server keeps serving its other connections, and no data changes.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import { DataClient } from '../../src/protocol/client.ts';
import { FrameReader } from '../../src/protocol/frame-reader.ts';
import { answerHello, checkResult, HELLO_BYTES, HELLO_MAGIC, RESULT_BYTES, RESULT_MAGIC, AUTH_BYTES } from '../../src/protocol/auth.ts';
import {
  Op,
  REQUEST_HEADER_BYTES,
  RESPONSE_HEADER_BYTES,
  RESPONSE_MAGIC,
  MAX_IO_BYTES,
  MAX_CONTROL_BYTES,
  encodeRequestHeader,
  type RequestHeader,
} from '../../src/protocol/frames.ts';
import { ErrorCode, errorToWire } from '../../src/errors.ts';
import { pattern } from '../support/tmp.ts';
import { startTestReplica } from '../support/replica-process.ts';

const SECRET = Buffer.from('bad-input-test-secret-0123456789');
const SIZE = 16 * 1024 * 1024;
const KNOWN_OFFSET = 0;
const KNOWN = pattern(4242, 256 * 1024 + 777);
const SCRATCH = 8 * 1024 * 1024;

const WIRE_EINVAL = errorToWire(ErrorCode.EINVAL);
const WIRE_UNSUPPORTED = errorToWire(ErrorCode.UNSUPPORTED);
const WIRE_PROTOCOL = errorToWire(ErrorCode.PROTOCOL);
const WIRE_FENCED = errorToWire(ErrorCode.FENCED);

/** `zebu replica serve --fault-injection` in a fresh directory; killed (and the directory removed) when the test ends. */
function spawnReplica(t: { after: (fn: () => void | Promise<void>) => void }): ReturnType<typeof startTestReplica> {
  return startTestReplica(t, { sizeBytes: SIZE, secret: SECRET, extraArgs: ['--fault-injection'] });
}

interface RawResponse {
  magic: number;
  requestId: number;
  status: number;
  payload: Buffer;
}

/** A hand-driven protocol peer: exact byte reads, raw frames, close detection. */
class RawPeer {
  readonly socket: net.Socket;
  readonly closed: Promise<void>;
  private readonly reader = new FrameReader();
  private want: { n: number; resolve: (b: Buffer) => void; reject: (e: Error) => void } | null = null;
  private isClosed = false;

  private constructor(socket: net.Socket) {
    this.socket = socket;
    socket.on('data', (chunk: Buffer) => {
      this.reader.push(chunk);
      this.pump();
    });
    socket.on('error', () => {});
    this.closed = new Promise((resolve) =>
      socket.once('close', () => {
        this.isClosed = true;
        this.pump();
        resolve();
      }),
    );
  }

  static connect(port: number, allowHalfOpen = false): Promise<RawPeer> {
    return new Promise((resolve, reject) => {
      const socket = net.createConnection({ host: '127.0.0.1', port, noDelay: true, allowHalfOpen });
      socket.once('error', reject);
      socket.once('connect', () => {
        socket.off('error', reject);
        resolve(new RawPeer(socket));
      });
    });
  }

  /** Connects and authenticates with the right secret. */
  static async authenticated(port: number, allowHalfOpen = false): Promise<RawPeer> {
    const peer = await RawPeer.connect(port, allowHalfOpen);
    const { auth, expectedServerProof } = answerHello(SECRET, await peer.read(HELLO_BYTES));
    peer.socket.write(auth);
    checkResult(await peer.read(RESULT_BYTES), expectedServerProof);
    return peer;
  }

  get isOpen(): boolean {
    return !this.isClosed;
  }

  /** Bytes received and not yet read. */
  get buffered(): number {
    return this.reader.available;
  }

  private pump(): void {
    const w = this.want;
    if (w === null) return;
    const buf = this.reader.take(w.n);
    if (buf !== null) {
      this.want = null;
      w.resolve(Buffer.from(buf));
    } else if (this.isClosed) {
      this.want = null;
      w.reject(new Error(`connection closed with ${this.reader.available} of ${w.n} bytes received`));
    }
  }

  read(n: number, timeoutMs = 3000): Promise<Buffer> {
    assert.equal(this.want, null, 'one read at a time');
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.want = null;
        reject(new Error(`timed out waiting for ${n} bytes (have ${this.reader.available})`));
      }, timeoutMs);
      this.want = {
        n,
        resolve: (b) => {
          clearTimeout(timer);
          resolve(b);
        },
        reject: (e) => {
          clearTimeout(timer);
          reject(e);
        },
      };
      this.pump();
    });
  }

  write(buf: Buffer): void {
    this.socket.write(buf);
  }

  static request(h: Partial<RequestHeader> & { op: number }, payload: Buffer = Buffer.alloc(0)): Buffer {
    const header = Buffer.alloc(REQUEST_HEADER_BYTES);
    encodeRequestHeader(header, { flags: 0, requestId: 1, epoch: 0, offset: 0, length: 0, payloadLength: payload.length, ...h });
    return Buffer.concat([header, payload]);
  }

  async response(timeoutMs = 3000): Promise<RawResponse> {
    const header = await this.read(RESPONSE_HEADER_BYTES, timeoutMs);
    const length = header.readUInt32BE(12);
    assert.ok(length <= MAX_IO_BYTES + 1024 * 1024, `response payload length ${length}`);
    return { magic: header.readUInt32BE(0), requestId: header.readUInt32BE(4), status: header.readUInt32BE(8), payload: await this.read(length, timeoutMs) };
  }

  async waitClosed(timeoutMs: number, what: string): Promise<void> {
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([
      this.closed,
      new Promise<void>((_, reject) => {
        timer = setTimeout(() => reject(new Error(`${what}: connection still open after ${timeoutMs} ms`)), timeoutMs);
      }),
    ]).finally(() => clearTimeout(timer));
  }

  destroy(): void {
    this.socket.destroy();
  }
}

function hasCode(code: string): (err: unknown) => boolean {
  return (err: unknown) => {
    assert.equal((err as { code?: string }).code, code, `expected ${code}, got ${String((err as Error).message)}`);
    return true;
  };
}

test('a replica process under bad input answers with errors, keeps serving other connections, keeps its data', async (t) => {
  const replica = await spawnReplica(t);
  const port = replica.port;
  let epoch = 0; // the replica's current epoch, for raw requests
  let seq = 1;

  // Connections that never authenticate: the handshake timeout (5 s by default) must close them.
  const idleStart = Date.now();
  const idle = await RawPeer.connect(port);
  const partial = await RawPeer.connect(port);
  partial.write(Buffer.alloc(AUTH_BYTES - 1, 0x5a)); // one byte short of an AUTH

  const healthy = await DataClient.connect({ port, secret: SECRET, requestTimeoutMs: 5000 });
  t.after(() => healthy.close());
  await healthy.write(KNOWN_OFFSET, KNOWN);
  await healthy.flush();

  /** The healthy connection still works (write + read back), and the known data is intact. */
  const checkHealthy = async (after: string): Promise<void> => {
    assert.equal(replica.child.exitCode, null, `replica process alive after ${after}`);
    assert.ok(!healthy.closed, `healthy connection still open after ${after}`);
    const data = pattern(seq++, 3 * 4096 + 123);
    const at = SCRATCH + (seq % 16) * 65536 + 7;
    await healthy.write(at, data);
    assert.ok((await healthy.read(at, data.length)).equals(data), `healthy connection reads back its write after ${after}`);
    assert.ok((await healthy.read(KNOWN_OFFSET, KNOWN.length)).equals(KNOWN), `known data intact after ${after}`);
  };

  await t.test('garbage instead of AUTH: RESULT status != 0, connection closed, nothing served', async () => {
    const peer = await RawPeer.connect(port);
    const hello = await peer.read(HELLO_BYTES);
    assert.equal(hello.readUInt32BE(0), HELLO_MAGIC);
    // 68 bytes of garbage, then a well-formed PING the server must not answer.
    peer.write(Buffer.concat([pattern(77, AUTH_BYTES), RawPeer.request({ op: Op.PING, requestId: 9 })]));
    const result = await peer.read(RESULT_BYTES);
    assert.equal(result.readUInt32BE(0), RESULT_MAGIC);
    assert.notEqual(result.readUInt32BE(4), 0, 'RESULT status is a failure');
    assert.ok(result.subarray(8).equals(Buffer.alloc(32)), 'no server proof on failure');
    await peer.waitClosed(3000, 'after garbage AUTH');
    assert.equal(peer.buffered, 0, 'nothing served after the failed handshake');
    await checkHealthy('garbage AUTH');
  });

  await t.test('garbage instead of AUTH with the AUTH magic and a short connection', async () => {
    const peer = await RawPeer.connect(port);
    await peer.read(HELLO_BYTES);
    const garbage = pattern(78, AUTH_BYTES);
    garbage.writeUInt32BE(0x5a424155, 0); // AUTH magic, garbage nonce and proof
    peer.write(garbage);
    const result = await peer.read(RESULT_BYTES);
    assert.notEqual(result.readUInt32BE(4), 0);
    await peer.waitClosed(3000, 'after forged AUTH');
    // And a peer that sends half an AUTH and hangs up.
    const quitter = await RawPeer.connect(port);
    await quitter.read(HELLO_BYTES);
    quitter.write(Buffer.alloc(20, 1));
    quitter.destroy();
    await checkHealthy('forged AUTH');
  });

  await t.test('wrong secret: DataClient gets ZEBU_ERR_AUTH, a raw peer gets RESULT != 0 and a close', async () => {
    await assert.rejects(DataClient.connect({ port, secret: Buffer.from('not-the-right-secret-at-all-0000') }), hasCode(ErrorCode.AUTH));
    const peer = await RawPeer.connect(port);
    const { auth } = answerHello(Buffer.from('not-the-right-secret-at-all-0000'), await peer.read(HELLO_BYTES));
    peer.write(Buffer.concat([auth, RawPeer.request({ op: Op.READ, requestId: 3, length: 4096 })]));
    const result = await peer.read(RESULT_BYTES);
    assert.equal(result.readUInt32BE(0), RESULT_MAGIC);
    assert.notEqual(result.readUInt32BE(4), 0);
    await peer.waitClosed(3000, 'after wrong secret');
    assert.equal(peer.buffered, 0, 'no READ reply for an unauthenticated peer');
    await checkHealthy('wrong secret');
  });

  await t.test('bad request magic: PROTOCOL error response (request id 0), then close', async () => {
    const peer = await RawPeer.authenticated(port);
    peer.write(pattern(79, REQUEST_HEADER_BYTES + 100));
    const res = await peer.response();
    assert.equal(res.magic, RESPONSE_MAGIC);
    assert.equal(res.requestId, 0);
    assert.equal(res.status, WIRE_PROTOCOL);
    assert.match(res.payload.toString(), /magic/);
    await peer.waitClosed(3000, 'after bad magic');
    assert.equal(peer.buffered, 0);

    // The same through DataClient (garbage written on its socket): the connection fails with
    // PROTOCOL, and so does a request sent after the garbage.
    const client = await DataClient.connect({ port, secret: SECRET });
    const closedWith = new Promise<string>((resolve) => client.onClose((err) => resolve(err.code)));
    await client.ping();
    (client as unknown as { socket: net.Socket }).socket.write(pattern(80, REQUEST_HEADER_BYTES));
    await assert.rejects(client.read(0, 4096), hasCode(ErrorCode.PROTOCOL));
    assert.equal(await closedWith, ErrorCode.PROTOCOL);
    assert.ok(client.closed);
    await checkHealthy('bad magic');
  });

  await t.test('truncated frames followed by close: the server survives', async () => {
    const halfHeader = await RawPeer.authenticated(port);
    halfHeader.write(RawPeer.request({ op: Op.WRITE, requestId: 5, offset: KNOWN_OFFSET, length: 4096 }, pattern(81, 4096)).subarray(0, 20));
    await new Promise((r) => setTimeout(r, 50));
    halfHeader.destroy();

    const halfPayload = await RawPeer.authenticated(port);
    halfPayload.write(RawPeer.request({ op: Op.WRITE, requestId: 6, offset: KNOWN_OFFSET, length: 4096 }, pattern(82, 4096)).subarray(0, REQUEST_HEADER_BYTES + 1000));
    await new Promise((r) => setTimeout(r, 50));
    halfPayload.socket.end(); // a clean FIN mid-payload
    await halfPayload.waitClosed(3000, 'half payload then FIN');
    assert.equal(halfPayload.buffered, 0, 'no reply to a write whose payload never arrived');

    const halfAuth = await RawPeer.connect(port);
    await halfAuth.read(HELLO_BYTES);
    halfAuth.write(Buffer.alloc(30, 7));
    halfAuth.destroy();
    await checkHealthy('truncated frames');
  });

  await t.test('huge payload length: PROTOCOL error naming the request, then close; the server survives', async () => {
    for (const [op, payloadLength] of [
      [Op.WRITE, 0xffffffff],
      [Op.WRITE, MAX_IO_BYTES + 1],
      [Op.READ, MAX_CONTROL_BYTES + 1],
      [Op.SNAPSHOT_CREATE, 0x7fffffff],
      [200, 0xfffffff0],
    ] as const) {
      const peer = await RawPeer.authenticated(port);
      const header = RawPeer.request({ op, requestId: 77, offset: KNOWN_OFFSET, length: 4096, epoch });
      header.writeUInt32BE(payloadLength, 32);
      peer.write(Buffer.concat([header, pattern(83, 4096)]));
      const res = await peer.response();
      assert.equal(res.magic, RESPONSE_MAGIC);
      assert.equal(res.requestId, 77, `op ${op} payload ${payloadLength}: reply names the request`);
      assert.equal(res.status, WIRE_PROTOCOL, `op ${op} payload ${payloadLength}`);
      await peer.waitClosed(3000, `after payload length ${payloadLength}`);
    }
    await checkHealthy('huge payload lengths');
  });

  await t.test('out-of-range requests and WRITE length mismatch: EINVAL, the connection keeps working', async () => {
    const peer = await RawPeer.authenticated(port);
    const bad: { name: string; frame: Buffer }[] = [
      { name: 'READ at the end of the volume', frame: RawPeer.request({ op: Op.READ, offset: SIZE, length: 1 }) },
      { name: 'READ crossing the end', frame: RawPeer.request({ op: Op.READ, offset: SIZE - 4096, length: 8192 }) },
      { name: 'READ longer than MAX_IO_BYTES', frame: RawPeer.request({ op: Op.READ, offset: 0, length: 0xffffffff }) },
      { name: 'READ at offset 2^53-1', frame: RawPeer.request({ op: Op.READ, offset: Number.MAX_SAFE_INTEGER, length: 1 }) },
      { name: 'WRITE crossing the end', frame: RawPeer.request({ op: Op.WRITE, offset: SIZE - 100, length: 4096 }, pattern(84, 4096)) },
      { name: 'WRITE far beyond the end', frame: RawPeer.request({ op: Op.WRITE, offset: 2 ** 52, length: 4096 }, pattern(85, 4096)) },
      { name: 'WRITE with length > payload', frame: RawPeer.request({ op: Op.WRITE, offset: KNOWN_OFFSET, length: 4096 }, pattern(86, 100)) },
      { name: 'WRITE with length < payload', frame: RawPeer.request({ op: Op.WRITE, offset: KNOWN_OFFSET, length: 100 }, pattern(87, 4096)) },
      { name: 'WRITE with length 0 and a payload', frame: RawPeer.request({ op: Op.WRITE, offset: KNOWN_OFFSET, length: 0 }, pattern(88, 512)) },
      { name: 'TRIM beyond the end', frame: RawPeer.request({ op: Op.TRIM, offset: 4096, length: 0xffffffff }) },
      { name: 'WRITE_ZEROES beyond the end', frame: RawPeer.request({ op: Op.WRITE_ZEROES, offset: SIZE, length: 4096 }) },
      { name: 'BLOCK_STATUS beyond the end', frame: RawPeer.request({ op: Op.BLOCK_STATUS, offset: SIZE - 4096, length: 1 << 20 }) },
      { name: 'SNAPSHOT_CREATE with a bad name', frame: RawPeer.request({ op: Op.SNAPSHOT_CREATE }, Buffer.from('../../etc')) },
      { name: 'FAULT_INJECT with a non-JSON payload', frame: RawPeer.request({ op: Op.FAULT_INJECT }, Buffer.from('{not json')) },
      { name: 'FAULT_INJECT with a bad rule', frame: RawPeer.request({ op: Op.FAULT_INJECT }, Buffer.from('{"rules":[{"op":"write","errno":"EPERM"}]}')) },
    ];
    // READ at offset 2^64-1 (not representable as a safe integer).
    const hugeOffset = RawPeer.request({ op: Op.READ, length: 1 });
    hugeOffset.writeUInt32BE(0xffffffff, 20);
    hugeOffset.writeUInt32BE(0xffffffff, 24);
    bad.push({ name: 'READ at offset 2^64-1', frame: hugeOffset });
    const hugeWrite = RawPeer.request({ op: Op.WRITE, length: 4096 }, pattern(89, 4096));
    hugeWrite.writeUInt32BE(0xfffffff0, 20);
    bad.push({ name: 'WRITE at offset ~2^64', frame: hugeWrite });

    // All pipelined in one chunk, each followed by a PING: every reply matched by id.
    const frames: Buffer[] = [];
    bad.forEach((b, i) => {
      const f = Buffer.from(b.frame);
      f.writeUInt32BE(1000 + i, 8);
      writeEpoch(f, epoch);
      frames.push(f, RawPeer.request({ op: Op.PING, requestId: 2000 + i, epoch }));
    });
    peer.write(Buffer.concat(frames));
    const replies = new Map<number, RawResponse>();
    for (let i = 0; i < frames.length; i++) {
      const r = await peer.response();
      assert.equal(r.magic, RESPONSE_MAGIC);
      assert.ok(!replies.has(r.requestId), `one reply per request id (${r.requestId})`);
      replies.set(r.requestId, r);
    }
    bad.forEach((b, i) => {
      const r = replies.get(1000 + i);
      assert.ok(r !== undefined, `${b.name}: replied`);
      assert.equal(r.status, WIRE_EINVAL, `${b.name}: EINVAL, got ${r.status} ${r.payload.toString()}`);
      assert.equal(replies.get(2000 + i)?.status, 0, `PING after ${b.name}`);
    });
    assert.ok(peer.isOpen, 'the connection stays open after EINVAL replies');
    // And it still serves a real read.
    peer.write(RawPeer.request({ op: Op.READ, requestId: 3000, epoch, offset: KNOWN_OFFSET, length: 4096 }));
    const read = await peer.response();
    assert.equal(read.requestId, 3000);
    assert.equal(read.status, 0);
    assert.ok(read.payload.equals(KNOWN.subarray(0, 4096)));
    peer.destroy();

    // Through DataClient as well.
    const client = await DataClient.connect({ port, secret: SECRET, epoch });
    await assert.rejects(client.read(SIZE, 1), hasCode(ErrorCode.EINVAL));
    await assert.rejects(client.read(SIZE - 1, 2), hasCode(ErrorCode.EINVAL));
    await assert.rejects(client.write(SIZE - 4096, pattern(90, 8192)), hasCode(ErrorCode.EINVAL));
    await assert.rejects(client.request(Op.WRITE, 0, KNOWN_OFFSET, 8192, pattern(91, 4096)), hasCode(ErrorCode.EINVAL));
    await assert.rejects(client.trim(SIZE - 4096, 8192), hasCode(ErrorCode.EINVAL));
    await assert.rejects(client.blockStatus(SIZE, 4096), hasCode(ErrorCode.EINVAL));
    await assert.rejects(client.injectFaults({ rules: [{ op: 'bogus' as 'read', errno: 'EIO' }] }), hasCode(ErrorCode.EINVAL));
    assert.ok((await client.read(KNOWN_OFFSET, KNOWN.length)).equals(KNOWN), 'the client connection keeps working');
    client.close();
    await checkHealthy('EINVAL requests');
  });

  await t.test('a bad epoch number is EINVAL and is not adopted', async () => {
    const peer = await RawPeer.authenticated(port);
    const frame = RawPeer.request({ op: Op.OPEN, requestId: 41 });
    frame.writeUInt32BE(0xffffffff, 12);
    frame.writeUInt32BE(0xffffffff, 16);
    const write = RawPeer.request({ op: Op.WRITE, requestId: 42, offset: KNOWN_OFFSET, length: 4096 }, pattern(92, 4096));
    write.writeUInt32BE(0xffffffff, 12);
    peer.write(Buffer.concat([frame, write]));
    const replies = [await peer.response(), await peer.response()].sort((a, b) => a.requestId - b.requestId);
    assert.deepEqual(replies.map((r) => [r.requestId, r.status]), [[41, WIRE_EINVAL], [42, WIRE_EINVAL]]);
    assert.equal((await healthy.info()).epoch, epoch, 'epoch unchanged');
    peer.destroy();
    await checkHealthy('bad epoch');
  });

  await t.test('unknown op: UNSUPPORTED, its payload is skipped, the connection keeps working', async () => {
    const peer = await RawPeer.authenticated(port);
    peer.write(
      Buffer.concat([
        RawPeer.request({ op: 0, requestId: 50, epoch }),
        RawPeer.request({ op: 99, requestId: 51, epoch, offset: KNOWN_OFFSET, length: 4096 }, pattern(93, 1000)),
        RawPeer.request({ op: 255, requestId: 52, epoch }, pattern(94, MAX_CONTROL_BYTES)),
        RawPeer.request({ op: Op.READ, requestId: 53, epoch, offset: KNOWN_OFFSET, length: 4096 }),
      ]),
    );
    const replies = new Map<number, RawResponse>();
    for (let i = 0; i < 4; i++) {
      const r = await peer.response();
      replies.set(r.requestId, r);
    }
    for (const id of [50, 51, 52]) assert.equal(replies.get(id)?.status, WIRE_UNSUPPORTED, `request ${id}`);
    assert.equal(replies.get(53)?.status, 0);
    assert.ok(replies.get(53)!.payload.equals(KNOWN.subarray(0, 4096)));
    assert.ok(peer.isOpen);
    peer.destroy();

    const client = await DataClient.connect({ port, secret: SECRET, epoch });
    await assert.rejects(client.request(77, 0, 0, 0, Buffer.from('x')), hasCode(ErrorCode.UNSUPPORTED));
    await client.ping();
    client.close();
    await checkHealthy('unknown ops');
  });

  await t.test('stale epoch: FENCED on write and read, the data unchanged', async () => {
    const opener = await DataClient.connect({ port, secret: SECRET, epoch: 5 });
    t.after(() => opener.close());
    assert.equal((await opener.open()).epoch, 5);
    epoch = 5;
    const stale = await DataClient.connect({ port, secret: SECRET, epoch: 3 });
    t.after(() => stale.close());
    await assert.rejects(stale.write(KNOWN_OFFSET, pattern(95, 4096)), hasCode(ErrorCode.FENCED));
    await assert.rejects(stale.write(SCRATCH, pattern(96, 4096), { fua: true }), hasCode(ErrorCode.FENCED));
    await assert.rejects(stale.read(KNOWN_OFFSET, 4096), hasCode(ErrorCode.FENCED));
    await assert.rejects(stale.trim(KNOWN_OFFSET, 4096), hasCode(ErrorCode.FENCED));
    await assert.rejects(stale.flush(), hasCode(ErrorCode.FENCED));
    await assert.rejects(stale.open(), hasCode(ErrorCode.FENCED));
    await assert.rejects(stale.snapshotCreate('stale'), hasCode(ErrorCode.FENCED));
    await stale.ping(); // fencing is per request; the connection is fine
    // The healthy connection (epoch 0) is fenced too until it moves to the new epoch.
    await assert.rejects(healthy.write(SCRATCH, pattern(97, 4096)), hasCode(ErrorCode.FENCED));
    healthy.epoch = 5;
    // A raw stale peer gets wire FENCED.
    const peer = await RawPeer.authenticated(port);
    peer.write(RawPeer.request({ op: Op.WRITE, requestId: 60, epoch: 4, offset: KNOWN_OFFSET, length: 4096 }, pattern(98, 4096)));
    const r = await peer.response();
    assert.deepEqual([r.requestId, r.status], [60, WIRE_FENCED]);
    peer.destroy();
    assert.ok((await opener.read(KNOWN_OFFSET, KNOWN.length)).equals(KNOWN), 'fenced writes changed nothing');
    await checkHealthy('stale epochs');
  });

  await t.test(
    'after a PROTOCOL error the server releases the connection even if the peer keeps its side open',
    async () => {
      const peer = await RawPeer.authenticated(port, true);
      peer.write(pattern(99, REQUEST_HEADER_BYTES));
      const res = await peer.response();
      assert.equal(res.status, WIRE_PROTOCOL);
      // The peer never ends its side and keeps sending; the server must still close (destroy)
      // the socket, which the peer sees as a reset / close.
      const writer = setInterval(() => {
        if (!peer.socket.destroyed && peer.socket.writable) peer.socket.write(Buffer.alloc(1024, 0xee));
      }, 100);
      try {
        await peer.waitClosed(3000, 'half-open peer after a PROTOCOL error');
      } finally {
        clearInterval(writer);
        peer.destroy();
      }
      await checkHealthy('half-open peer');
    },
  );

  await t.test('connections that never authenticate are closed after the handshake timeout', async () => {
    const deadline = idleStart + 7500;
    await idle.waitClosed(Math.max(1, deadline - Date.now()), 'idle unauthenticated connection');
    await partial.waitClosed(Math.max(1, deadline - Date.now()), 'connection with a partial AUTH');
    const elapsed = Date.now() - idleStart;
    assert.ok(elapsed >= 4000, `closed after ${elapsed} ms, not before the 5 s handshake timeout`);
    for (const peer of [idle, partial]) {
      const hello = await peer.read(HELLO_BYTES);
      assert.equal(hello.readUInt32BE(0), HELLO_MAGIC);
      assert.equal(peer.buffered, 0, 'only the HELLO was sent');
    }
    // The healthy connection, authenticated at the same time and idle meanwhile, is not affected.
    await checkHealthy('handshake timeouts');
  });

  await t.test('at the end: the process is alive, the known pattern is intact', async () => {
    const fresh = await DataClient.connect({ port, secret: SECRET, epoch });
    assert.ok((await fresh.read(KNOWN_OFFSET, KNOWN.length)).equals(KNOWN));
    const info = await fresh.info();
    assert.equal(info.epoch, 5);
    assert.equal(info.sizeBytes, SIZE);
    fresh.close();
    assert.equal(replica.child.exitCode, null, replica.stderr());
  });
});

function writeEpoch(frame: Buffer, epoch: number): void {
  frame.writeUInt32BE(Math.floor(epoch / 2 ** 32), 12);
  frame.writeUInt32BE(epoch >>> 0, 16);
}
