/**
 * The node frontend in-process (src/frontend/frontend.ts and its control server) over stand-in
 * engines (a DataServer on an in-memory backend per export): adding, replacing, refreshing and
 * removing exports at run time while NBD clients have requests in flight, and the control API's
 * answers to bad requests.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import http from 'node:http';
import path from 'node:path';
import { Frontend } from '../../src/frontend/frontend.ts';
import { FrontendControlServer } from '../../src/frontend/control-server.ts';
import { FrontendControlClient } from '../../src/frontend/control-client.ts';
import { NbdErrno, Rep } from '../../src/frontend/nbd-protocol.ts';
import { controlRequest } from '../../src/protocol/control-channel.ts';
import { ZebuError, ErrorCode } from '../../src/errors.ts';
import type { DataServer } from '../../src/protocol/server.ts';
import { tempDir, pattern } from '../support/tmp.ts';
import { MemoryBackend } from './memory-backend.ts';
import { NbdClient, NbdOptionError, type NbdTarget } from '../support/nbd-client.ts';

const SECRET = Buffer.from('zebu-test-secret-0123456789abcdef');
const MiB = 1024 * 1024;

type T = { after: (fn: () => unknown) => void };

async function waitFor(what: string, condition: () => boolean | Promise<boolean>, timeoutMs = 20_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await condition())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

interface Node {
  frontend: Frontend;
  control: FrontendControlClient;
  controlSocket: string;
  nbd: NbdTarget;
  dir: string;
}

async function startNode(t: T, options: { drainTimeoutMs?: number; engineConnectTimeoutMs?: number } = {}): Promise<Node> {
  const dir = tempDir(t, 'zf-');
  const frontend = new Frontend({ secret: SECRET, ...options });
  const server = new FrontendControlServer(frontend);
  const controlSocket = path.join(dir, 'control.sock');
  await server.listen(controlSocket);
  await frontend.listenUnix(path.join(dir, 'nbd.sock'));
  t.after(async () => {
    server.close();
    await frontend.close();
  });
  return { frontend, control: new FrontendControlClient(controlSocket), controlSocket, nbd: { path: path.join(dir, 'nbd.sock') }, dir };
}

async function startEngine(t: T, dir: string, name: string, sizeBytes: number, secret = SECRET): Promise<{ backend: MemoryBackend; socket: string; server: DataServer }> {
  const backend = new MemoryBackend(sizeBytes);
  const socket = path.join(dir, `${name}.engine.sock`);
  const server = await backend.serve(socket, secret);
  t.after(async () => {
    backend.release();
    await server.close(1000);
  });
  return { backend, socket, server };
}

/** A raw HTTP request on the control socket: status and parsed body, whatever they are. */
function rawRequest(socketPath: string, method: string, pathName: string, body?: string | Buffer): Promise<{ status: number; body: { error?: string; code?: string } & Record<string, unknown> }> {
  return new Promise((resolve, reject) => {
    const req = http.request({ socketPath, method, path: pathName }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body: JSON.parse(Buffer.concat(chunks).toString() || '{}') }));
    });
    req.on('error', reject);
    req.end(body);
  });
}

async function rejectsWith(promise: Promise<unknown>, code: ErrorCode, message?: RegExp): Promise<ZebuError> {
  try {
    await promise;
  } catch (err) {
    assert.ok(err instanceof ZebuError, String(err));
    assert.equal(err.code, code, err.message);
    if (message !== undefined) assert.match(err.message, message);
    return err;
  }
  assert.fail(`expected ${code}`);
}

