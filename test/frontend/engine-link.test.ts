/**
 * The frontend's engine link in-process, over stand-in engines (DataServers on in-memory
 * backends): an engine that stalls is killed and replaced and the client's requests are
 * re-issued to the new one (never to the hung one); held requests fail only after the hold
 * timeout; a restarted frontend serves its exports again from its state file, at once.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { Frontend } from '../../src/frontend/frontend.ts';
import type { ProcessIdentity } from '../../src/os/process-identity.ts';
import type { DataServer } from '../../src/protocol/server.ts';
import { tempDir, pattern } from '../support/tmp.ts';
import { MemoryBackend } from './memory-backend.ts';
import { NbdClient } from '../support/nbd-client.ts';
import { waitFor } from '../support/zebu-up.ts';

const SECRET = Buffer.from('zebu-test-secret-0123456789abcdef');
const MiB = 1024 * 1024;
const EIO = 5;

type T = { after: (fn: () => unknown) => void };

/** A stand-in engine "process": a backend served with an identity, which a kill ends. */
interface FakeEngine {
  identity: ProcessIdentity;
  backend: MemoryBackend;
  server: DataServer;
}

async function fakeEngine(t: T, socket: string, backend: MemoryBackend, pid: number): Promise<FakeEngine> {
  const identity = { pid, startTime: String(1000 + pid) };
  const server = await backend.serve(socket, SECRET, { process: identity });
  t.after(async () => {
    backend.release();
    await server.close(100);
  });
  return { identity, backend, server };
}

test('an engine that leaves requests unanswered is killed and replaced; the requests are re-issued to the new engine, never to the hung one', async (t) => {
  const dir = tempDir(t, 'zl-');
  const socket = path.join(dir, 'e.sock');
  let current = await fakeEngine(t, socket, new MemoryBackend(4 * MiB), 4_000_001);
  const hung = current;
  const kills: ProcessIdentity[] = [];
  let canKill = false;
  const frontend = new Frontend({
    secret: SECRET,
    heartbeatIntervalMs: 100,
    linkTimeouts: { stallTimeoutMs: 1000, hangTimeoutMs: 5000 },
    killEngine: (identity) => {
      kills.push(identity);
      if (!canKill) return false; // cannot kill it (yet): it stays, hung
      return true;
    },
  });
  t.after(() => frontend.close());
  await frontend.listenUnix(path.join(dir, 'nbd.sock'));
  await frontend.putExport('v', socket);
  const client = await NbdClient.connect({ path: path.join(dir, 'nbd.sock') }, 'v');
  t.after(() => client.destroy());
  assert.equal(await client.write(0, pattern(1, 64 * 1024)), 0);

  // The engine stops answering: a write and a read wait.
  hung.backend.hold();
  const write = client.write(64 * 1024, pattern(2, 64 * 1024));
  const read = client.read(0, 64 * 1024);
  await waitFor('the stall is found', () => kills.length >= 1, 10_000, 20);
  assert.deepEqual(kills[0], hung.identity);
  assert.equal(frontend.exportView('v').link.state, 'CLOSE');
  assert.equal(frontend.exportView('v').link.lastClose?.kind, 'engine-hung');
  // It could not be killed and still answers new connections: nothing is re-issued to it.
  await new Promise((r) => setTimeout(r, 800));
  assert.equal(hung.backend.held, 2, 'the hung engine got the two requests once, never again');
  assert.equal(frontend.exportView('v').link.state, 'CLOSE');

  // Its supervisor replaces it: a new process over the same replicas (the bytes as they were).
  canKill = true;
  await hung.server.close(0);
  current = await fakeEngine(t, socket, hung.backend.clone(), 4_000_002);
  assert.equal(await write, 0);
  const answer = await read;
  assert.equal(answer.errno, 0);
  assert.deepEqual(answer.data, pattern(1, 64 * 1024));
  assert.deepEqual(current.backend.peek(64 * 1024, 64 * 1024), pattern(2, 64 * 1024), 'the re-issued write reached the new engine');
  const link = frontend.exportView('v').link;
  assert.equal(link.state, 'OPEN');
  assert.deepEqual(link.engine, current.identity);
  assert.equal(link.hangs, 1);
  assert.equal(link.reopens, 1);
  assert.equal(link.reissued, 2);
  assert.ok(link.longestHoldMs >= 1000, `longest hold ${link.longestHoldMs} ms`);
  assert.equal(link.held, 0);
});

