/**
 * The write-intent ops of the data protocol against a Replica served in process: FLUSH with
 * seq/confirmed, INTENT_GET, MISSED_START/GET/DROP/PRUNE, REGION_HASH, OPEN resetting the
 * numbering, arrival ordering on one connection, argument checks, and UNSUPPORTED from a
 * backend without a log.
 */
import '../support/intent-idle-zero.ts';
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { createHash } from 'node:crypto';
import { Replica } from '../../src/replica/replica.ts';
import { DataServer } from '../../src/protocol/server.ts';
import { DataClient } from '../../src/protocol/client.ts';
import { Op, encodeFlushConfirmed } from '../../src/protocol/frames.ts';
import { INTENT_REGION_BYTES } from '../../src/replica/intent-log.ts';
import { ErrorCode, ZebuError } from '../../src/errors.ts';
import { MemoryBackend } from '../frontend/memory-backend.ts';
import { pattern } from '../support/tmp.ts';
import { rejectsWith } from '../support/assertions.ts';

const R = INTENT_REGION_BYTES;
const SIZE = 16 * R;
const secret = Buffer.from('zebu-test-secret-0123456789abcdef');

/** A replica served on 127.0.0.1 in this process; closed and removed when the test ends. */
async function servedReplica(t: { after: (fn: () => Promise<void>) => void }): Promise<{ replica: Replica; port: number; dir: string }> {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'zebu-intent-ops-'));
  const dir = path.join(root, 'r');
  const replica = await Replica.create(dir, { sizeBytes: SIZE });
  const server = new DataServer(replica, { secret });
  const { port } = await server.listen('127.0.0.1', 0);
  t.after(async () => {
    await server.close();
    await replica.close().catch(() => {});
    fs.rmSync(root, { recursive: true, force: true });
  });
  return { replica, port, dir };
}

async function connect(t: { after: (fn: () => Promise<void>) => void }, port: number, epoch = 1): Promise<DataClient> {
  const client = await DataClient.connect({ port, secret, epoch });
  t.after(async () => client.close());
  return client;
}

test('FLUSH seq/confirmed over the wire: regions leave only when confirmed; INTENT_GET and INFO report them', async (t) => {
  const { port } = await servedReplica(t);
  const client = await connect(t, port, 2);
  const info = await client.open();
  assert.equal(info.activeRegions, 0);
  assert.equal(info.intentRegionBytes, R);
  assert.equal(info.writeEpoch, 0);

  await client.write(0, pattern(1, 4096));
  await client.write(5 * R, pattern(2, 8192));
  await client.flush(1);
  assert.deepEqual(await client.intentGet(), { regionBytes: R, active: [0, 5], pinned: [], missed: {}, invalidMissed: [] });
  assert.equal((await client.info()).writeEpoch, 2);
  await client.flush(2, 1);
  assert.deepEqual((await client.intentGet()).active, []);
  assert.equal((await client.info()).activeRegions, 0);
  // Unnumbered FLUSH (a tool, FUA) still flushes and confirms nothing.
  await client.write(3 * R, pattern(3, 4096));
  await client.flush();
  await client.flush(3, 2);
  assert.deepEqual((await client.intentGet()).active, [3]);

  // The engine's callback path: send(Op.FLUSH, 0, seq, 0, confirmed payload).
  await new Promise<void>((resolve, reject) =>
    client.send(Op.FLUSH, 0, 4, 0, encodeFlushConfirmed(3), (err) => (err ? reject(err) : resolve())),
  );
  assert.deepEqual((await client.intentGet()).active, []);
});

test('requests are taken in arrival order: a write sent before a FLUSH holds its region', async (t) => {
  const { port } = await servedReplica(t);
  const client = await connect(t, port);
  await client.open();
  await client.write(R, pattern(1, 4096));
  await client.flush(1);
  // Pipelined in one tick: the write arrives first, so FLUSH 2's confirmation of flush 1 cannot
  // free the region (a write to it is in flight), and flush 2 arrived before the write completed.
  const write = client.write(R + 4096, pattern(2, 1024 * 1024));
  const flush = client.flush(2, 1);
  await Promise.all([write, flush]);
  assert.deepEqual((await client.intentGet()).active, [1]);
  await client.flush(3, 2);
  assert.deepEqual((await client.intentGet()).active, [1], 'the write completed after flush 2 arrived');
  await client.flush(4, 3);
  assert.deepEqual((await client.intentGet()).active, []);

  // MISSED_START then a confirming FLUSH, pipelined: the map holds the region.
  await client.write(9 * R, pattern(3, 4096));
  await client.flush(5, 4);
  const start = client.missedStart('replica-c');
  const confirm = client.flush(6, 5);
  await Promise.all([start, confirm]);
  assert.deepEqual(await client.missedGet('replica-c'), [9]);
});

