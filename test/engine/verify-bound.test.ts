/**
 * Verify (scrub) finds an injected difference and repairs it, and reports none under live writes;
 * the active-region bound holds under random writes all over the volume; an engine fenced by a
 * newer one stops serving and says so.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { DataClient } from '../../src/protocol/client.ts';
import { ErrorCode } from '../../src/errors.ts';
import { writeSecret } from '../support/replica-process.ts';
import { tempDir, pattern } from '../support/tmp.ts';
import { startEngine, startReplicas, engineInfo, engineClient, verify, regionDigests } from './engine-process.ts';

const MiB = 1024 * 1024;
const REGION = 4 * MiB;

/** xorshift32: the same offsets every run. */
function prng(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x / 2 ** 32;
  };
}

/** `depth` writers of 4 KiB at random offsets until stop() resolves; returns the number of writes. */
function randomWrites(client: DataClient, sizeBytes: number, depth: number, seed: number): { stop: () => Promise<number> } {
  const random = prng(seed);
  const block = pattern(seed, 4096);
  let stopping = false;
  let count = 0;
  const workers = Array.from({ length: depth }, async () => {
    while (!stopping) {
      await client.write(Math.floor(random() * (sizeBytes / 4096)) * 4096, block);
      count++;
    }
  });
  return {
    async stop() {
      stopping = true;
      await Promise.all(workers);
      return count;
    },
  };
}

test('verify finds a region that differs, repair fixes it; under live writes it reports no difference', async (t) => {
  const dir = tempDir(t);
  const { file: secretFile, secret } = writeSecret(dir);
  const SIZE = 64 * MiB;
  const replicas = await startReplicas(t, dir, 2, SIZE, secretFile);
  const engine = await startEngine(t, dir, { sizeBytes: SIZE, replicas: replicas.map((r, i) => `r${i}=127.0.0.1:${r.port}`), epoch: 1, secretFile });
  const client = await engineClient(engine, secret);
  t.after(() => client.close());
  for (let off = 0; off < 32 * MiB; off += REGION) await client.write(off, pattern(off / REGION, REGION));
  await client.flush();
  assert.deepEqual((await verify(engine.control)).differing, []);

  // Replica 1 alone gets other bytes in region 5 (a lost write, bit rot).
  const direct = await DataClient.connect({ port: replicas[1].port, secret, epoch: 1 });
  await direct.write(5 * REGION + 8192, Buffer.alloc(4096, 0xee));
  direct.close();
  const found = await verify(engine.control);
  assert.equal(found.regions, SIZE / REGION);
  assert.deepEqual(found.replicas, replicas.map((r) => `127.0.0.1:${r.port}`));
  assert.equal(found.source, `127.0.0.1:${replicas[0].port}`);
  assert.deepEqual(found.differing.map((d) => [d.region, d.offset, d.length]), [[5, 5 * REGION, REGION]]);
  const hashes = Object.values(found.differing[0].hashes);
  assert.equal(hashes.length, 2);
  assert.notEqual(hashes[0], hashes[1]);
  assert.equal(found.repaired, 0, 'no repair unless asked');
  assert.equal((await engineInfo(engine.control)).lastVerify!.differing.length, 1);

  const fixed = await verify(engine.control, true);
  assert.equal(fixed.differing.length, 1);
  assert.equal(fixed.repaired, 1);
  assert.deepEqual((await verify(engine.control)).differing, []);
  const digests = await Promise.all(replicas.map((r) => regionDigests(r.port, secret, 1, SIZE)));
  assert.deepEqual(digests[0], digests[1]);
  assert.ok((await client.read(5 * REGION, REGION)).equals(pattern(5, REGION)), 'the source\'s bytes won');

  // Under writes everywhere: the claims keep a region still while it is hashed.
  const load = randomWrites(client, SIZE, 16, 42);
  const busy = await verify(engine.control);
  const writes = await load.stop();
  assert.ok(writes > 0);
  assert.deepEqual(busy.differing, []);
});