test('an engine that answers FENCED (superseded) is dropped: its requests wait for the next engine, never fail', async (t) => {
  const dir = tempDir(t, 'zl-');
  const socket = path.join(dir, 'e.sock');
  const old = await fakeEngine(t, socket, new MemoryBackend(4 * MiB), 4_000_005);
  const frontend = new Frontend({ secret: SECRET, heartbeatIntervalMs: 100 });
  t.after(() => frontend.close());
  await frontend.listenUnix(path.join(dir, 'nbd.sock'));
  await frontend.putExport('v', socket);
  const client = await NbdClient.connect({ path: path.join(dir, 'nbd.sock') }, 'v');
  t.after(() => client.destroy());
  assert.equal(await client.write(0, pattern(1, 64 * 1024)), 0);

  // A newer engine opened the replicas: this one answers FENCED from now on, and is still there.
  old.backend.fence();
  const write = client.write(64 * 1024, pattern(2, 64 * 1024));
  await waitFor('the link drops the superseded engine', () => frontend.exportView('v').link.state === 'CLOSE', 10_000, 20);
  assert.match(frontend.exportView('v').link.lastClose?.cause ?? '', /superseded/);
  await new Promise((r) => setTimeout(r, 500));
  assert.equal(frontend.exportView('v').link.state, 'CLOSE', 'it does not go back to the superseded engine');

  // The volume's next engine takes the socket over: the write reaches it.
  await old.server.close(0);
  const next = await fakeEngine(t, socket, old.backend.clone(), 4_000_006);
  assert.equal(await write, 0);
  assert.deepEqual(next.backend.peek(64 * 1024, 64 * 1024), pattern(2, 64 * 1024));
  assert.equal(frontend.exportView('v').link.state, 'OPEN');
});

test('requests held with no engine fail with EIO after the hold timeout, not before', async (t) => {
  const dir = tempDir(t, 'zl-');
  const socket = path.join(dir, 'e.sock');
  const engine = await fakeEngine(t, socket, new MemoryBackend(MiB), 4_000_003);
  const frontend = new Frontend({ secret: SECRET, heartbeatIntervalMs: 100, linkTimeouts: { holdTimeoutMs: 1500 } });
  t.after(() => frontend.close());
  await frontend.listenUnix(path.join(dir, 'nbd.sock'));
  await frontend.putExport('v', socket);
  const client = await NbdClient.connect({ path: path.join(dir, 'nbd.sock') }, 'v');
  t.after(() => client.destroy());
  await engine.server.close(0);
  fs.rmSync(socket, { force: true });
  const started = Date.now();
  const answer = await client.read(0, 4096);
  const waitedMs = Date.now() - started;
  assert.equal(answer.errno, EIO);
  assert.ok(waitedMs >= 1400 && waitedMs < 6000, `failed after ${waitedMs} ms`);
  assert.equal(frontend.exportView('v').link.state, 'CLOSE');
  assert.equal(frontend.exportView('v').link.lastClose?.kind, 'engine-lost');
});

test('a restarted frontend serves the exports of its state file at once; requests wait for the engine', async (t) => {
  const dir = tempDir(t, 'zl-');
  const socket = path.join(dir, 'e.sock');
  const stateFile = path.join(dir, 'frontend.state');
  const backend = new MemoryBackend(2 * MiB);
  const first = new Frontend({ secret: SECRET, stateFile });
  await first.listenUnix(path.join(dir, 'nbd1.sock'));
  const engine = await fakeEngine(t, socket, backend, 4_000_004);
  await first.putExport('v', socket, { timeouts: { holdTimeoutMs: 60_000 } });
  const client = await NbdClient.connect({ path: path.join(dir, 'nbd1.sock') }, 'v');
  assert.equal(await client.write(0, pattern(3, 8192)), 0);
  client.destroy();
  await first.close();
  // The engine is away while the frontend comes back.
  await engine.server.close(0);

  const second = new Frontend({ secret: SECRET, stateFile });
  t.after(() => second.close());
  assert.deepEqual(second.restore(), ['v']);
  await second.listenUnix(path.join(dir, 'nbd2.sock'));
  const view = second.exportView('v');
  assert.equal(view.sizeBytes, 2 * MiB, 'the size it had');
  assert.equal(view.link.state, 'CLOSE');
  assert.equal(view.link.lastClose?.kind, 'frontend-restarted');
  assert.equal(view.timeouts.holdTimeoutMs, 60_000, 'its deadlines too');
  const again = await NbdClient.connect({ path: path.join(dir, 'nbd2.sock') }, 'v');
  t.after(() => again.destroy());
  assert.equal(again.sizeBytes, 2 * MiB);
  const pending = again.read(0, 8192);
  await new Promise((r) => setTimeout(r, 300));
  await fakeEngine(t, socket, backend, 4_000_005);
  const answer = await pending;
  assert.equal(answer.errno, 0);
  assert.deepEqual(answer.data, pattern(3, 8192));
  await waitFor('link OPEN', () => second.exportView('v').link.state === 'OPEN', 20_000, 20);

  // A state file that cannot be read is set aside, never fatal.
  fs.writeFileSync(stateFile, '{"version": 1, "exports": {"BAD NAME": {}}}');
  const third = new Frontend({ secret: SECRET, stateFile });
  t.after(() => third.close());
  assert.deepEqual(third.restore(), []);
  assert.ok(fs.existsSync(`${stateFile}.bad`));
});