test('an OPEN closes the connections OPENed before at the same epoch; those of older epochs are fenced request by request', async (t) => {
  const { port } = await servedReplica(t);
  const given = await connect(t, port, 3);
  await given.open();
  await given.write(0, pattern(1, 4096));
  const reconnected = await connect(t, port, 3);
  await reconnected.open();
  // The engine gave `given` up and came back through `reconnected`: nothing more is served on it.
  await assert.rejects(given.write(0, pattern(2, 4096)), (err: unknown) => err instanceof ZebuError && (err.code === ErrorCode.DISCONNECTED || err.code === ErrorCode.CLOSED));
  assert.ok((await reconnected.read(0, 4096)).equals(pattern(1, 4096)));
  // A connection that never OPENed (a tool reading INFO, say) is left alone.
  const tool = await connect(t, port, 3);
  await tool.info();
  const newer = await connect(t, port, 4);
  await newer.open();
  await tool.ping();
  // The engine of epoch 3 is told it was superseded, not cut off.
  await assert.rejects(reconnected.write(0, pattern(3, 4096)), rejectsWith(ErrorCode.FENCED));
  assert.ok((await newer.read(0, 4096)).equals(pattern(1, 4096)));
});

test('OPEN of a new engine restarts the flush numbering', async (t) => {
  const { port } = await servedReplica(t);
  const old = await connect(t, port, 1);
  await old.open();
  await old.write(2 * R, pattern(1, 4096));
  for (let seq = 1; seq <= 40; seq++) await old.flush(seq, seq - 2 > 0 ? seq - 2 : 0);
  await old.write(4 * R, pattern(2, 4096)); // never confirmed by the old engine
  old.close();
  const fresh = await connect(t, port, 2);
  await fresh.open();
  assert.deepEqual((await fresh.intentGet()).active, [4]);
  await fresh.flush(1);
  assert.deepEqual((await fresh.intentGet()).active, [4]);
  await fresh.flush(2, 1);
  assert.deepEqual((await fresh.intentGet()).active, []);
});

test('missed-write maps over the wire, durable across a crash; tree ops drop them', async (t) => {
  const { port, dir, replica } = await servedReplica(t);
  const client = await connect(t, port);
  await client.open();
  await client.write(0, pattern(1, 4096));
  await client.missedStart('node-2.replica-b');
  await client.write(7 * R, pattern(2, 4096));
  await client.missedStart('10.0.0.7:7000');
  assert.deepEqual(await client.missedGet('node-2.replica-b'), [0, 7]);
  assert.deepEqual((await client.intentGet()).missed, { 'node-2.replica-b': 2, '10.0.0.7:7000': 2 });
  await assert.rejects(client.missedGet('gone'), rejectsWith(ErrorCode.NOT_FOUND));
  await client.missedPrune(['10.0.0.7:7000']);
  assert.deepEqual(Object.keys((await client.intentGet()).missed), ['10.0.0.7:7000']);

  // The maps are on disk once MISSED_START is answered: a second process opening the same
  // directory after a crash (here: files read while the first still runs) sees them.
  const copyRoot = fs.mkdtempSync(path.join(os.tmpdir(), 'zebu-intent-copy-'));
  t.after(async () => fs.rmSync(copyRoot, { recursive: true, force: true }));
  fs.cpSync(dir, path.join(copyRoot, 'r'), { recursive: true });
  const copy = await Replica.open(path.join(copyRoot, 'r'));
  assert.deepEqual(copy.missedGet('10.0.0.7:7000'), [0, 7]);
  await copy.close();

  await client.missedDrop('10.0.0.7:7000');
  await client.missedDrop('10.0.0.7:7000'); // dropping nothing is fine
  assert.deepEqual((await client.intentGet()).missed, {});
  await client.missedStart('b');
  await client.snapshotCreate('s1');
  assert.deepEqual((await client.intentGet()).missed, {});
  assert.equal(replica.info().activeRegions, 2);
});

