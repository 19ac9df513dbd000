/**
 * DataClient: pipelining (1000 requests in flight on one connection against a real replica
 * process, replies matched by id), per-request timeouts and disconnects (against an in-process
 * fake server that authenticates and then misbehaves), the handshake from the client's side.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import { DataClient } from '../../src/protocol/client.ts';
import { FrameReader } from '../../src/protocol/frame-reader.ts';
import { encodeHello, checkAuth, newNonce, AUTH_BYTES, RESULT_BYTES, RESULT_MAGIC } from '../../src/protocol/auth.ts';
import {
  Op,
  REQUEST_HEADER_BYTES,
  RESPONSE_HEADER_BYTES,
  decodeRequestHeader,
  encodeResponseHeader,
  type RequestHeader,
} from '../../src/protocol/frames.ts';
import { ErrorCode, errorToWire } from '../../src/errors.ts';
import { pattern } from '../support/tmp.ts';
import { startTestReplica } from '../support/replica-process.ts';

const SECRET = Buffer.from('client-test-secret-0123456789abc');
const SIZE = 16 * 1024 * 1024;

type After = { after: (fn: () => void | Promise<void>) => void };

/** `zebu replica serve` in a fresh directory; SIGKILLed (and the directory removed) when the test ends. */
function spawnReplica(t: After): ReturnType<typeof startTestReplica> {
  return startTestReplica(t, { sizeBytes: SIZE, secret: SECRET });
}

interface FakeConnection {
  socket: net.Socket;
  requests: RequestHeader[];
  reply(requestId: number, status: number, payload?: Buffer): void;
}

interface FakeServerOptions {
  /** Called for each request after authentication. */
  onRequest?: (conn: FakeConnection, h: RequestHeader, payload: Buffer) => void;
  /** Replaces the normal handshake: called with the socket right after accept. */
  onAccept?: (socket: net.Socket) => void;
  secret?: Buffer;
}