test('exports are added, listed and served side by side; PUT is idempotent', async (t) => {
  const node = await startNode(t);
  const a = await startEngine(t, node.dir, 'a', 4 * MiB);
  const b = await startEngine(t, node.dir, 'b', 8 * MiB);
  assert.deepEqual(await node.control.listExports(), []);
  const viewA = await node.control.putExport('a', a.socket);
  const { link, timeouts, ...rest } = viewA;
  assert.deepEqual(rest, { name: 'a', sizeBytes: 4 * MiB, engineSocket: a.socket, connections: 0, outstanding: 0, engineConnected: true });
  assert.equal(link.state, 'OPEN');
  assert.equal(link.engine, null, 'an in-process engine does not name a process to kill');
  // Deadlines per export: a PUT of the same socket changes only them.
  assert.equal(timeouts.holdTimeoutMs, 300_000);
  const tuned = await node.control.putExport('a', a.socket, { holdTimeoutMs: 5000, hangTimeoutMs: 2000 });
  assert.deepEqual(tuned.timeouts, { holdTimeoutMs: 5000, hangTimeoutMs: 2000, stallTimeoutMs: 60_000 });
  assert.equal(tuned.link.stateSince, link.stateSince, 'the same link');
  await node.control.putExport('b', b.socket);
  const info = await node.control.info();
  assert.equal(info.exports, 2);
  assert.equal(info.pid, process.pid);
  assert.equal(info.nbdSocket, (node.nbd as { path: string }).path);
  assert.equal(info.nbdAddress, null);

  const ca = await NbdClient.connect(node.nbd, 'a');
  const cb = await NbdClient.connect(node.nbd, 'b');
  assert.equal(ca.sizeBytes, 4 * MiB);
  assert.equal(cb.sizeBytes, 8 * MiB);
  assert.equal(await ca.write(0, pattern(1, 64 * 1024)), 0);
  assert.equal(await cb.write(0, pattern(2, 64 * 1024)), 0);
  assert.deepEqual((await ca.read(0, 64 * 1024)).data, pattern(1, 64 * 1024));
  assert.deepEqual((await cb.read(0, 64 * 1024)).data, pattern(2, 64 * 1024));

  // The same PUT again: same view, and the open connection keeps working on the same link.
  const again = await node.control.putExport('a', a.socket);
  assert.deepEqual(again, { ...viewA, connections: 1, timeouts: tuned.timeouts });
  assert.equal(await ca.write(4096, pattern(3, 4096)), 0);
  assert.equal(ca.isClosed, false);
  // Concurrent identical PUTs all answer the same.
  const views = await Promise.all([1, 2, 3, 4].map(() => node.control.putExport('b', b.socket)));
  for (const v of views) assert.equal(v.engineSocket, b.socket);
  assert.equal((await node.control.listExports()).length, 2);
  assert.deepEqual((await node.control.getExport('b'))?.connections, 1);
  assert.equal(await node.control.getExport('zzz'), null);
  await ca.disconnect();
  await cb.disconnect();
});

test('DELETE answers in-flight requests first, refuses new ones, then disconnects; other exports go on', async (t) => {
  const node = await startNode(t);
  const a = await startEngine(t, node.dir, 'a', 4 * MiB);
  const b = await startEngine(t, node.dir, 'b', 4 * MiB);
  await node.control.putExport('a', a.socket);
  await node.control.putExport('b', b.socket);
  const ca = await NbdClient.connect(node.nbd, 'a');
  const cb = await NbdClient.connect(node.nbd, 'b');

  a.backend.hold();
  const writes = Array.from({ length: 16 }, (_, i) => ca.write(i * 4096, pattern(100 + i, 4096)));
  await waitFor('16 writes held in the engine', () => a.backend.held === 16);
  const removal = node.control.removeExport('a');
  // New handshakes for "a" fail at once, while the old connection drains.
  await waitFor('export a gone from the list', async () => (await node.control.listExports()).every((e) => e.name !== 'a'));
  await assert.rejects(NbdClient.connect(node.nbd, 'a'), (err: NbdOptionError) => err.reply === Rep.ERR_UNKNOWN);
  // A request that arrives during the drain is refused with ESHUTDOWN, not left unanswered.
  assert.equal(await ca.write(0, pattern(9, 4096)), NbdErrno.ESHUTDOWN);
  // The other export is untouched.
  assert.equal(await cb.write(0, pattern(7, 4096)), 0);
  assert.deepEqual((await cb.read(0, 4096)).data, pattern(7, 4096));

  a.backend.release();
  assert.deepEqual(await Promise.all(writes), new Array(16).fill(0), 'every in-flight write was answered with success');
  assert.deepEqual(await removal, { removed: 'a', connections: 1, drained: true });
  await ca.closed;
  assert.equal(cb.isClosed, false);
  assert.equal(await cb.flush(), 0);

  // The data reached the engine; a new PUT serves it again.
  await node.control.putExport('a', a.socket);
  const again = await NbdClient.connect(node.nbd, 'a');
  for (let i = 0; i < 16; i++) assert.deepEqual((await again.read(i * 4096, 4096)).data, pattern(100 + i, 4096));
  await again.disconnect();
  await cb.disconnect();
  assert.equal(await node.control.removeExport('nope'), null);
});

