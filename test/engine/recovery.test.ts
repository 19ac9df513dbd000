/**
 * Start-up recovery and delta rebuilds, with real processes: an engine SIGKILLed while replicas
 * differ in a region comes back with that region (and only the active ones) resynced; a replica
 * that was out comes back by copying the regions written meanwhile, whether it is added again to
 * the running engine or found behind at the next start.
 */
import '../support/intent-idle-zero.ts';
import fs from 'node:fs';
import path from 'node:path';
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { controlRequest } from '../../src/protocol/control-channel.ts';
import { DataClient } from '../../src/protocol/client.ts';
import { writeSecret } from '../support/replica-process.ts';
import { tempDir, pattern } from '../support/tmp.ts';
import { waitFor } from '../support/zebu-up.ts';
import { startEngine, spawnEngine, startReplicas, restartReplica, engineInfo, engineClient, verify, regionDigests, type ReplicaRow } from './engine-process.ts';

const MiB = 1024 * 1024;
const REGION = 4 * MiB;
const SIZE = 64 * MiB;

async function writeThrough(client: DataClient, offset: number, length: number, seed: number): Promise<void> {
  const chunk = pattern(seed, Math.min(length, REGION));
  const writes: Promise<void>[] = [];
  for (let at = offset; at < offset + length; at += chunk.length) writes.push(client.write(at, chunk.subarray(0, Math.min(chunk.length, offset + length - at))));
  await Promise.all(writes);
  // Two flushes: the second confirms the first, so the regions leave the write-intent logs.
  await client.flush();
  await client.flush();
  // The replicas persist regions leaving their logs lazily (within 100 ms): let them.
  await new Promise((resolve) => setTimeout(resolve, 300));
}

/** `count` replica processes named r0, r1, ... and an engine (epoch 1) on them, with a client. */
async function startVolume(t: TestContext, count: number, sizeBytes: number) {
  const dir = tempDir(t);
  const { file: secretFile, secret } = writeSecret(dir);
  const replicas = await startReplicas(t, dir, count, sizeBytes, secretFile);
  const entries = replicas.map((r, i) => `r${i}=127.0.0.1:${r.port}`);
  const first = await startEngine(t, dir, { sizeBytes, replicas: entries, epoch: 1, secretFile });
  const client = await engineClient(first, secret);
  t.after(() => client.close());
  return { dir, secretFile, secret, replicas, entries, first, client };
}

/**
 * `count` replicas and an engine (epoch 1) with `firstBytes` written through it; then replica
 * `out` is SIGKILLed and the engine has set it ERR (the others hold a map for it).
 */
async function volumeWithReplicaOut(t: TestContext, count: number, out: number, firstBytes: number, seed: number) {
  const { dir, secretFile, secret, replicas, entries, first, client } = await startVolume(t, count, SIZE);
  await writeThrough(client, 0, firstBytes, seed);
  replicas[out].child.kill('SIGKILL');
  await replicas[out].exited;
  await waitFor(`replica ${out} ERR`, async () => (await engineInfo(first.control)).replicas[out].mode === 'ERR', 30_000, 20);
  return { dir, secretFile, secret, replicas, entries, first, client };
}