test('REGION_HASH: SHA-256 of the live bytes or of a snapshot\'s; bad arguments are EINVAL on a connection that keeps working', async (t) => {
  const { port } = await servedReplica(t);
  const client = await connect(t, port);
  await client.open();
  await client.write(R + 12288, pattern(4, 65536));
  const bytes = await client.read(R, R);
  assert.deepEqual(await client.regionHash(R, R), createHash('sha256').update(bytes).digest());
  assert.deepEqual(await client.regionHash(0, R), createHash('sha256').update(Buffer.alloc(R)).digest());
  // A snapshot's bytes by name: the live volume moves on, the snapshot's hash does not.
  await client.snapshotCreate('before');
  await client.write(R + 12288, pattern(5, 4096));
  assert.deepEqual(await client.regionHash(R, R, 'before'), createHash('sha256').update(bytes).digest());
  assert.notDeepEqual(await client.regionHash(R, R), await client.regionHash(R, R, 'before'));
  await assert.rejects(client.regionHash(R, R, 'no-such-snapshot'), rejectsWith(ErrorCode.NOT_FOUND));

  await assert.rejects(client.regionHash(0, 32 * 1024 * 1024 + 4096), rejectsWith(ErrorCode.EINVAL));
  await assert.rejects(client.regionHash(SIZE, 4096), rejectsWith(ErrorCode.EINVAL));
  await assert.rejects(client.missedStart(''), rejectsWith(ErrorCode.EINVAL));
  await assert.rejects(client.missedStart('a b'), rejectsWith(ErrorCode.EINVAL));
  await assert.rejects(client.missedStart('x'.repeat(201)), rejectsWith(ErrorCode.EINVAL));
  await assert.rejects(client.missedGet('ü'), rejectsWith(ErrorCode.EINVAL));
  await assert.rejects(client.request(Op.MISSED_PRUNE, 0, 0, 0, Buffer.from('{"a":1}')), rejectsWith(ErrorCode.EINVAL));
  await assert.rejects(client.request(Op.MISSED_PRUNE, 0, 0, 0, Buffer.from('["ok", "not ok"]')), rejectsWith(ErrorCode.EINVAL));
  await assert.rejects(client.request(Op.MISSED_CLEAR, 0, 0, 0, Buffer.from('[1]')), rejectsWith(ErrorCode.EINVAL, /MISSED_CLEAR/));
  await assert.rejects(client.request(Op.MISSED_CLEAR, 0, 0, 0, Buffer.from('{"key":"a","regions":[-1]}')), rejectsWith(ErrorCode.EINVAL));
  await assert.rejects(client.request(Op.MISSED_CLEAR, 0, 0, 0, Buffer.from('{"key":"a b","regions":[1]}')), rejectsWith(ErrorCode.EINVAL));
  await assert.rejects(client.request(Op.MISSED_CLEAR, 0, 0, 0, Buffer.from('not json')), rejectsWith(ErrorCode.EINVAL));
  await assert.rejects(client.missedClear('a', [SIZE / R]), rejectsWith(ErrorCode.EINVAL, /outside the volume/));
  await client.missedClear('nobody', [1]);
  await assert.rejects(client.request(Op.FLUSH, 0, 1, 0, Buffer.from([1, 2, 3])), rejectsWith(ErrorCode.EINVAL));
  await assert.rejects(client.request(Op.INTENT_RELEASE, 0, 0, 0, Buffer.from('{"regions":[1]}')), rejectsWith(ErrorCode.EINVAL, /INTENT_RELEASE/));
  await assert.rejects(client.request(Op.INTENT_RELEASE, 0, 0, 0, Buffer.from('[1, -2]')), rejectsWith(ErrorCode.EINVAL));
  await assert.rejects(client.request(Op.INTENT_RELEASE, 0, 0, 0, Buffer.from('[1.5]')), rejectsWith(ErrorCode.EINVAL));
  await assert.rejects(client.request(Op.INTENT_RELEASE, 0, 0, 0, Buffer.from(JSON.stringify(Array.from({ length: 5000 }, (_, i) => i)))), rejectsWith(ErrorCode.EINVAL));
  await assert.rejects(client.request(Op.FAULT_INJECT, 0, 0, 0, Buffer.from('{"powerLoss":{"seed":1,"mode":"drop"}}')), rejectsWith(ErrorCode.UNSUPPORTED));
  await client.ping();
  assert.deepEqual(await client.regionHash(R, 4096), createHash('sha256').update(bytes.subarray(0, 4096)).digest());
});

test('a backend without a write-intent log answers the new ops with UNSUPPORTED and takes numbered FLUSHes', async (t) => {
  const backend = new MemoryBackend(SIZE);
  const server = new DataServer(backend, { secret });
  const { port } = await server.listen('127.0.0.1', 0);
  t.after(async () => server.close());
  const client = await connect(t, port, 0);
  await client.flush(7, 6);
  await assert.rejects(client.intentGet(), rejectsWith(ErrorCode.UNSUPPORTED, /INTENT_GET/));
  await assert.rejects(client.missedStart('a'), rejectsWith(ErrorCode.UNSUPPORTED));
  await assert.rejects(client.missedGet('a'), rejectsWith(ErrorCode.UNSUPPORTED));
  await assert.rejects(client.missedDrop('a'), rejectsWith(ErrorCode.UNSUPPORTED));
  await assert.rejects(client.missedPrune([]), rejectsWith(ErrorCode.UNSUPPORTED));
  await assert.rejects(client.regionHash(0, 4096), rejectsWith(ErrorCode.UNSUPPORTED));
  await assert.rejects(client.intentRelease([0]), rejectsWith(ErrorCode.UNSUPPORTED));
  await client.ping();
});

test('INTENT_RELEASE over the wire: the regions leave the log; an older epoch is fenced', async (t) => {
  const { port } = await servedReplica(t);
  const client = await connect(t, port, 2);
  await client.open();
  for (const region of [2, 3, 4]) await client.write(region * R, pattern(region, 4096));
  await client.intentRelease([2, 4]);
  assert.deepEqual((await client.intentGet()).active, [3]);
  const old = await connect(t, port, 1);
  await assert.rejects(old.intentRelease([3]), rejectsWith(ErrorCode.FENCED));
  assert.deepEqual((await client.intentGet()).active, [3]);
});