test('the active regions stay within the bound under random writes all over the volume', async (t) => {
  const dir = tempDir(t);
  const { file: secretFile, secret } = writeSecret(dir);
  const SIZE = 128 * MiB;
  const BOUND = 4;
  const DEPTH = 16;
  const replicas = await startReplicas(t, dir, 2, SIZE, secretFile);
  const engine = await startEngine(t, dir, { sizeBytes: SIZE, replicas: replicas.map((r) => `127.0.0.1:${r.port}`), epoch: 1, secretFile, maxActiveRegions: BOUND });
  const client = await engineClient(engine, secret);
  t.after(() => client.close());
  const probes = await Promise.all(replicas.map((r) => DataClient.connect({ port: r.port, secret, epoch: 1 })));
  t.after(() => probes.forEach((p) => p.close()));

  const load = randomWrites(client, SIZE, DEPTH, 7);
  let engineMax = 0;
  let replicaMax = 0;
  const until = Date.now() + 3000;
  while (Date.now() < until) {
    const info = await engineInfo(engine.control);
    engineMax = Math.max(engineMax, info.activeRegions);
    for (const p of probes) replicaMax = Math.max(replicaMax, (await p.intentGet()).active.length);
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
  const writes = await load.stop();
  const info = await engineInfo(engine.control);
  assert.equal(info.maxActiveRegions, BOUND);
  assert.ok(writes > 100, `${writes} writes`);
  assert.ok(info.stats.heldWrites > 0 && info.stats.boundFlushes > 0, JSON.stringify(info.stats));
  assert.ok(engineMax <= BOUND, `engine counted ${engineMax} active regions`);
  assert.ok(replicaMax <= BOUND + DEPTH, `a replica had ${replicaMax} active regions`);
  assert.ok(replicaMax > 0, 'the replicas logged regions');
  assert.deepEqual((await verify(engine.control)).differing, []);
});

test('an engine fenced by a newer epoch on the same replicas stops serving with FENCED; the new one serves', async (t) => {
  const dir = tempDir(t);
  const { file: secretFile, secret } = writeSecret(dir);
  const SIZE = 32 * MiB;
  const replicas = await startReplicas(t, dir, 2, SIZE, secretFile);
  const entries = replicas.map((r, i) => `r${i}=127.0.0.1:${r.port}`);
  const old = await startEngine(t, dir, { sizeBytes: SIZE, replicas: entries, epoch: 1, secretFile });
  const oldClient = await engineClient(old, secret);
  t.after(() => oldClient.close());
  await oldClient.write(0, pattern(1, MiB));
  await oldClient.flush();

  const newer = await startEngine(t, dir, { sizeBytes: SIZE, replicas: entries, epoch: 2, secretFile });
  await assert.rejects(oldClient.write(MiB, pattern(2, MiB)), (err: { code?: string }) => err.code === ErrorCode.FENCED);
  const info = await engineInfo(old.control);
  assert.equal(info.faulted, true);
  assert.equal(info.superseded, true);
  assert.match(info.faultedReason ?? '', /superseded/);
  // Nothing more is served, reads included, and no missed-write map was started by the old engine.
  await assert.rejects(oldClient.read(0, 4096), (err: { code?: string }) => err.code === ErrorCode.FENCED);
  const probe = await DataClient.connect({ port: replicas[0].port, secret, epoch: 2 });
  assert.deepEqual((await probe.intentGet()).missed, {});
  probe.close();
  assert.equal(old.child.exitCode, null, 'the fenced engine process stays up');

  const newClient = await engineClient(newer, secret);
  await newClient.write(MiB, pattern(3, MiB));
  await newClient.flush();
  assert.ok((await newClient.read(0, MiB)).equals(pattern(1, MiB)));
  assert.ok((await newClient.read(MiB, MiB)).equals(pattern(3, MiB)));
  newClient.close();
  assert.deepEqual((await engineInfo(newer.control)).replicas.map((r) => r.mode), ['RW', 'RW']);
});