test('engine SIGKILLed while the replicas differ in a region: the next start resyncs the active regions only; verify finds 0 differences', async (t) => {
  const dir = tempDir(t);
  const { file: secretFile, secret } = writeSecret(dir);
  const replicas = await startReplicas(t, dir, 2, SIZE, secretFile);
  const entries = replicas.map((r, i) => `r${i}=127.0.0.1:${r.port}`);
  const first = await startEngine(t, dir, { sizeBytes: SIZE, replicas: entries, epoch: 1, secretFile });
  assert.equal((first.ready.recovery as { regions: number }).regions, 0, 'new replicas: nothing to resync');
  const client = await engineClient(first, secret);
  await writeThrough(client, 0, 32 * MiB, 1);

  // A write only replica 1 took (the engine died between sending it to the two replicas).
  const direct = await DataClient.connect({ port: replicas[1].port, secret, epoch: 1 });
  await direct.write(5 * REGION + 4096, pattern(2, MiB));
  direct.close();
  assert.notEqual((await regionDigests(replicas[0].port, secret, 1, SIZE))[5], (await regionDigests(replicas[1].port, secret, 1, SIZE))[5], 'the replicas differ in region 5');
  // And writes in flight when it dies.
  for (let i = 0; i < 8; i++) client.write(12 * REGION + i * MiB, pattern(3 + i, MiB)).catch(() => {});
  first.child.kill('SIGKILL');
  await first.exited;
  client.close();

  const second = await startEngine(t, dir, { sizeBytes: SIZE, replicas: entries, epoch: 2, secretFile });
  const info = await engineInfo(second.control);
  assert.deepEqual(info.replicas.map((r) => [r.key, r.mode]), [['r0', 'RW'], ['r1', 'RW']]);
  const recovery = info.recovery!;
  assert.equal(recovery.clean, false);
  assert.ok(recovery.regions >= 1, JSON.stringify(recovery));
  assert.ok(recovery.checkedRegions >= recovery.regions, 'regions are compared, and copied only where they differ');
  assert.ok(recovery.bytes >= REGION && recovery.bytes <= SIZE / 4, `resynced ${recovery.bytes} bytes: the active regions, not the volume`);
  assert.equal(recovery.source, `127.0.0.1:${replicas[1].port}`, 'the replica with the most writes is the source');
  const report = await verify(second.control);
  assert.equal(report.regions, SIZE / REGION);
  assert.deepEqual(report.differing, []);
  const digests = await Promise.all(replicas.map((r) => regionDigests(r.port, secret, 2, SIZE)));
  assert.deepEqual(digests[0], digests[1]);
  // Equal counters again (the resync wrote to one replica only): both start RW next time.
  const counters = await Promise.all(replicas.map(async (r) => {
    const c = await DataClient.connect({ port: r.port, secret, epoch: 2 });
    const i = await c.info();
    c.close();
    return [i.writeEpoch, i.flushedRevision, i.revision];
  }));
  assert.deepEqual(counters[0], counters[1]);
  assert.equal(counters[0][0], 2, 'written in epoch 2');
  // The region holds the source's bytes.
  const reader = await engineClient(second, secret);
  assert.ok((await reader.read(5 * REGION + 4096, MiB)).equals(pattern(2, MiB)));
  assert.ok((await reader.read(0, MiB)).equals(pattern(1, REGION).subarray(0, MiB)));
  reader.close();

  // A clean stop leaves nothing active: the next start resyncs nothing.
  second.child.kill('SIGTERM');
  assert.equal(await second.exited, 0);
  const third = await startEngine(t, dir, { sizeBytes: SIZE, replicas: entries, epoch: 3, secretFile });
  const after = await engineInfo(third.control);
  assert.equal(after.recovery!.regions, 0, JSON.stringify(after.recovery));
  assert.deepEqual(after.replicas.map((r) => r.mode), ['RW', 'RW']);
});

test('a replica that was out comes back by a delta rebuild: only the regions written meanwhile are copied', async (t) => {
  const { dir, secretFile, secret, replicas, entries, first: engine, client } = await volumeWithReplicaOut(t, 2, 1, SIZE, 5);
  await writeThrough(client, 3 * REGION, REGION, 6);
  await writeThrough(client, 10 * REGION + MiB, 2 * MiB, 7);
  const source = await DataClient.connect({ port: replicas[0].port, secret, epoch: 1 });
  t.after(() => source.close());
  assert.deepEqual((await source.missedGet('r1')).sort((a, b) => a - b), [3, 10], 'the map holds the two regions written');

  // Back at its address: added again under its key, it is refused nothing and copies 2 regions.
  replicas[1] = await restartReplica(t, dir, 1, SIZE, secretFile, replicas[1].port);
  const rows = (await controlRequest(engine.control, 'POST', '/v1/replicas', { address: entries[1] })) as ReplicaRow[];
  assert.equal(rows.length, 2, 'the ERR entry is replaced');
  assert.equal(rows[1].key, 'r1');
  assert.ok(rows[1].mode === 'WO' || rows[1].mode === 'RW');
  await waitFor('replica 1 RW', async () => {
    const row = (await engineInfo(engine.control)).replicas[1];
    assert.notEqual(row.mode, 'ERR', row.reason ?? '');
    return row.mode === 'RW';
  }, 30_000, 20);
  const rebuilt = (await engineInfo(engine.control)).lastRebuild!;
  assert.equal(rebuilt.delta, true);
  assert.equal(rebuilt.error, null);
  assert.equal(rebuilt.copiedBytes, rebuilt.totalBytes);
  assert.ok(rebuilt.copiedBytes >= 2 * REGION && rebuilt.copiedBytes <= 4 * REGION, `copied ${rebuilt.copiedBytes} bytes: 2 regions and the active ones`);
  assert.equal((await verify(engine.control)).differing.length, 0);
  const digests = await Promise.all(replicas.map((r) => regionDigests(r.port, secret, 1, SIZE)));
  assert.deepEqual(digests[0], digests[1]);
  await waitFor('map dropped', async () => !('r1' in (await source.intentGet()).missed), 10_000, 20);
  source.close();

  // A non-empty replica with no map is refused.
  await assert.rejects(controlRequest(engine.control, 'DELETE', `/v1/replicas/${encodeURIComponent(entries[1])}`).then(() =>
    controlRequest(engine.control, 'POST', '/v1/replicas', { address: entries[1].replace('r1=', 'other=') })), /not empty .*no delta rebuild is possible: no RW replica holds a missed-write map for other/);
});

