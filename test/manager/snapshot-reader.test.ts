/**
 * A backup's snapshot reads go straight to the engine's RW replicas (real replica and engine
 * processes); a replica that dies mid-job, or cannot be reached at all, hands its reads to the
 * engine, and every byte read is the snapshot's, never the live volume's.
 */
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { DataClient } from '../../src/protocol/client.ts';
import { ZebuError, ErrorCode } from '../../src/errors.ts';
import { ReplicaSnapshotReader, type ReplicaOpener } from '../../src/manager/snapshot-reader.ts';
import path from 'node:path';
import { writeSecret, startReplica } from '../support/replica-process.ts';
import { tempDir, pattern } from '../support/tmp.ts';
import { startEngine, engineClient } from '../engine/engine-process.ts';

const MiB = 1024 * 1024;
const SIZE = 16 * MiB;
const CHUNK = MiB;

async function setUp(t: TestContext) {
  const dir = tempDir(t);
  const { file: secretFile, secret } = writeSecret(dir);
  // Named, as `zebu up` names them: a replica then says which one it is.
  const replicas = [];
  for (let i = 0; i < 2; i++) {
    const r = await startReplica({ dir: path.join(dir, `replica-${i}`), sizeBytes: SIZE, secretFile, extraArgs: ['--name', `r${i}`] });
    t.after(() => {
      r.child.kill('SIGKILL');
    });
    replicas.push(r);
  }
  const engine = await startEngine(t, dir, { sizeBytes: SIZE, replicas: replicas.map((r, i) => `r${i}=127.0.0.1:${r.port}`), epoch: 1, secretFile });
  const client = await engineClient(engine, secret);
  t.after(() => client.close());
  const snapshot = pattern(7, SIZE);
  await client.write(0, snapshot);
  await client.snapshotCreate('s1');
  // The live volume moves on: a read that reached the head instead of the snapshot would differ.
  await client.write(0, pattern(8, SIZE));
  const opener: ReplicaOpener = (address, epoch) => {
    const at = address.lastIndexOf(':');
    return DataClient.connect({ host: address.slice(0, at), port: Number(address.slice(at + 1)), epoch, secret, requestTimeoutMs: 5000, peerLabel: 'replica' });
  };
  return { replicas, client, snapshot, opener };
}

async function readAll(reader: ReplicaSnapshotReader, from: number, to: number, expected: Buffer): Promise<void> {
  await Promise.all(Array.from({ length: (to - from) / CHUNK }, async (_, i) => {
    const offset = from + i * CHUNK;
    const data = await reader.readSnapshot('s1', offset, CHUNK);
    assert.ok(data.equals(expected.subarray(offset, offset + CHUNK)), `snapshot bytes at ${offset}`);
    reader.release(data);
  }));
}

test('snapshot reads go to the RW replicas directly; a replica SIGKILLed mid-job hands its reads to the engine', async (t) => {
  const { replicas, client, snapshot, opener } = await setUp(t);
  const reader = await ReplicaSnapshotReader.create(client, opener);
  t.after(() => reader.close());
  assert.equal(reader.usableReplicas, 2);

  await readAll(reader, 0, 8 * MiB, snapshot);
  assert.equal(reader.counts.directBytes, 8 * MiB, 'every read went to a replica');
  assert.equal(reader.counts.engineBytes, 0);

  replicas[0].child.kill('SIGKILL');
  await replicas[0].exited;
  await readAll(reader, 8 * MiB, SIZE, snapshot);
  assert.equal(reader.counts.dropped.length, 1, 'the dead replica was dropped');
  assert.equal(reader.usableReplicas, 1);
  assert.equal(reader.counts.directBytes + reader.counts.engineBytes, SIZE);
  assert.ok(reader.counts.directBytes > 8 * MiB, 'the live replica went on serving directly');

  // Change lists come from the engine.
  const changes = await reader.snapshotChanges('s1', null, 0, SIZE);
  assert.deepEqual(changes.filter((e) => e.data).reduce((n, e) => n + e.length, 0), SIZE);
});

test('replicas that cannot be reached leave every read to the engine', async (t) => {
  const { client, snapshot } = await setUp(t);
  let attempts = 0;
  const unreachable: ReplicaOpener = () => {
    attempts++;
    return Promise.reject(new ZebuError(ErrorCode.DISCONNECTED, 'connection refused'));
  };
  const reader = await ReplicaSnapshotReader.create(client, unreachable);
  t.after(() => reader.close());
  await readAll(reader, 0, SIZE, snapshot);
  assert.equal(reader.counts.engineBytes, SIZE);
  assert.equal(reader.counts.directBytes, 0);
  assert.equal(reader.usableReplicas, 0);
  assert.equal(attempts, 2, 'each replica was tried once, then left alone');
  // A missing snapshot is the engine's answer, not a replica's fault.
  await assert.rejects(reader.readSnapshot('nope', 0, CHUNK), (err: unknown) => err instanceof ZebuError && err.code === ErrorCode.NOT_FOUND);
});

test('a replica at the address that is another replica is not read from', async (t) => {
  const { replicas, client, snapshot, opener } = await setUp(t);
  // Every address leads to replica 1: for r0 that is the wrong replica.
  const misrouted: ReplicaOpener = (_address, epoch) => opener(`127.0.0.1:${replicas[1].port}`, epoch);
  const reader = await ReplicaSnapshotReader.create(client, misrouted);
  t.after(() => reader.close());
  await readAll(reader, 0, SIZE, snapshot);
  assert.equal(reader.usableReplicas, 1, 'the misrouted replica was dropped');
  assert.match(reader.counts.dropped[0].reason, /127\.0\.0\.1:\d+ is replica r1, not r0/);
  assert.ok(reader.counts.directBytes > 0, 'r1 itself was read');
  assert.equal(reader.counts.directBytes + reader.counts.engineBytes, SIZE);
});

test('a replica that starts being rebuilt mid-job is no longer read from', async (t) => {
  const { replicas, client, snapshot, opener } = await setUp(t);
  const reader = await ReplicaSnapshotReader.create(client, opener);
  t.after(() => reader.close());
  await readAll(reader, 0, 4 * MiB, snapshot);
  assert.equal(reader.counts.directBytes, 4 * MiB);
  // As a full rebuild onto it in place would begin: its layers are not to be trusted from now on.
  const r0 = await opener(`127.0.0.1:${replicas[0].port}`, 1);
  t.after(() => r0.close());
  await r0.setRebuilding('full');
  await readAll(reader, 4 * MiB, SIZE, snapshot);
  assert.deepEqual(reader.counts.dropped.map((d) => d.reason), ['it is being rebuilt']);
  assert.equal(reader.usableReplicas, 1);
  assert.equal(reader.counts.directBytes + reader.counts.engineBytes, SIZE);
});