test('DELETE with an engine that never answers: bounded by the drain timeout', async (t) => {
  const node = await startNode(t, { drainTimeoutMs: 500 });
  const a = await startEngine(t, node.dir, 'a', 4 * MiB);
  await node.control.putExport('a', a.socket);
  const ca = await NbdClient.connect(node.nbd, 'a');
  a.backend.hold();
  const write = ca.write(0, pattern(1, 4096)).catch((err: Error) => err.message);
  await waitFor('write held', () => a.backend.held === 1);
  const startedMs = Date.now();
  const result = await node.control.removeExport('a');
  assert.deepEqual(result, { removed: 'a', connections: 1, drained: false });
  assert.ok(Date.now() - startedMs < 10_000);
  await ca.closed;
  assert.match(String(await write), /closed/);
});

test('PUT with another engine socket replaces the export: old clients drained, new ones go to the new engine', async (t) => {
  const node = await startNode(t);
  const one = await startEngine(t, node.dir, 'one', 4 * MiB);
  const two = await startEngine(t, node.dir, 'two', 6 * MiB);
  await node.control.putExport('vol', one.socket);
  const oldClient = await NbdClient.connect(node.nbd, 'vol');
  one.backend.hold();
  const writes = [0, 1, 2, 3].map((i) => oldClient.write(i * 4096, pattern(i, 4096)));
  await waitFor('writes held', () => one.backend.held === 4);
  const replacing = node.control.putExport('vol', two.socket);
  // While the old engine's clients drain, new clients already reach the new engine.
  const newClient = await waitForConnect(node.nbd, 'vol', (c) => c.sizeBytes === 6 * MiB);
  assert.equal(await newClient.write(0, pattern(50, 4096)), 0);
  assert.equal(await oldClient.write(0, pattern(51, 4096)), NbdErrno.ESHUTDOWN);
  one.backend.release();
  assert.deepEqual(await Promise.all(writes), [0, 0, 0, 0]);
  const view = await replacing;
  assert.equal(view.engineSocket, two.socket);
  assert.equal(view.sizeBytes, 6 * MiB);
  await oldClient.closed;
  assert.deepEqual((await newClient.read(0, 4096)).data, pattern(50, 4096));
  await newClient.disconnect();
});

