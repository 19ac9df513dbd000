/**
 * An engine start never faults a volume for a race: it waits (bounded) for the replicas it was
 * given, takes their new addresses while it waits, refuses a process at an address that is
 * another replica, does not wait for replicas known to be out, and starts without the ones that
 * never came once the wait is over.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import path from 'node:path';
import { controlRequest } from '../../src/protocol/control-channel.ts';
import { AUTH_BYTES, checkAuth, encodeHello, newNonce } from '../../src/protocol/auth.ts';
import { startReplica, writeSecret } from '../support/replica-process.ts';
import { tempDir } from '../support/tmp.ts';
import { freePort } from '../support/volume-cluster.ts';
import { waitFor } from '../support/zebu-up.ts';
import { startEngine, restartReplica, engineInfo, type After } from './engine-process.ts';

const MiB = 1024 * 1024;
const SIZE = 16 * MiB;

/** A replica process named `name` (as the agent starts them), in dir/replica-i. */
async function namedReplica(t: After, dir: string, i: number, secretFile: string, name: string, port?: number) {
  const r = await startReplica({ dir: path.join(dir, `replica-${i}`), sizeBytes: SIZE, secretFile, port, extraArgs: ['--name', name] });
  t.after(() => r.child.kill('SIGKILL'));
  return r;
}

test('a replica that starts after its engine is waited for: every replica RW, nothing faulted', async (t) => {
  const dir = tempDir(t);
  const { file: secretFile } = writeSecret(dir);
  const r0 = await restartReplica(t, dir, 0, SIZE, secretFile);
  const latePort = await freePort();
  const started = Date.now();
  const engine = startEngine(t, dir, { sizeBytes: SIZE, replicas: [`127.0.0.1:${r0.port}`, `127.0.0.1:${latePort}`], epoch: 1, secretFile });
  // The engine is up (control socket) and says what it waits for.
  const control = path.join(dir, 'control-1.sock');
  await waitFor('engine waiting', async () => {
    const info = await engineInfo(control).catch(() => null);
    return info !== null && info.phase === 'starting' && info.waitingForReplicas.length === 1;
  }, 20_000, 50);
  await assert.rejects(controlRequest(control, 'GET', '/v1/replicas'), /starting/, 'other routes wait for the start');
  await new Promise((r) => setTimeout(r, 1000));
  await restartReplica(t, dir, 1, SIZE, secretFile, latePort);
  const ready = await engine;
  const info = await engineInfo(ready.control);
  assert.equal(info.phase, 'serving');
  assert.equal(info.faulted, false);
  assert.deepEqual(info.replicas.map((r) => r.mode), ['RW', 'RW']);
  assert.ok(Date.now() - started < 20_000, 'it went on as soon as the replica answered');
});

test('addresses handed over during the wait are used; a process that is another replica is refused', async (t) => {
  const dir = tempDir(t);
  const { file: secretFile } = writeSecret(dir);
  const a = await namedReplica(t, dir, 0, secretFile, 'vol-r-a');
  const b = await namedReplica(t, dir, 1, secretFile, 'vol-r-b');
  const stale = await freePort();
  // b is given at a's address (a reused port): the engine must not take a for b.
  const engine = startEngine(t, dir, { sizeBytes: SIZE, replicas: [`vol-r-a=127.0.0.1:${stale}`, `vol-r-b=127.0.0.1:${a.port}`], epoch: 1, secretFile });
  const control = path.join(dir, 'control-1.sock');
  await waitFor('engine waiting for both', async () => ((await engineInfo(control).catch(() => null))?.waitingForReplicas.length ?? 0) === 2, 20_000, 50);
  // Where they really are, as the agent learns it.
  const answer = (await controlRequest(control, 'POST', '/v1/startup/addresses', { addresses: { 'vol-r-a': `127.0.0.1:${a.port}`, 'vol-r-b': `127.0.0.1:${b.port}`, unknown: '127.0.0.1:1' } })) as { changed: string[] };
  assert.deepEqual(answer.changed.sort(), ['vol-r-a', 'vol-r-b']);
  const ready = await engine;
  const info = await engineInfo(ready.control);
  assert.deepEqual(info.replicas.map((r) => [r.key, r.address, r.mode]), [['vol-r-a', `127.0.0.1:${a.port}`, 'RW'], ['vol-r-b', `127.0.0.1:${b.port}`, 'RW']]);
  // Once serving, the set changes only by adding replicas.
  await assert.rejects(controlRequest(ready.control, 'POST', '/v1/startup/addresses', { addresses: { 'vol-r-a': '127.0.0.1:2' } }), /has started/);
  await assert.rejects(controlRequest(ready.control, 'POST', '/v1/startup/addresses', { addresses: ['x'] }), /"addresses" must be an object/);
});