test('a replica behind at start-up with a missed-write map comes back by a delta rebuild before it serves reads', async (t) => {
  const { dir, secretFile, secret, replicas, entries, first, client } = await volumeWithReplicaOut(t, 3, 1, 16 * MiB, 8);
  await writeThrough(client, 7 * REGION, REGION, 9);
  client.close();
  first.child.kill('SIGTERM');
  assert.equal(await first.exited, 0);

  replicas[1] = await restartReplica(t, dir, 1, SIZE, secretFile, replicas[1].port);
  const second = await startEngine(t, dir, { sizeBytes: SIZE, replicas: entries, epoch: 2, secretFile });
  const info = await engineInfo(second.control);
  assert.deepEqual(info.recovery!.deltaReplicas, [`127.0.0.1:${replicas[1].port}`], JSON.stringify(info.recovery));
  await waitFor('replica 1 RW', async () => {
    const row = (await engineInfo(second.control)).replicas[1];
    return row.mode === 'RW';
  }, 30_000, 20);
  const rebuilt = (await engineInfo(second.control)).lastRebuild!;
  assert.equal(rebuilt.delta, true);
  assert.ok(rebuilt.copiedBytes >= REGION && rebuilt.copiedBytes <= 3 * REGION, `copied ${rebuilt.copiedBytes} bytes`);
  assert.equal((await verify(second.control)).differing.length, 0);
  const digests = await Promise.all(replicas.map((r) => regionDigests(r.port, secret, 2, SIZE)));
  assert.deepEqual(digests[0], digests[1]);
  assert.deepEqual(digests[0], digests[2]);
  // Killed after that rebuild, it is seen as lost (it used to be dropped silently: still RW in
  // the engine's info, with no connection, no event and no rebuild).
  replicas[1].child.kill('SIGKILL');
  await waitFor('replica 1 seen lost after its start-up delta rebuild', async () => (await engineInfo(second.control)).replicas[1].mode === 'ERR', 15_000, 20);
});

test('a replica rebuilt in full after its map was invalidated starts RW at the next start-up: the maps of a rebuilt replica are dropped', async (t) => {
  // Once, the full fault run failed every later start of one replica (a full rebuild each time):
  // its invalidated map stayed on the others after the full rebuild that made it whole again.
  const { dir, secretFile, secret, replicas, entries, first, client } = await startVolume(t, 3, SIZE);
  await writeThrough(client, 0, 16 * MiB, 11);
  // Taken out of the set: its map is invalidated on the others (only a full rebuild brings it back).
  await controlRequest(first.control, 'DELETE', `/v1/replicas/${encodeURIComponent(entries[2])}`);
  const holder = await DataClient.connect({ port: replicas[0].port, secret, epoch: 1 });
  t.after(() => holder.close());
  assert.deepEqual((await holder.intentGet()).invalidMissed, ['r2']);
  // Emptied and added again: a full rebuild.
  replicas[2].child.kill('SIGKILL');
  await replicas[2].exited;
  fs.rmSync(path.join(dir, 'replica-2'), { recursive: true, force: true });
  replicas[2] = await restartReplica(t, dir, 2, SIZE, secretFile, replicas[2].port);
  await controlRequest(first.control, 'POST', '/v1/replicas', { address: entries[2] });
  await waitFor('replica 2 RW', async () => (await engineInfo(first.control)).replicas.find((r) => r.key === 'r2')?.mode === 'RW', 60_000, 20);
  assert.equal((await engineInfo(first.control)).lastRebuild!.delta, false, 'a full rebuild');
  const intent = await holder.intentGet();
  assert.deepEqual([intent.invalidMissed, 'r2' in intent.missed], [[], false], 'whole again: no map names it');
  await writeThrough(client, 4 * MiB, 4 * MiB, 12);
  client.close();

  // A crash, then the next engine: every replica is in sync, none is failed or rebuilt.
  first.child.kill('SIGKILL');
  await first.exited;
  const second = await startEngine(t, dir, { sizeBytes: SIZE, replicas: entries, epoch: 2, secretFile });
  const info = await engineInfo(second.control);
  assert.deepEqual(info.replicas.map((r) => [r.key, r.mode, r.reason]), [['r0', 'RW', null], ['r1', 'RW', null], ['r2', 'RW', null]]);
  assert.deepEqual([info.recovery!.erredReplicas, info.recovery!.deltaReplicas], [[], []]);
  assert.equal((await verify(second.control)).differing.length, 0);
});

