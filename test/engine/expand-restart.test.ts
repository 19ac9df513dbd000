/**
 * Engine processes (`zebu engine serve`, `zebu frontend serve`) over real replica processes:
 * online expansion seen by a new NBD connection; an engine start that grows a replica left at the
 * old size; a rebuild whose target dies (it goes on where it stopped: added again, and under a
 * restarted engine) or whose source
 * dies (the copy goes on from another RW replica, clients see no error); a rebuild stopped by
 * removing its target; snapshot changes refused while a rebuild runs.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { controlRequest } from '../../src/protocol/control-channel.ts';
import { FrontendControlClient } from '../../src/frontend/control-client.ts';
import { DataClient } from '../../src/protocol/client.ts';
import { startReplica, writeSecret, ZEBU_MAIN, type ReplicaProcess } from '../support/replica-process.ts';
import { startVolume, replicaDigest, mustRun } from '../support/volume-cluster.ts';
import { startFio, fioFigures } from '../support/fio.ts';
import { tempDir, pattern } from '../support/tmp.ts';
import { waitFor } from '../support/zebu-up.ts';
import { watchChildStart } from '../support/child-ready.ts';
import { startReplicas } from './engine-process.ts';

const MiB = 1024 * 1024;

type After = { after: (fn: () => unknown) => void };

interface ReplicaRow {
  address: string;
  mode: 'RW' | 'WO' | 'ERR';
  reason: string | null;
  rebuild: { copiedBytes: number; totalBytes: number } | null;
}

interface EngineInfo {
  sizeBytes: number;
  epoch: number;
  faulted: boolean;
  faultedReason: string | null;
  rebuilding: boolean;
  replicas: ReplicaRow[];
  stats: Record<string, number>;
}

interface Spawned {
  child: ChildProcess;
  ready: Record<string, unknown>;
  exited: Promise<number | string>;
}

/** Runs `zebu ARGS…` until it prints its ready line; SIGKILLed when the test ends. */
async function spawnReady(t: After, args: string[]): Promise<Spawned> {
  const child = spawn(process.execPath, [ZEBU_MAIN, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  t.after(() => child.kill('SIGKILL'));
  const start = watchChildStart(child, args[0], 30_000, 50_000);
  const ready = await start.ready;
  return { child, ready, exited: start.exited };
}

interface EngineProcess extends Spawned {
  socket: string;
  control: string;
}

function startEngine(t: After, dir: string, options: { sizeBytes: number; replicas: string[]; epoch: number; secretFile: string; extra?: string[] }): Promise<EngineProcess> {
  const socket = path.join(dir, `engine-${options.epoch}.sock`);
  const control = path.join(dir, `control-${options.epoch}.sock`);
  return spawnReady(t, [
    'engine', 'serve', '--name', 'vol', '--size', String(options.sizeBytes), ...options.replicas.flatMap((r) => ['--replica', r]),
    '--socket', socket, '--control-socket', control, '--secret-file', options.secretFile, '--epoch', String(options.epoch),
    '--request-timeout-ms', '3000', ...(options.extra ?? []),
  ]).then((s) => ({ ...s, socket, control }));
}

async function stopEngine(engine: EngineProcess): Promise<void> {
  engine.child.kill('SIGTERM');
  assert.equal(await engine.exited, 0);
}

function info(control: string): Promise<EngineInfo> {
  return controlRequest(control, 'GET', '/v1/info') as Promise<EngineInfo>;
}

function replicasOf(control: string): Promise<ReplicaRow[]> {
  return controlRequest(control, 'GET', '/v1/replicas') as Promise<ReplicaRow[]>;
}

function qemuIo(uri: string, ...commands: string[]): string {
  const out = mustRun('qemu-io', ['-f', 'raw', ...commands.flatMap((c) => ['-c', c]), uri], { timeoutMs: 120_000 });
  assert.doesNotMatch(out, /verification failed|error/i, out);
  return out;
}

function nbdSize(uri: string): number {
  return Number(mustRun('nbdinfo', ['--size', uri]).trim());
}

async function expectError(promise: Promise<unknown>, pattern: RegExp): Promise<void> {
  await assert.rejects(promise, (err: Error) => {
    assert.match(err.message, pattern);
    return true;
  });
}

/** SIGKILLs the rebuild target (the third replica) once its copy reached `bytes`; resolves when the engine has it ERR. */
async function killTargetWhenCopied(engine: EngineProcess, target: ReplicaProcess, bytes: number, what: string): Promise<void> {
  await waitFor(what, async () => ((await replicasOf(engine.control))[2].rebuild?.copiedBytes ?? 0) >= bytes, 60_000, 2);
  target.child.kill('SIGKILL');
  await target.exited;
  await waitFor('target ERR', async () => (await replicasOf(engine.control))[2].mode === 'ERR', 30_000, 50);
}

/** Inverts one byte of a file (bit rot while its replica is down). */
function flipByte(file: string, position: number): void {
  const fd = fs.openSync(file, 'r+');
  const byte = Buffer.alloc(1);
  fs.readSync(fd, byte, 0, 1, position);
  byte[0] ^= 0xff;
  fs.writeSync(fd, byte, 0, 1, position);
  fs.closeSync(fd);
}

/** Writes `pattern(seed)` over [0, bytes) through the engine's own data socket. */
async function fillThroughEngine(engine: EngineProcess, secret: Buffer, bytes: number, seed: number): Promise<void> {
  const client = await DataClient.connect({ path: engine.socket, secret, peerLabel: 'engine', requestTimeoutMs: 60_000 });
  try {
    const chunk = pattern(seed, 4 * MiB);
    const writes: Promise<void>[] = [];
    for (let offset = 0; offset < bytes; offset += 4 * MiB) writes.push(client.write(offset, chunk));
    await Promise.all(writes);
    await client.flush();
  } finally {
    client.close();
  }
}

test('online expansion: a new NBD connection sees the new size; an engine start grows a replica left at the old size', async (t) => {
  const dir = tempDir(t);
  const { file: secretFile, secret } = writeSecret(dir);
  const OLD = 64 * MiB;
  const NEW = 128 * MiB;
  const replicas = await startReplicas(t, dir, 2, OLD, secretFile);
  const addresses = replicas.map((r) => `127.0.0.1:${r.port}`);
  let engine = await startEngine(t, dir, { sizeBytes: OLD, replicas: addresses, epoch: 1, secretFile });
  const nbdSocket = path.join(dir, 'nbd.sock');
  const frontendControl = path.join(dir, 'frontend.sock');
  await spawnReady(t, ['frontend', 'serve', '--secret-file', secretFile, '--nbd-socket', nbdSocket, '--control-socket', frontendControl]);
  const frontend = new FrontendControlClient(frontendControl);
  await frontend.putExport('vol', engine.socket);
  const uri = `nbd+unix:///vol?socket=${nbdSocket}`;

  qemuIo(uri, 'write -P 0x31 0 16M', 'write -P 0x32 60M 4M', 'flush');
  assert.equal(nbdSize(uri), OLD);
  // Replica 1 goes away (flushed, so it is not behind); the volume grows without it.
  replicas[1].child.kill('SIGKILL');
  await replicas[1].exited;
  await waitFor('replica 1 ERR', async () => (await replicasOf(engine.control))[1].mode === 'ERR', 30_000, 50);

  const grown = (await controlRequest(engine.control, 'POST', '/v1/expand', { sizeBytes: NEW })) as EngineInfo;
  // The same body as GET /v1/info.
  assert.equal(grown.sizeBytes, NEW);
  assert.deepEqual(Object.keys(grown).sort(), Object.keys(await info(engine.control)).sort());
  for (const key of ['sizeBytes', 'epoch', 'faulted', 'faultedReason', 'rebuilding', 'replicas', 'stats']) assert.ok(key in grown, key);
  for (const key of ['reads', 'writes', 'readBytes', 'writeBytes', 'errors', 'readLatencyMsTotal', 'writeLatencyMsTotal']) assert.equal(typeof grown.stats[key], 'number', key);
  assert.deepEqual((await controlRequest(engine.control, 'POST', '/v1/expand', { sizeBytes: NEW })) as EngineInfo, await info(engine.control), 'again: nothing to do');
  await expectError(controlRequest(engine.control, 'POST', '/v1/expand', { sizeBytes: '1G' }), /must be a number/);

  await frontend.refreshExport('vol');
  assert.equal(nbdSize(uri), NEW, 'a new NBD connection sees the new size');
  qemuIo(uri, 'read -P 0x31 0 16M', 'read -P 0x32 60M 4M', 'read -P 0 64M 64M');

  // The engine restarts with the new size; replica 1 comes back at the old one (as a replica
  // started from an old spec would): the engine grows it before choosing modes.
  await stopEngine(engine);
  replicas[1] = await startReplica({ dir: path.join(dir, 'replica-1'), sizeBytes: OLD, secretFile, port: replicas[1].port });
  t.after(() => replicas[1].child.kill('SIGKILL'));
  engine = await startEngine(t, dir, { sizeBytes: NEW, replicas: addresses, epoch: 2, secretFile });
  // Replica 0 kept a missed-write map for it (it went out): a delta rebuild of the few regions
  // that map names brings it back, not a full one.
  const control = engine.control;
  await waitFor('replica 1 RW again', async () => (await replicasOf(control))[1].mode === 'RW', 30_000, 50);
  const after = await info(engine.control);
  assert.deepEqual(after.replicas.map((r) => [r.mode, r.reason]), [['RW', null], ['RW', null]]);
  const lastRebuild = (after as unknown as { lastRebuild: { delta: boolean; copiedBytes: number } | null }).lastRebuild;
  // At most the 5 regions written before it went out (still active: no later flush confirmed them).
  assert.ok(lastRebuild !== null && lastRebuild.delta && lastRebuild.copiedBytes <= 20 * MiB, JSON.stringify(lastRebuild));
  for (const r of replicas) {
    const c = await DataClient.connect({ port: r.port, secret, epoch: 2 });
    assert.equal((await c.info()).sizeBytes, NEW);
    c.close();
  }
  await frontend.putExport('vol', engine.socket);
  await frontend.refreshExport('vol');
  assert.equal(nbdSize(uri), NEW);
  qemuIo(uri, 'write -P 0x33 124M 4M', 'flush', 'read -P 0x33 124M 4M', 'read -P 0x31 0 16M');
  const digests = await Promise.all(replicas.map((r) => replicaDigest(r.port, secret, 2, NEW)));
  assert.equal(digests[0], digests[1]);
});

test('a rebuild target SIGKILLed midway resumes: added again, and again after an engine restart, only what is left is copied', async (t) => {
  const dir = tempDir(t);
  const { file: secretFile, secret } = writeSecret(dir);
  const size = 256 * MiB;
  const region = 4 * MiB;
  const replicas = await startReplicas(t, dir, 2, size, secretFile);
  const addresses = replicas.map((r) => `127.0.0.1:${r.port}`);
  let engine = await startEngine(t, dir, { sizeBytes: size, replicas: addresses, epoch: 1, secretFile });
  await fillThroughEngine(engine, secret, 192 * MiB, 5);
  // Regions written a moment ago stay in the write-intent logs (and so in any missed-write map)
  // until an idle flush lets them go: a rebuild cannot count them done before that.
  await waitFor('the fill out of the write-intent logs', async () => ((await info(engine.control)) as unknown as { activeRegions: number }).activeRegions === 0, 30_000, 100);

  let victim = await startReplica({ dir: path.join(dir, 'victim'), sizeBytes: size, secretFile });
  t.after(() => victim.child.kill('SIGKILL'));
  const victimAddress = `127.0.0.1:${victim.port}`;
  const list = (await controlRequest(engine.control, 'POST', '/v1/replicas', { address: victimAddress })) as ReplicaRow[];
  assert.deepEqual(list.map((r) => r.mode), ['RW', 'RW', 'WO']);
  assert.equal((await info(engine.control)).rebuilding, true);
  // Killed once half of the volume is over (regions count as copied when whole).
  const copiedFirst = await waitFor('half copied', async () => {
    const copied = (await replicasOf(engine.control))[2].rebuild?.copiedBytes ?? 0;
    return copied >= size / 2 ? copied : undefined;
  }, 60_000, 2);
  victim.child.kill('SIGKILL');
  await victim.exited;
  const failed = await waitFor('target ERR', async () => {
    const row = (await replicasOf(engine.control))[2];
    return row.mode === 'ERR' ? row : undefined;
  }, 30_000, 50);
  assert.equal(failed.rebuild, null);
  assert.ok(failed.reason !== null && failed.reason.length > 0);
  const during = await info(engine.control);
  assert.equal(during.rebuilding, false);
  assert.equal(during.faulted, false);
  assert.equal(during.stats.errors, 0);

  // What the map holders say is left: whole regions, and regions copied in part up to a chunk
  // the target had made durable (no client writes here: every note stands).
  const maps = await Promise.all(replicas.map(async (r) => {
    const c = await DataClient.connect({ port: r.port, secret, epoch: 1 });
    try {
      return await c.missedMap(victimAddress);
    } finally {
      c.close();
    }
  }));
  assert.deepEqual(maps[1], maps[0]);
  const partBytes = maps[0].partial.reduce((sum, [, upTo]) => sum + upTo, 0);
  assert.ok(maps[0].partial.length > 0, `the regions under way when the target died were noted in part: ${JSON.stringify(maps[0])}`);
  // Back, and added again: a delta rebuild of what was not copied. Copied twice at most: the
  // chunks under way when it died (sixteen regions at once) and those whose flush on the target
  // had not yet come back (they leave the maps only once durable there).
  const left = (copied: number): number => size - copied + 24 * region;
  victim = await startReplica({ dir: path.join(dir, 'victim'), sizeBytes: size, secretFile, port: victim.port });
  t.after(() => victim.child.kill('SIGKILL'));
  const again = (await controlRequest(engine.control, 'POST', '/v1/replicas', { address: victimAddress })) as ReplicaRow[];
  assert.equal(again[2].mode, 'WO');
  assert.equal((again[2].rebuild as { delta?: boolean } | null)?.delta, true, JSON.stringify(again[2]));
  const second = await waitFor('the delta counted', async () => {
    const row = (await replicasOf(engine.control))[2];
    return row.rebuild !== null && row.rebuild.totalBytes > 0 ? row.rebuild : undefined;
  }, 30_000, 2);
  assert.ok(second.totalBytes <= left(copiedFirst), `resumed: ${second.totalBytes} bytes to copy after ${copiedFirst} were copied`);
  assert.equal(second.totalBytes, maps[0].regions.length * region - partBytes, 'what the maps name, less the fronts copied already');
  // Killed again midway through the delta; this time the engine restarts too (a new attachment).
  await waitFor('a part of the delta copied', async () => ((await replicasOf(engine.control))[2].rebuild?.copiedBytes ?? 0) >= second.totalBytes / 2, 60_000, 2);
  victim.child.kill('SIGKILL');
  await victim.exited;
  await waitFor('target ERR again', async () => (await replicasOf(engine.control))[2].mode === 'ERR', 30_000, 50);
  await stopEngine(engine);
  victim = await startReplica({ dir: path.join(dir, 'victim'), sizeBytes: size, secretFile, port: victim.port });
  t.after(() => victim.child.kill('SIGKILL'));
  engine = await startEngine(t, dir, { sizeBytes: size, replicas: [...addresses, victimAddress], epoch: 2, secretFile });
  const control = engine.control;
  await waitFor('the victim RW after its resumed rebuild', async () => (await replicasOf(control))[2].mode === 'RW', 60_000, 50);
  const last = (await info(control) as unknown as { lastRebuild: { delta: boolean; copiedBytes: number; totalBytes: number } | null }).lastRebuild;
  assert.ok(last !== null && last.delta, JSON.stringify(last));
  assert.ok(last.totalBytes < second.totalBytes, `the third copy (${last.totalBytes} bytes) is less than the second (${second.totalBytes})`);
  // The data is the sources', on every replica.
  const client = await DataClient.connect({ path: engine.socket, secret, peerLabel: 'engine' });
  assert.deepEqual(await client.read(188 * MiB, 4 * MiB), pattern(5, 4 * MiB));
  assert.ok((await client.read(192 * MiB, 4 * MiB)).every((b) => b === 0));
  client.close();
  await stopEngine(engine);
  const digests = await Promise.all([...replicas, victim].map((r) => replicaDigest(r.port, secret, 3, size)));
  assert.equal(digests[2], digests[0]);
  assert.equal(digests[1], digests[0]);
});

test('a rebuild target, then its engine, SIGKILLed while snapshots are copied: it goes on over the snapshots it completed, checked by hash; every snapshot identical', async (t) => {
  const dir = tempDir(t);
  const { file: secretFile, secret } = writeSecret(dir);
  const size = 128 * MiB;
  const replicas = await startReplicas(t, dir, 2, size, secretFile);
  const addresses = replicas.map((r) => `127.0.0.1:${r.port}`);
  const engine = await startEngine(t, dir, { sizeBytes: size, replicas: addresses, epoch: 1, secretFile });
  const names = ['s1', 's2', 's3', 's4'];
  for (const [i, name] of names.entries()) {
    await fillThroughEngine(engine, secret, size, 10 + i);
    await controlRequest(engine.control, 'POST', '/v1/snapshots', { name });
  }
  await fillThroughEngine(engine, secret, size / 2, 20);

  let victim = await startReplica({ dir: path.join(dir, 'victim'), sizeBytes: size, secretFile });
  t.after(() => victim.child.kill('SIGKILL'));
  const victimAddress = `127.0.0.1:${victim.port}`;
  await controlRequest(engine.control, 'POST', '/v1/replicas', { address: victimAddress });
  // Killed while the third snapshot is copied: the first two are complete on it.
  await waitFor('two snapshots copied', async () => ((await replicasOf(engine.control))[2].rebuild?.copiedBytes ?? 0) >= 2.25 * size, 60_000, 2);
  victim.child.kill('SIGKILL');
  await victim.exited;
  const failed = await waitFor('target ERR', async () => {
    const row = (await replicasOf(engine.control))[2] as ReplicaRow & { resumable?: boolean };
    return row.mode === 'ERR' ? row : undefined;
  }, 30_000, 50);
  assert.equal(failed.resumable, true, 'a full rebuild begun here may go on');

  victim = await startReplica({ dir: path.join(dir, 'victim'), sizeBytes: size, secretFile, port: victim.port });
  t.after(() => victim.child.kill('SIGKILL'));
  const again = (await controlRequest(engine.control, 'POST', '/v1/replicas', { address: victimAddress })) as ReplicaRow[];
  assert.equal(again[2].mode, 'WO', 'taken back (before, a half-copied replica was refused as not empty)');
  // This time the engine is killed, while the last snapshot is copied; the next engine takes the
  // victim back by itself, over the three snapshots it has.
  await waitFor('three snapshots copied', async () => ((await replicasOf(engine.control))[2].rebuild?.copiedBytes ?? 0) >= 3.25 * size, 60_000, 2);
  engine.child.kill('SIGKILL');
  await engine.exited;
  const next = await startEngine(t, dir, { sizeBytes: size, replicas: [...addresses, victimAddress], epoch: 2, secretFile });
  await waitFor('the victim RW', async () => (await replicasOf(next.control))[2].mode === 'RW', 120_000, 50);
  const last = (await info(next.control) as unknown as { lastRebuild: { delta: boolean; error: string | null; keptSnapshots?: string[] } | null }).lastRebuild;
  assert.ok(last !== null && last.error === null && !last.delta, JSON.stringify(last));
  assert.ok(last.keptSnapshots !== undefined && ['s1', 's2', 's3'].every((n) => last.keptSnapshots!.includes(n)), `the snapshots completed before the kills were kept: ${JSON.stringify(last)}`);
  assert.ok(!last.keptSnapshots.includes('s4'), 'the snapshot under way was not complete');

  await stopEngine(next);
  for (const snapshot of [...names, undefined]) {
    const digests = await Promise.all([...replicas, victim].map((r) => replicaDigest(r.port, secret, 2, size, snapshot)));
    assert.equal(new Set(digests).size, 1, `${snapshot ?? 'the live volume'}: ${digests.join(' ')}`);
  }
});

test('a rebuild target SIGKILLed halfway through a snapshot\'s copy goes on within it: what it holds that hashes as the source\'s is kept, a damaged region copied again; every snapshot identical', async (t) => {
  const dir = tempDir(t);
  const { file: secretFile, secret } = writeSecret(dir);
  const size = 128 * MiB;
  const replicas = await startReplicas(t, dir, 2, size, secretFile);
  // The target is flushed before every region it copies of a snapshot: what it copied is durable at the kill.
  const engine = await startEngine(t, dir, { sizeBytes: size, replicas: replicas.map((r) => `127.0.0.1:${r.port}`), epoch: 1, secretFile, extra: ['--snapshot-copy-flush-ms', '0'] });
  const names = ['s1', 's2'];
  for (const [i, name] of names.entries()) {
    await fillThroughEngine(engine, secret, size, 40 + i);
    await controlRequest(engine.control, 'POST', '/v1/snapshots', { name });
  }
  await fillThroughEngine(engine, secret, size / 4, 50);
  const victimDir = path.join(dir, 'victim');
  let victim = await startReplica({ dir: victimDir, sizeBytes: size, secretFile });
  t.after(() => victim.child.kill('SIGKILL'));
  const victimAddress = `127.0.0.1:${victim.port}`;
  await controlRequest(engine.control, 'POST', '/v1/replicas', { address: victimAddress });
  // s1 copied, s2 more than half.
  await killTargetWhenCopied(engine, victim, 1.6 * size, 's2 half copied');
  // One byte of the first region of the head (what it holds of s2) changed while it is down.
  const head = fs.readdirSync(victimDir).filter((n) => /^L\d+\.data$/.test(n)).map((n) => path.join(victimDir, n))
    .sort((a, b) => fs.statSync(b).mtimeMs - fs.statSync(a).mtimeMs)[0];
  flipByte(head, 4096);

  victim = await startReplica({ dir: victimDir, sizeBytes: size, secretFile, port: victim.port });
  t.after(() => victim.child.kill('SIGKILL'));
  await controlRequest(engine.control, 'POST', '/v1/replicas', { address: victimAddress });
  await waitFor('the victim RW', async () => (await replicasOf(engine.control))[2].mode === 'RW', 120_000, 50);
  const last = (await info(engine.control) as unknown as { lastRebuild: { error: string | null; keptSnapshots?: string[]; wentOnWithin?: { snapshot: string; regionsKept: number; regionsCopied: number } | null } }).lastRebuild;
  assert.equal(last.error, null);
  assert.deepEqual(last.keptSnapshots, ['s1']);
  assert.equal(last.wentOnWithin?.snapshot, 's2', JSON.stringify(last));
  assert.ok(last.wentOnWithin.regionsKept >= 8, `more than half of s2's 32 regions were on the target, less the damaged one: ${JSON.stringify(last)}`);
  assert.equal(last.wentOnWithin.regionsCopied, 1, `the damaged region was copied again: ${JSON.stringify(last)}`);

  await stopEngine(engine);
  for (const snapshot of [...names, undefined]) {
    const digests = await Promise.all([...replicas, victim].map((r) => replicaDigest(r.port, secret, 1, size, snapshot)));
    assert.equal(new Set(digests).size, 1, `${snapshot ?? 'the live volume'}: ${digests.join(' ')}`);
  }
});

test('a half-rebuilt target whose completed snapshot was damaged on disk is found out by hash, not taken back, and said why', async (t) => {
  const dir = tempDir(t);
  const { file: secretFile, secret } = writeSecret(dir);
  const size = 64 * MiB;
  const replicas = await startReplicas(t, dir, 2, size, secretFile);
  const engine = await startEngine(t, dir, { sizeBytes: size, replicas: replicas.map((r) => `127.0.0.1:${r.port}`), epoch: 1, secretFile });
  for (const [i, name] of ['s1', 's2', 's3', 's4'].entries()) {
    await fillThroughEngine(engine, secret, size, 30 + i);
    await controlRequest(engine.control, 'POST', '/v1/snapshots', { name });
  }
  const victimDir = path.join(dir, 'victim');
  let victim = await startReplica({ dir: victimDir, sizeBytes: size, secretFile });
  t.after(() => victim.child.kill('SIGKILL'));
  const victimAddress = `127.0.0.1:${victim.port}`;
  await controlRequest(engine.control, 'POST', '/v1/replicas', { address: victimAddress });
  await killTargetWhenCopied(engine, victim, 2.25 * size, 'two snapshots copied');
  // Bit rot in the oldest layer (snapshot s1) while the process is down.
  const oldest = fs.readdirSync(victimDir).filter((n) => /^L\d+\.data$/.test(n)).sort()[0];
  flipByte(path.join(victimDir, oldest), 4096);

  victim = await startReplica({ dir: victimDir, sizeBytes: size, secretFile, port: victim.port });
  t.after(() => victim.child.kill('SIGKILL'));
  await controlRequest(engine.control, 'POST', '/v1/replicas', { address: victimAddress });
  const failed = await waitFor('the rebuild failed on the hash', async () => {
    const row = (await replicasOf(engine.control))[2] as ReplicaRow & { resumable?: boolean };
    return row.mode === 'ERR' ? row : undefined;
  }, 60_000, 20);
  assert.match(failed.reason ?? '', /snapshot s1 differs from the source's/);
  assert.equal(failed.resumable, false, 'not worth waiting for: a new replica must take its place');
  // Asked again, it is refused with the reason (the manager then makes a new replica).
  await expectError(controlRequest(engine.control, 'POST', '/v1/replicas', { address: victimAddress }), /its full rebuild cannot go on: its snapshot s1 differs from the source's/);
  const now = await info(engine.control);
  assert.equal(now.faulted, false);
  assert.equal(now.stats.errors, 0);
});

test('a rebuild source SIGKILLed midway: the copy goes on from the other RW replica; fio verify sees no error', async (t) => {
  const dir = tempDir(t);
  const size = 256 * MiB;
  const vol = await startVolume(t, { dir, replicas: 2, sizeBytes: size });
  qemuIo(vol.nbd, 'write -P 0x7e 0 128M', 'flush');
  const fio = startFio(t, [
    '--name=verify', '--ioengine=nbd', `--uri=${vol.nbd}`, '--rw=randwrite', '--bsrange=4k-64k', '--offset=128M', '--size=128M',
    '--iodepth=8', '--verify=crc32c', '--do_verify=1', '--verify_fatal=1', '--verify_state_save=0', '--output-format=json', '--randseed=3',
  ]);
  await new Promise((r) => setTimeout(r, 300));
  const fresh = await startReplica({ dir: path.join(dir, 'replica-new'), sizeBytes: size, secretFile: path.join(dir, 'secret') });
  t.after(() => fresh.child.kill('SIGKILL'));
  const address = `127.0.0.1:${fresh.port}`;
  await controlRequest(vol.controlSocket, 'POST', '/v1/replicas', { address });
  await waitFor('copy under way', async () => ((await replicasOf(vol.controlSocket)).find((r) => r.address === address)?.rebuild?.copiedBytes ?? 0) > 0, 60_000, 5);
  vol.replicas[0].child.kill('SIGKILL');
  const rows = await waitFor('rebuild over', async () => {
    const now = await replicasOf(vol.controlSocket);
    const target = now.find((r) => r.address === address)!;
    return target.mode !== 'WO' ? now : undefined;
  }, 120_000, 50);
  assert.deepEqual(rows.map((r) => r.mode), ['ERR', 'RW', 'RW'], JSON.stringify(rows));
  const result = await fio.exit;
  assert.equal(result.code, 0, result.stderr);
  assert.equal(fioFigures(result.stdout).error, 0);
  qemuIo(vol.nbd, 'flush', 'read -P 0x7e 0 128M');
  const digests = await Promise.all([vol.replicas[1].port, fresh.port].map((p) => replicaDigest(p, vol.secret, vol.epoch, size)));
  assert.equal(digests[0], digests[1]);
});

test('removing the replica being rebuilt stops the rebuild; snapshot changes wait for a rebuild; then both work', async (t) => {
  const dir = tempDir(t);
  const size = 128 * MiB;
  const vol = await startVolume(t, { dir, replicas: 1, sizeBytes: size });
  qemuIo(vol.nbd, 'write -P 0x21 0 128M', 'flush');
  await controlRequest(vol.controlSocket, 'POST', '/v1/snapshots', { name: 's1' });
  qemuIo(vol.nbd, 'write -P 0x22 0 64M', 'flush');
  const target = await startReplica({ dir: path.join(dir, 'replica-t'), sizeBytes: size, secretFile: path.join(dir, 'secret') });
  t.after(() => target.child.kill('SIGKILL'));
  const address = `127.0.0.1:${target.port}`;
  await controlRequest(vol.controlSocket, 'POST', '/v1/replicas', { address });
  await expectError(controlRequest(vol.controlSocket, 'POST', '/v1/snapshots/s1/revert'), /being rebuilt/);
  await expectError(controlRequest(vol.controlSocket, 'DELETE', '/v1/snapshots/s1'), /being rebuilt/);
  await expectError(controlRequest(vol.controlSocket, 'POST', '/v1/snapshots', { name: 's2' }), /being rebuilt/);
  await expectError(controlRequest(vol.controlSocket, 'POST', '/v1/replicas', { address }), /already in volume/);

  const left = (await controlRequest(vol.controlSocket, 'DELETE', `/v1/replicas/${encodeURIComponent(address)}`)) as ReplicaRow[];
  assert.deepEqual(left.map((r) => r.mode), ['RW']);
  await waitFor('rebuild stopped', async () => !(await info(vol.controlSocket)).rebuilding, 30_000, 20);
  // The removed replica keeps its mark: it is no source for anyone.
  const probe = await DataClient.connect({ port: target.port, secret: vol.secret, epoch: vol.epoch });
  assert.equal((await probe.info()).rebuilding, true);
  probe.close();
  qemuIo(vol.nbd, 'read -P 0x22 0 64M', 'read -P 0x21 64M 64M');

  // Afterwards snapshot changes work again, and so does a rebuild onto a fresh replica.
  await controlRequest(vol.controlSocket, 'POST', '/v1/snapshots/s1/revert');
  qemuIo(vol.nbd, 'read -P 0x21 0 128M');
  const fresh = await startReplica({ dir: path.join(dir, 'replica-f'), sizeBytes: size, secretFile: path.join(dir, 'secret') });
  t.after(() => fresh.child.kill('SIGKILL'));
  await controlRequest(vol.controlSocket, 'POST', '/v1/replicas', { address: `127.0.0.1:${fresh.port}` });
  await waitFor('rebuilt', async () => (await replicasOf(vol.controlSocket)).every((r) => r.mode === 'RW'), 60_000, 50);
  const digests = await Promise.all([vol.replicas[0].port, fresh.port].map((p) => replicaDigest(p, vol.secret, vol.epoch, size)));
  assert.equal(digests[0], digests[1]);
  const snapshots = await Promise.all([vol.replicas[0].port, fresh.port].map((p) => replicaDigest(p, vol.secret, vol.epoch, size, 's1')));
  assert.equal(snapshots[0], snapshots[1]);
});

test('snapshots and an expansion at the same moment under writes: each sees a quiet volume; replicas and snapshots identical', async (t) => {
  const dir = tempDir(t);
  const size = 64 * MiB;
  const vol = await startVolume(t, { dir, replicas: 2, sizeBytes: size });
  const fio = startFio(t, [
    '--name=load', '--ioengine=nbd', `--uri=${vol.nbd}`, '--rw=randwrite', '--bs=4k', '--size=64M', '--iodepth=16',
    '--time_based', '--runtime=60', '--randseed=5', '--output-format=json',
  ]);
  await new Promise((r) => setTimeout(r, 500));
  const control = vol.controlSocket;
  const results = await Promise.allSettled([
    controlRequest(control, 'POST', '/v1/snapshots', { name: 's1' }),
    controlRequest(control, 'POST', '/v1/expand', { sizeBytes: 2 * size }),
    controlRequest(control, 'POST', '/v1/snapshots', { name: 's2' }),
  ]);
  assert.deepEqual(results.map((r) => r.status), ['fulfilled', 'fulfilled', 'fulfilled'], JSON.stringify(results));
  await new Promise((r) => setTimeout(r, 300));
  fio.child.kill('SIGINT');
  const result = await fio.exit;
  assert.equal(fioFigures(result.stdout).error, 0, result.stderr);
  qemuIo(vol.nbd, 'flush');
  assert.deepEqual((await info(control)).replicas.map((r) => r.mode), ['RW', 'RW']);
  for (const snapshot of [undefined, 's1', 's2']) {
    const digests = await Promise.all(vol.replicas.map((r) => replicaDigest(r.port, vol.secret, vol.epoch, 2 * size, snapshot)));
    assert.equal(digests[0], digests[1], snapshot ?? 'head');
  }
});