/** An in-process server that speaks the handshake (src/protocol/auth.ts) and then does what the test says. */
async function fakeServer(t: After, options: FakeServerOptions): Promise<{ port: number; connections: FakeConnection[] }> {
  const connections: FakeConnection[] = [];
  const sockets = new Set<net.Socket>();
  const server = net.createServer((socket) => {
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
    socket.on('error', () => {});
    if (options.onAccept) return options.onAccept(socket);
    const nonce = newNonce();
    socket.write(encodeHello(nonce));
    const reader = new FrameReader();
    let authed = false;
    let header: RequestHeader | null = null;
    const conn: FakeConnection = {
      socket,
      requests: [],
      reply(requestId, status, payload = Buffer.alloc(0)) {
        if (socket.destroyed) return;
        const h = Buffer.alloc(RESPONSE_HEADER_BYTES);
        encodeResponseHeader(h, requestId, status, payload.length);
        socket.write(Buffer.concat([h, payload]));
      },
    };
    connections.push(conn);
    socket.on('data', (chunk: Buffer) => {
      reader.push(chunk);
      if (!authed) {
        const auth = reader.take(AUTH_BYTES);
        if (auth === null) return;
        const { ok, result } = checkAuth(options.secret ?? SECRET, nonce, auth);
        socket.write(result);
        if (!ok) return void socket.end();
        authed = true;
      }
      for (;;) {
        if (header === null) {
          const raw = reader.take(REQUEST_HEADER_BYTES);
          if (raw === null) return;
          header = decodeRequestHeader(raw);
        }
        const payload = reader.take(header.payloadLength);
        if (payload === null) return;
        const h = header;
        header = null;
        conn.requests.push(h);
        options.onRequest?.(conn, h, Buffer.from(payload));
      }
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  t.after(async () => {
    for (const s of sockets) s.destroy();
    await new Promise<void>((resolve) => server.close(() => resolve()));
  });
  return { port: (server.address() as net.AddressInfo).port, connections };
}

function codeOf(err: unknown): string {
  return String((err as { code?: unknown }).code);
}

function hasCode(code: string): (err: unknown) => boolean {
  return (err: unknown) => {
    assert.equal(codeOf(err), code, `expected ${code}, got ${String((err as Error).message)}`);
    return true;
  };
}

/** Settles every promise; resolves with each one's error code, or 'ok'. */
function outcomes(promises: Promise<unknown>[]): Promise<string[]> {
  return Promise.all(promises.map((p) => p.then(() => 'ok', codeOf)));
}

test('pipelining: 1000 concurrent requests on one connection, replies matched by id', async (t) => {
  const { port } = await spawnReplica(t);
  const client = await DataClient.connect({ port, secret: SECRET, requestTimeoutMs: 20_000 });
  t.after(() => client.close());
  const N = 1000;
  const SLOT = 8192;
  // Distinct, unaligned, differently sized extents, one per slot.
  const extents = Array.from({ length: N }, (_, i) => ({ offset: i * SLOT + ((i * 13) % 97), data: pattern(i + 1, 1 + ((i * 2654435761) >>> 0) % (SLOT - 97)) }));

  const writes = extents.map((e) => client.write(e.offset, e.data));
  assert.equal(client.inflight, N, 'all writes in flight at once');
  await Promise.all(writes);
  assert.equal(client.inflight, 0);

  // Reads in shuffled order, with pings, INFO and BLOCK_STATUS interleaved: every reply must go
  // to its own request.
  const order = extents.map((_, i) => i).sort((a, b) => ((a * 7919) % N) - ((b * 7919) % N));
  const reads: Promise<Buffer>[] = new Array(N);
  const extras: Promise<unknown>[] = [];
  for (const i of order) {
    reads[i] = client.read(extents[i].offset, extents[i].data.length);
    if (i % 50 === 0) extras.push(client.ping(), client.info(), client.blockStatus(i * SLOT, SLOT));
  }
  assert.equal(client.inflight, N + extras.length);
  const got = await Promise.all(reads);
  for (let i = 0; i < N; i++) {
    assert.equal(got[i].length, extents[i].data.length, `read ${i}: length`);
    assert.ok(got[i].equals(extents[i].data), `read ${i} returned the data written to its own extent`);
  }
  const extraResults = await Promise.all(extras);
  for (let k = 0; k < extraResults.length; k += 3) {
    assert.equal((extraResults[k + 1] as { sizeBytes: number }).sizeBytes, SIZE);
    assert.ok(Array.isArray(extraResults[k + 2]));
  }

  // Overwrites and reads of other extents at the same time.
  const mixed: Promise<unknown>[] = [];
  const newData = extents.map((e, i) => (i % 2 === 0 ? pattern(100_000 + i, e.data.length) : e.data));
  for (let i = 0; i < N; i++) {
    if (i % 2 === 0) mixed.push(client.write(extents[i].offset, newData[i]));
    else mixed.push(client.read(extents[i].offset, extents[i].data.length).then((b) => assert.ok(b.equals(extents[i].data), `read ${i} during overwrites`)));
  }
  await Promise.all(mixed);
  const final = await Promise.all(extents.map((e) => client.read(e.offset, e.data.length)));
  for (let i = 0; i < N; i++) assert.ok(final[i].equals(newData[i]), `extent ${i} after overwrites`);
  assert.equal(client.inflight, 0);
  assert.ok(!client.closed);
});

test('per-request timeout: a request the server never answers fails with ZEBU_ERR_TIMEOUT', async (t) => {
  const { port, connections } = await fakeServer(t, {}); // authenticates, then never answers
  const timeoutMs = 300;
  const sweepMs = Math.max(10, Math.min(1000, Math.floor(timeoutMs / 4)));
  const client = await DataClient.connect({ port, secret: SECRET, requestTimeoutMs: timeoutMs });
  t.after(() => client.close());
  const started = Date.now();
  const results = [client.ping(), client.read(0, 4096), client.write(0, pattern(1, 4096)), client.flush()].map((p) =>
    p.then(
      () => assert.fail('a request to a silent server succeeded'),
      (err) => ({ code: codeOf(err), elapsed: Date.now() - started }),
    ),
  );
  for (const r of await Promise.all(results)) {
    assert.equal(r.code, ErrorCode.TIMEOUT);
    assert.ok(r.elapsed >= timeoutMs - 5, `timed out after ${r.elapsed} ms, not before ${timeoutMs} ms`);
    assert.ok(r.elapsed <= timeoutMs + sweepMs + 500, `timed out after ${r.elapsed} ms, within timeout + sweep (+ scheduling slack)`);
  }
  assert.equal(connections[0].requests.length, 4, 'the server received all four requests');
  assert.equal(client.inflight, 0);
  assert.ok(!client.closed, 'a timeout fails the request, not the connection');
});

test('per-request timeout: a late reply is ignored, later requests still get their own replies', async (t) => {
  const { port } = await fakeServer(t, {
    onRequest(conn, h) {
      const payload = Buffer.from(`reply-${h.requestId}`);
      if (h.requestId === 1) setTimeout(() => conn.reply(h.requestId, 0, payload), 1000);
      else if (h.requestId === 2) setTimeout(() => conn.reply(h.requestId, errorToWire(ErrorCode.EIO), Buffer.from('late error')), 1000);
      else conn.reply(h.requestId, 0, payload);
    },
  });
  const client = await DataClient.connect({ port, secret: SECRET, requestTimeoutMs: 200 });
  t.after(() => client.close());
  await assert.rejects(client.request(Op.READ, 0, 0, 7), hasCode(ErrorCode.TIMEOUT));
  await assert.rejects(client.request(Op.READ, 0, 0, 7), hasCode(ErrorCode.TIMEOUT));
  await new Promise((r) => setTimeout(r, 1200)); // both late replies arrive meanwhile
  assert.ok(!client.closed);
  assert.equal((await client.request(Op.READ, 0, 0, 7)).toString(), 'reply-3');
  assert.equal((await client.request(Op.READ, 0, 0, 7)).toString(), 'reply-4');
  assert.equal(client.inflight, 0);
});

test('disconnect: the server dropping the connection fails every pending request with ZEBU_ERR_DISCONNECTED', async (t) => {
  const N = 50;
  const { port, connections } = await fakeServer(t, {
    onRequest(conn) {
      if (conn.requests.length === N) conn.socket.destroy();
    },
  });
  const client = await DataClient.connect({ port, secret: SECRET, requestTimeoutMs: 20_000 });
  const closedWith = new Promise<string>((resolve) => client.onClose((err) => resolve(err.code)));
  const started = Date.now();
  const pending: Promise<unknown>[] = [];
  for (let i = 0; i < N; i++) {
    pending.push([() => client.read(i * 4096, 4096), () => client.write(i * 4096, pattern(i, 4096)), () => client.flush(), () => client.ping()][i % 4]());
  }
  assert.equal(client.inflight, N);
  const codes = await outcomes(pending);
  assert.deepEqual(new Set(codes), new Set([ErrorCode.DISCONNECTED]));
  assert.ok(Date.now() - started < 5000, 'failed promptly, not by timeout');
  assert.equal(await closedWith, ErrorCode.DISCONNECTED);
  assert.equal(connections[0].requests.length, N);
  assert.ok(client.closed);
  assert.equal(client.inflight, 0);
  // Requests after the disconnect fail at once with the same reason.
  await assert.rejects(client.ping(), hasCode(ErrorCode.DISCONNECTED));
  // A listener added after the close is still told.
  assert.equal(await new Promise<string>((resolve) => client.onClose((err) => resolve(err.code))), ErrorCode.DISCONNECTED);
});

test('disconnect: a FIN from the server fails pending requests too', async (t) => {
  const { port } = await fakeServer(t, {
    onRequest(conn) {
      if (conn.requests.length === 3) conn.socket.end();
    },
  });
  const client = await DataClient.connect({ port, secret: SECRET, requestTimeoutMs: 20_000 });
  const codes = await outcomes([client.ping(), client.read(0, 4096), client.write(0, pattern(1, 4096))]);
  assert.deepEqual(codes, [ErrorCode.DISCONNECTED, ErrorCode.DISCONNECTED, ErrorCode.DISCONNECTED]);
});

test('disconnect: SIGKILL of a real replica with requests in flight: each request succeeds or fails DISCONNECTED, none hangs', async (t) => {
  const { port, child, exited } = await spawnReplica(t);
  const client = await DataClient.connect({ port, secret: SECRET, requestTimeoutMs: 20_000 });
  await client.write(0, pattern(1, 65536));
  const pending: Promise<unknown>[] = [];
  for (let i = 0; i < 500; i++) pending.push(i % 2 === 0 ? client.write(i * 16384, pattern(i, 16384)) : client.read(i * 16384, 16384));
  child.kill('SIGKILL');
  const started = Date.now();
  const codes = await outcomes(pending);
  assert.ok(Date.now() - started < 5000, 'settled promptly, not by timeout');
  for (const c of codes) assert.ok(c === 'ok' || c === ErrorCode.DISCONNECTED, `outcome ${c}`);
  await exited;
  await assert.rejects(client.ping(), hasCode(ErrorCode.DISCONNECTED));
  assert.equal(client.inflight, 0);
});

test('close(): pending requests fail with ZEBU_ERR_CLOSED', async (t) => {
  const { port } = await fakeServer(t, {});
  const client = await DataClient.connect({ port, secret: SECRET, requestTimeoutMs: 20_000 });
  const pending = [client.ping(), client.read(0, 512)];
  client.close();
  assert.deepEqual(await outcomes(pending), [ErrorCode.CLOSED, ErrorCode.CLOSED]);
  await assert.rejects(client.flush(), hasCode(ErrorCode.CLOSED));
});

test('a malformed response (bad magic) closes the connection with ZEBU_ERR_PROTOCOL', async (t) => {
  const { port } = await fakeServer(t, {
    onRequest(conn, h) {
      if (h.op === Op.PING) conn.reply(h.requestId, 0);
      else conn.socket.write(pattern(5, RESPONSE_HEADER_BYTES + 10));
    },
  });
  const client = await DataClient.connect({ port, secret: SECRET });
  await client.ping();
  const codes = await outcomes([client.read(0, 10), client.read(0, 10)]);
  assert.deepEqual(codes, [ErrorCode.PROTOCOL, ErrorCode.PROTOCOL]);
  assert.ok(client.closed);
});

test('handshake: the client checks the server too', async (t) => {
  // A server that does not know the secret but claims success: the client must refuse it.
  const impostor = await fakeServer(t, {
    onAccept(socket) {
      socket.write(encodeHello(newNonce()));
      socket.once('data', () => {
        const result = Buffer.alloc(RESULT_BYTES);
        result.writeUInt32BE(RESULT_MAGIC, 0); // status 0, proof all zeros
        socket.write(result);
      });
    },
  });
  await assert.rejects(DataClient.connect({ port: impostor.port, secret: SECRET }), hasCode(ErrorCode.AUTH));
  // A server with another secret: it rejects the client.
  const other = await fakeServer(t, { secret: Buffer.from('some-other-secret-0123456789abcd') });
  await assert.rejects(DataClient.connect({ port: other.port, secret: SECRET }), hasCode(ErrorCode.AUTH));
  // Not a Zebu replica at all.
  const http = await fakeServer(t, { onAccept: (socket) => socket.write('HTTP/1.1 400 Bad Request\r\n\r\n' + ' '.repeat(40)) });
  await assert.rejects(DataClient.connect({ port: http.port, secret: SECRET }), hasCode(ErrorCode.PROTOCOL));
  // A server that accepts and says nothing: connect times out.
  const mute = await fakeServer(t, { onAccept: () => {} });
  const started = Date.now();
  await assert.rejects(DataClient.connect({ port: mute.port, secret: SECRET, connectTimeoutMs: 300 }), hasCode(ErrorCode.TIMEOUT));
  assert.ok(Date.now() - started < 2000);
  // A server that closes during the handshake.
  const rude = await fakeServer(t, { onAccept: (socket) => socket.end(Buffer.alloc(10)) });
  await assert.rejects(DataClient.connect({ port: rude.port, secret: SECRET }), hasCode(ErrorCode.DISCONNECTED));
  // Nobody listening.
  const srv = net.createServer();
  await new Promise<void>((resolve) => srv.listen(0, '127.0.0.1', resolve));
  const deadPort = (srv.address() as net.AddressInfo).port;
  await new Promise<void>((resolve) => srv.close(() => resolve()));
  await assert.rejects(DataClient.connect({ port: deadPort, secret: SECRET }), hasCode(ErrorCode.DISCONNECTED));
});

test('a client whose own process stalled past the timeout reads the replies waiting for it instead of timing out', async (t) => {
  // A process that does not run (stopped, swapped out, a long pause) finds its request
  // deadlines passed when it runs again, while the replies sit unread in its sockets: timing
  // them out would fault healthy replicas. The stall is made real: the event loop is blocked
  // (in a check-phase callback, so the expired sweep runs before the sockets are polled).
  const { port, child } = await spawnReplica(t);
  const client = await DataClient.connect({ port, secret: SECRET, requestTimeoutMs: 300 });
  t.after(() => client.close());
  await client.write(0, pattern(7, 4096));
  child.kill('SIGSTOP'); // the request below cannot be answered before the stall begins
  const read = client.read(0, 4096);
  await new Promise((resolve) => process.nextTick(resolve)); // the request is on the wire
  await new Promise<void>((resolve) => setImmediate(() => {
    child.kill('SIGCONT');
    Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 1000); // the replica answers meanwhile
    resolve();
  }));
  assert.deepEqual(await read, pattern(7, 4096));
  // Deadlines count again once the process runs: a request the server never answers still times out.
  child.kill('SIGSTOP');
  t.after(() => child.kill('SIGCONT'));
  await assert.rejects(client.read(0, 4096), hasCode(ErrorCode.TIMEOUT));
});

test('payloadDone: once per send — when the bytes left, when a stalled peer\'s connection is destroyed with them queued, at once on a closed client', async (t) => {
  const { port } = await fakeServer(t, {
    onRequest(conn, h) {
      // The first request is answered; after it the server stops reading (a stalled peer).
      if (h.requestId === 1) {
        conn.reply(h.requestId, 0);
        conn.socket.pause();
      }
    },
  });
  const client = await DataClient.connect({ port, secret: SECRET, requestTimeoutMs: 300 });
  t.after(() => client.close());
  const send = (payload: Buffer): { answered: Promise<string>; let: { done: number } } => {
    const state = { done: 0 };
    const answered = new Promise<string>((resolve) => {
      client.send(Op.WRITE, 0, 0, payload.length, payload, (err) => resolve(err === null ? 'ok' : err.code), null, () => state.done++);
    });
    return { answered, let: state };
  };
  // Answered: the peer read the whole payload first, so the connection let go of it by then.
  const first = send(pattern(1, 256 * 1024));
  assert.equal(await first.answered, 'ok');
  assert.equal(first.let.done, 1);
  // Unanswered and stuck in the socket (more than the kernel's buffers hold): the request times
  // out but the connection still holds the payload — until the connection is destroyed.
  const stuck = send(Buffer.alloc(64 * 1024 * 1024, 7));
  assert.equal(await stuck.answered, ErrorCode.TIMEOUT);
  assert.equal(stuck.let.done, 0, 'a queued payload is still held after its request timed out');
  client.close();
  await new Promise((resolve) => setTimeout(resolve, 50));
  assert.equal(stuck.let.done, 1, 'destroying the connection lets the payload go');
  // A closed client never takes the payload.
  const late = send(pattern(2, 4096));
  assert.equal(late.let.done, 1);
  assert.equal(await late.answered, ErrorCode.CLOSED);
});