test('a start-up resync killed midway keeps what it did: batches are made durable and released, the next start compares only the rest', async (t) => {
  const BIG = 48 * REGION;
  const { dir, secretFile, secret, replicas, entries, first, client } = await startVolume(t, 2, BIG);
  // Every region written, none flushed: all of them active (more than one batch).
  await Promise.all(Array.from({ length: BIG / REGION }, (_, region) => client.write(region * REGION, pattern(20 + region, 4096))));
  first.child.kill('SIGKILL');
  await first.exited;
  client.close();
  const activeOn = async (epoch: number): Promise<number> => {
    const probe = await DataClient.connect({ port: replicas[0].port, secret, epoch });
    try {
      return (await probe.intentGet()).active.length;
    } finally {
      probe.close();
    }
  };
  assert.equal(await activeOn(1), BIG / REGION);

  // The next engine: killed as soon as it said it released its first batch.
  const second = spawnEngine(dir, { sizeBytes: BIG, replicas: entries, epoch: 2, secretFile });
  t.after(() => second.child.kill('SIGKILL'));
  await waitFor('a batch released', () => /"event":"resync-batch"/.test(second.stderr()), 30_000, 5);
  second.child.kill('SIGKILL');
  await second.exited;
  const left = await activeOn(2);
  const firstBatch = Number(/"event":"resync-batch","released":(\d+)/.exec(second.stderr())![1]);
  assert.ok(firstBatch >= 1 && firstBatch <= 16, `a batch is 1 to 16 regions: ${firstBatch}`);
  assert.ok(left <= BIG / REGION - firstBatch, `the first batch (${firstBatch} regions) left the logs: ${left} of ${BIG / REGION} still active`);

  const third = await startEngine(t, dir, { sizeBytes: BIG, replicas: entries, epoch: 3, secretFile });
  const recovery = (await engineInfo(third.control)).recovery!;
  assert.ok(recovery.checkedRegions <= left, `the third start compared ${recovery.checkedRegions} region(s), ${left} were left`);
  assert.equal((await verify(third.control)).differing.length, 0);
});