test('an address handed over while the old one is being opened is used: an open in flight does not pin the replica there', async (t) => {
  const dir = tempDir(t);
  const { file: secretFile, secret } = writeSecret(dir);
  const b = await namedReplica(t, dir, 1, secretFile, 'vol-r-b');
  // At the stale address: a server that authenticates the engine and then never answers, so the
  // engine's OPEN there is in flight when the new address arrives.
  let requests = 0;
  const stall = net.createServer((socket) => {
    const nonce = newNonce();
    socket.write(encodeHello(nonce));
    let pending = Buffer.alloc(0);
    let authenticated = false;
    socket.on('data', (data: Buffer) => {
      if (authenticated) {
        requests++;
        return;
      }
      pending = Buffer.concat([pending, data]);
      if (pending.length < AUTH_BYTES) return;
      socket.write(checkAuth(secret, nonce, pending.subarray(0, AUTH_BYTES)).result);
      authenticated = true;
      if (pending.length > AUTH_BYTES) requests++;
    });
    socket.on('error', () => {});
  });
  await new Promise<void>((resolve) => stall.listen(0, '127.0.0.1', resolve));
  t.after(() => new Promise<void>((resolve) => stall.close(() => resolve())));
  const stalePort = (stall.address() as net.AddressInfo).port;
  const engine = startEngine(t, dir, { sizeBytes: SIZE, replicas: [`vol-r-b=127.0.0.1:${stalePort}`], epoch: 1, secretFile });
  const control = path.join(dir, 'control-1.sock');
  await waitFor('the open at the stale address in flight', async () => requests > 0 && (await engineInfo(control).catch(() => null)) !== null, 20_000, 20);
  const answer = (await controlRequest(control, 'POST', '/v1/startup/addresses', { addresses: { 'vol-r-b': `127.0.0.1:${b.port}` } })) as { changed: string[] };
  assert.deepEqual(answer.changed, ['vol-r-b']);
  const ready = await engine;
  const info = await engineInfo(ready.control);
  assert.deepEqual(info.replicas.map((r) => [r.key, r.address, r.mode]), [['vol-r-b', `127.0.0.1:${b.port}`, 'RW']]);
});

test('the wait is bounded: a replica that never comes is left out; one known to be out is not waited for; a wrong one is refused', async (t) => {
  const dir = tempDir(t);
  const { file: secretFile } = writeSecret(dir);
  const a = await namedReplica(t, dir, 0, secretFile, 'vol-r-a');
  const b = await namedReplica(t, dir, 1, secretFile, 'vol-r-b');
  const never = await freePort();

  // Known out: not waited for (the default wait is 30 s).
  let started = Date.now();
  const first = await startEngine(t, dir, { sizeBytes: SIZE, replicas: [`vol-r-a=127.0.0.1:${a.port}`, `vol-r-c=127.0.0.1:${never}`], epoch: 1, secretFile, replicaOut: ['vol-r-c'] });
  assert.ok(Date.now() - started < 10_000, `started in ${Date.now() - started} ms`);
  let info = await engineInfo(first.control);
  assert.deepEqual(info.replicas.map((r) => r.mode), ['RW', 'ERR']);
  first.child.kill('SIGTERM');
  await first.exited;

  // Never there, and the wrong replica at b's address: both out after the 1.5 s wait, a serves.
  started = Date.now();
  const second = await startEngine(t, dir, {
    sizeBytes: SIZE, replicas: [`vol-r-a=127.0.0.1:${a.port}`, `vol-r-c=127.0.0.1:${never}`, `vol-r-d=127.0.0.1:${b.port}`], epoch: 2, secretFile, replicaWaitMs: 1500,
  });
  const tookMs = Date.now() - started;
  assert.ok(tookMs >= 1400 && tookMs < 15_000, `started after ${tookMs} ms`);
  info = await engineInfo(second.control);
  assert.deepEqual(info.replicas.map((r) => r.mode), ['RW', 'ERR', 'ERR']);
  assert.match(info.replicas[2].reason ?? '', /is replica vol-r-b, not vol-r-d/);
  assert.equal(info.faulted, false);
  assert.ok(b.child.exitCode === null, 'the other replica was only refused');
});