async function waitForConnect(target: NbdTarget, name: string, accept: (c: NbdClient) => boolean): Promise<NbdClient> {
  const deadline = Date.now() + 20_000;
  for (;;) {
    const c = await NbdClient.connect(target, name).catch(() => null);
    if (c !== null && accept(c)) return c;
    if (c !== null) await c.disconnect();
    if (Date.now() > deadline) throw new Error(`no acceptable connection to ${name}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

test('refresh: new connections see the grown size, open ones keep theirs', async (t) => {
  const node = await startNode(t);
  const a = await startEngine(t, node.dir, 'a', 4 * MiB);
  await node.control.putExport('a', a.socket);
  const before = await NbdClient.connect(node.nbd, 'a');
  a.backend.resize(12 * MiB);
  // Not refreshed yet: the frontend still says 4 MiB.
  assert.equal((await NbdClient.connect(node.nbd, 'a').then(async (c) => (await c.disconnect(), c))).sizeBytes, 4 * MiB);
  const view = await node.control.refreshExport('a');
  assert.equal(view.sizeBytes, 12 * MiB);
  const after = await NbdClient.connect(node.nbd, 'a');
  assert.equal(after.sizeBytes, 12 * MiB);
  assert.equal(await after.write(10 * MiB, pattern(5, 4096)), 0);
  assert.deepEqual((await after.read(10 * MiB, 4096)).data, pattern(5, 4096));
  // The old connection was told 4 MiB and keeps that size: NBD cannot change it under a client.
  assert.equal((await before.read(10 * MiB, 4096)).errno, NbdErrno.EINVAL);
  assert.equal((await before.read(0, 4096)).errno, 0);
  await rejectsWith(node.control.refreshExport('absent'), ErrorCode.NOT_FOUND);
  await before.disconnect();
  await after.disconnect();
});

test('an engine socket that is missing fails in bounded time; one that appears late is waited for', async (t) => {
  const node = await startNode(t, { engineConnectTimeoutMs: 1500 });
  const missing = path.join(node.dir, 'missing.sock');
  const startedMs = Date.now();
  await rejectsWith(node.control.putExport('m', missing), ErrorCode.DISCONNECTED, /engine of export m not reachable at .*missing\.sock within 1500 ms/);
  assert.ok(Date.now() - startedMs < 10_000, 'bounded');
  assert.equal(await node.control.getExport('m'), null);
  // Through HTTP: 503.
  const raw = await rawRequest(node.controlSocket, 'PUT', '/v1/exports/m', JSON.stringify({ engineSocket: missing }));
  assert.equal(raw.status, 503);
  assert.equal(raw.body.code, ErrorCode.DISCONNECTED);

  const late = path.join(node.dir, 'late.engine.sock');
  const put = node.control.putExport('late', late);
  await new Promise((r) => setTimeout(r, 400));
  const backend = new MemoryBackend(MiB);
  const server = await backend.serve(late, SECRET);
  t.after(() => server.close(1000));
  assert.equal((await put).sizeBytes, MiB);

  // A wrong secret is not retried until the deadline: it cannot fix itself.
  const wrong = await startEngine(t, node.dir, 'wrong', MiB, Buffer.from('another-secret-0123456789abcdef'));
  const r = await rawRequest(node.controlSocket, 'PUT', '/v1/exports/w', JSON.stringify({ engineSocket: wrong.socket }));
  assert.equal(r.status, 502, JSON.stringify(r.body));
  assert.equal(r.body.code, ErrorCode.AUTH);
});

test('bad control requests get 400/404/405 with a code, and the frontend keeps serving', async (t) => {
  const node = await startNode(t);
  const a = await startEngine(t, node.dir, 'a', MiB);
  await node.control.putExport('a', a.socket);
  const cases: [string, string, string | Buffer | undefined, number, string][] = [
    ['PUT', '/v1/exports/x', '{not json', 400, ErrorCode.EINVAL],
    ['PUT', '/v1/exports/x', '', 400, ErrorCode.EINVAL],
    ['PUT', '/v1/exports/x', '[1,2]', 400, ErrorCode.EINVAL],
    ['PUT', '/v1/exports/x', '"str"', 400, ErrorCode.EINVAL],
    ['PUT', '/v1/exports/x', 'null', 400, ErrorCode.EINVAL],
    ['PUT', '/v1/exports/x', '{}', 400, ErrorCode.EINVAL],
    ['PUT', '/v1/exports/x', '{"engineSocket": 5}', 400, ErrorCode.EINVAL],
    ['PUT', '/v1/exports/x', '{"engineSocket": ""}', 400, ErrorCode.EINVAL],
    ['PUT', '/v1/exports/x', '{"engineSocket": "relative/e.sock"}', 400, ErrorCode.EINVAL],
    ['PUT', '/v1/exports/x', JSON.stringify({ engineSocket: '/' + 'x'.repeat(200) }), 400, ErrorCode.EINVAL],
    ['PUT', '/v1/exports/x', JSON.stringify({ engineSocket: '/tmp/e.sock', extra: 1 }), 400, ErrorCode.EINVAL],
    ['PUT', '/v1/exports/x', Buffer.alloc(200 * 1024, 0x20), 400, ErrorCode.EINVAL],
    ['PUT', '/v1/exports/Upper', JSON.stringify({ engineSocket: a.socket }), 400, ErrorCode.EINVAL],
    ['PUT', '/v1/exports/-dash', JSON.stringify({ engineSocket: a.socket }), 400, ErrorCode.EINVAL],
    ['PUT', `/v1/exports/${'n'.repeat(64)}`, JSON.stringify({ engineSocket: a.socket }), 400, ErrorCode.EINVAL],
    ['PUT', '/v1/exports/%zz', JSON.stringify({ engineSocket: a.socket }), 400, ErrorCode.EINVAL],
    ['PUT', '/v1/exports/a%2Fb', JSON.stringify({ engineSocket: a.socket }), 400, ErrorCode.EINVAL],
    ['GET', '/v1/exports/UPPER', undefined, 400, ErrorCode.EINVAL],
    ['GET', '/v1/exports/absent', undefined, 404, ErrorCode.NOT_FOUND],
    ['DELETE', '/v1/exports/absent', undefined, 404, ErrorCode.NOT_FOUND],
    ['POST', '/v1/exports/absent/refresh', undefined, 404, ErrorCode.NOT_FOUND],
    ['GET', '/v1/nothing', undefined, 404, ErrorCode.NOT_FOUND],
    ['GET', '/', undefined, 404, ErrorCode.NOT_FOUND],
    ['GET', '/v1/exports/a/b/c', undefined, 404, ErrorCode.NOT_FOUND],
    ['POST', '/v1/exports', '{}', 405, ErrorCode.UNSUPPORTED],
    ['DELETE', '/v1/info', undefined, 405, ErrorCode.UNSUPPORTED],
    ['PATCH', '/v1/exports/a', '{}', 405, ErrorCode.UNSUPPORTED],
    ['GET', '/v1/exports/a/refresh', undefined, 405, ErrorCode.UNSUPPORTED],
  ];
  for (const [method, url, body, status, code] of cases) {
    const r = await rawRequest(node.controlSocket, method, url, body);
    assert.equal(r.status, status, `${method} ${url}: ${JSON.stringify(r.body)}`);
    assert.equal(r.body.code, code, `${method} ${url}`);
    assert.equal(typeof r.body.error, 'string');
  }
  // The engine's client works on this socket too; its errors carry the same codes.
  await rejectsWith(controlRequest(node.controlSocket, 'PUT', '/v1/exports/x', { engineSocket: 7 }), ErrorCode.EINVAL, /engineSocket/);
  assert.equal(((await controlRequest(node.controlSocket, 'GET', '/v1/info')) as { exports: number }).exports, 1);
  const c = await NbdClient.connect(node.nbd, 'a');
  assert.equal(await c.write(0, pattern(1, 4096)), 0);
  await c.disconnect();
});

test('PUT and DELETE of one name are serialized; closing answers in-flight requests first', async (t) => {
  const node = await startNode(t);
  const a = await startEngine(t, node.dir, 'a', MiB);
  const ops = [
    node.control.putExport('a', a.socket),
    node.control.removeExport('a'),
    node.control.putExport('a', a.socket),
    node.control.removeExport('a'),
    node.control.putExport('a', a.socket),
  ];
  const results = await Promise.all(ops);
  assert.deepEqual(results.map((r) => r !== null && 'removed' in r ? 'removed' : (r as { name: string }).name), ['a', 'removed', 'a', 'removed', 'a']);
  assert.equal((await node.control.listExports()).length, 1);

  const c = await NbdClient.connect(node.nbd, 'a');
  a.backend.hold();
  const writes = [0, 1, 2].map((i) => c.write(i * 4096, pattern(i, 4096)));
  await waitFor('writes held', () => a.backend.held === 3);
  const closing = node.frontend.close();
  await new Promise((r) => setTimeout(r, 100));
  a.backend.release();
  assert.deepEqual(await Promise.all(writes), [0, 0, 0]);
  await closing;
  await c.closed;
  assert.deepEqual(node.frontend.exportViews(), []);
});