test('a delta rebuild stopped midway (engine SIGKILLed) is done again as a delta by the next engine, the target\'s own active regions included', async (t) => {
  // The full fault run once turned every engine kill during a delta rebuild into a full rebuild:
  // the target's "rebuilding" mark said nothing of which rebuild it was.
  const { dir, secretFile, secret, replicas, entries, first, client } = await volumeWithReplicaOut(t, 3, 2, 16 * MiB, 30);
  await writeThrough(client, 0, 8 * REGION, 31);
  replicas[2] = await restartReplica(t, dir, 2, SIZE, secretFile, replicas[2].port);
  // A write only the target has (unflushed, active in its log): as if it went out mid-write.
  const LAST = SIZE / REGION - 1;
  const direct = await DataClient.connect({ port: replicas[2].port, secret, epoch: 1 });
  await direct.open();
  await direct.write(LAST * REGION, pattern(32, 4096));
  assert.ok((await direct.intentGet()).active.includes(LAST));
  direct.close();

  await controlRequest(first.control, 'POST', '/v1/replicas', { address: entries[2] });
  await waitFor('the delta rebuild copying', () => /"event":"delta-rebuild-regions"/.test(first.stderr()), 30_000, 2);
  replicas[2].child.kill('SIGSTOP');
  first.child.kill('SIGKILL');
  await first.exited;
  replicas[2].child.kill('SIGCONT');
  client.close();

  const probe = async (port: number, fn: (c: DataClient) => Promise<unknown>): Promise<unknown> => {
    const c = await DataClient.connect({ port, secret, epoch: 1 });
    try {
      return await fn(c);
    } finally {
      c.close();
    }
  };
  assert.equal(((await probe(replicas[2].port, (c) => c.open())) as { rebuildKind: string }).rebuildKind, 'delta');
  for (const holder of [0, 1]) {
    const map = (await probe(replicas[holder].port, (c) => c.missedGet('r2'))) as number[];
    assert.ok(map.includes(LAST), `replica ${holder}'s map for r2 took the target's active region ${LAST}: [${map.join(', ')}]`);
  }

  const second = await startEngine(t, dir, { sizeBytes: SIZE, replicas: entries, epoch: 2, secretFile });
  const info = await engineInfo(second.control);
  assert.deepEqual(info.recovery!.deltaReplicas, [`127.0.0.1:${replicas[2].port}`], JSON.stringify(info.replicas));
  await waitFor('replica 2 RW', async () => (await engineInfo(second.control)).replicas[2].mode === 'RW', 30_000, 20);
  const rebuilt = (await engineInfo(second.control)).lastRebuild!;
  assert.equal(rebuilt.delta, true, 'a delta again, not a full rebuild');
  assert.ok(rebuilt.copiedBytes <= 10 * REGION, `copied ${rebuilt.copiedBytes} bytes`);
  assert.equal(((await probe(replicas[2].port, (c) => c.info())) as { rebuilding: boolean }).rebuilding, false);
  assert.equal((await verify(second.control)).differing.length, 0);
  const digests = await Promise.all(replicas.map((r) => regionDigests(r.port, secret, 2, SIZE)));
  assert.deepEqual(digests[2], digests[0]);
  assert.deepEqual(digests[1], digests[0]);
});

test('a replica that lost every write before its first flush (revision 0) comes back by a delta, a new one at its address in full', async (t) => {
  const { dir, secretFile, secret, replicas, entries, first: engine, client } = await startVolume(t, 2, SIZE);
  // Writes, no flush: replica 1 keeps revision 0 on disk; its write-intent log has the regions.
  await Promise.all([client.write(2 * REGION, pattern(21, MiB)), client.write(7 * REGION, pattern(22, MiB))]);
  replicas[1].child.kill('SIGKILL');
  await replicas[1].exited;
  await waitFor('replica 1 ERR', async () => (await engineInfo(engine.control)).replicas[1].mode === 'ERR', 30_000, 20);
  await writeThrough(client, 11 * REGION, MiB, 23);

  replicas[1] = await restartReplica(t, dir, 1, SIZE, secretFile, replicas[1].port);
  await controlRequest(engine.control, 'POST', '/v1/replicas', { address: entries[1] });
  await waitFor('replica 1 RW', async () => (await engineInfo(engine.control)).replicas[1].mode === 'RW', 30_000, 20);
  const rebuilt = (await engineInfo(engine.control)).lastRebuild!;
  assert.equal(rebuilt.delta, true, 'a delta, not a full copy');
  assert.ok(rebuilt.copiedBytes <= 4 * REGION, `copied ${rebuilt.copiedBytes} bytes: the regions written meanwhile and its own active ones`);
  assert.equal((await verify(engine.control)).differing.length, 0);

  // A new, empty replica at the same address and key is copied whole (no map applies to it).
  await writeThrough(client, 0, SIZE, 24);
  replicas[1].child.kill('SIGKILL');
  await replicas[1].exited;
  await waitFor('replica 1 ERR again', async () => (await engineInfo(engine.control)).replicas[1].mode === 'ERR', 30_000, 20);
  fs.rmSync(path.join(dir, 'replica-1'), { recursive: true, force: true });
  replicas[1] = await restartReplica(t, dir, 1, SIZE, secretFile, replicas[1].port);
  await controlRequest(engine.control, 'POST', '/v1/replicas', { address: entries[1] });
  await waitFor('replica 1 RW again', async () => (await engineInfo(engine.control)).replicas[1].mode === 'RW', 30_000, 20);
  const full = (await engineInfo(engine.control)).lastRebuild!;
  assert.equal(full.delta, false);
  assert.equal((await verify(engine.control)).differing.length, 0);
  const digests = await Promise.all(replicas.map((r) => regionDigests(r.port, secret, 1, SIZE)));
  assert.deepEqual(digests[0], digests[1]);
});
