/**
 * Growing a replica (volume expansion) and the rebuild marks (SET_REBUILDING, SET_REVISION), in
 * process and through `zebu replica serve`: the new size is durable (a crash right after does not
 * lose it), old data is intact, the new area reads zeros in the head and in every snapshot,
 * writes there survive a crash once flushed, and nothing ever shrinks.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { Replica } from '../../src/replica/replica.ts';
import { ErrorCode, ZebuError } from '../../src/errors.ts';
import { startReplica, writeSecret } from '../support/replica-process.ts';
import { DataClient } from '../../src/protocol/client.ts';
import { tempDir, pattern } from '../support/tmp.ts';

type After = { after: (fn: () => void | Promise<void>) => void };

/** A temporary directory; `defer`red clean-ups (closing replicas) run before it is removed. */
function scratch(t: After): { root: string; defer: (fn: () => unknown) => void } {
  const deferred: (() => unknown)[] = [];
  t.after(async () => {
    for (const fn of deferred.reverse()) await Promise.resolve().then(fn).catch(() => {});
  });
  // Registered second, so it runs after the clean-ups above.
  const root = tempDir(t);
  return { root, defer: (fn) => deferred.push(fn) };
}

const MiB = 1024 * 1024;
const OLD = 8 * MiB;
const NEW = 20 * MiB;

async function read(replica: Replica, offset: number, length: number, snapshot?: string): Promise<Buffer> {
  const out = Buffer.alloc(length);
  if (snapshot === undefined) await replica.read(offset, length, out);
  else await replica.readSnapshot(snapshot, offset, length, out);
  return out;
}

function isZero(buf: Buffer): boolean {
  return buf.every((b) => b === 0);
}

function rejectsWith(code: ErrorCode, pattern: RegExp): (err: unknown) => boolean {
  return (err) => {
    assert.ok(err instanceof ZebuError, String(err));
    assert.equal(err.code, code, err.message);
    assert.match(err.message, pattern);
    return true;
  };
}

test('online expand: durable, old data intact, new area zeros in head and snapshots, writes there survive a crash', async (t) => {
  const { root, defer } = scratch(t);
  const dir = path.join(root, 'r');
  let replica = await Replica.create(dir, { sizeBytes: OLD });
  defer(() => replica.abandon());
  const a = pattern(1, MiB);
  const tail = pattern(2, 4096);
  await replica.write(0, a);
  await replica.write(OLD - 4096, tail);
  await replica.snapshotCreate('s1');
  await replica.write(MiB, pattern(3, MiB));

  // Writes racing the expansion all land (the expansion waits for them, they wait for it).
  const racing = Array.from({ length: 16 }, (_, i) => replica.write(2 * MiB + i * 4096, pattern(100 + i, 4096)));
  const info = await replica.expand(NEW);
  await Promise.all(racing);
  assert.equal(info.sizeBytes, NEW);
  assert.equal(replica.sizeBytes, NEW);

  assert.deepEqual(await read(replica, 0, MiB), a);
  assert.deepEqual(await read(replica, OLD - 4096, 4096), tail);
  assert.ok(isZero(await read(replica, OLD, NEW - OLD)), 'new area of the head reads zeros');
  assert.ok(isZero(await read(replica, OLD, NEW - OLD, 's1')), 'new area of a snapshot reads zeros');
  assert.deepEqual(await read(replica, OLD - 4096, 4096, 's1'), tail);
  for (let i = 0; i < 16; i++) assert.deepEqual(await read(replica, 2 * MiB + i * 4096, 4096), pattern(100 + i, 4096));
  assert.deepEqual(await replica.blockStatus(OLD, NEW - OLD), [{ offset: OLD, length: NEW - OLD, data: false }]);

  // Into the new area, across the old end, then flushed: survives a crash (no clean close).
  const across = pattern(4, 3 * 4096 + 100);
  await replica.write(OLD - 4096 - 50, across);
  await replica.write(NEW - 4096, pattern(5, 4096));
  await replica.zero(NEW - 8192, 4096);
  await replica.flush();
  await replica.abandon();
  replica = await Replica.open(dir);
  assert.equal(replica.info().sizeBytes, NEW);
  assert.deepEqual(await read(replica, OLD - 4096 - 50, across.length), across);
  assert.deepEqual(await read(replica, NEW - 4096, 4096), pattern(5, 4096));
  assert.ok(isZero(await read(replica, NEW - 8192, 4096)));
  assert.ok(isZero(await read(replica, OLD, NEW - OLD, 's1')));

  // Snapshots and reverts at the new size.
  await replica.snapshotCreate('s2');
  await replica.write(NEW - 4096, pattern(6, 4096));
  await replica.snapshotRevert('s2');
  assert.deepEqual(await read(replica, NEW - 4096, 4096), pattern(5, 4096));
  await replica.snapshotDelete('s1');
  assert.deepEqual(await read(replica, 0, MiB), a);
  assert.ok(isZero(await read(replica, OLD + 4 * 4096, NEW - OLD - 6 * 4096)));
});

test('expand refuses to shrink, unaligned and oversized sizes; the same size changes nothing', async (t) => {
  const { root, defer } = scratch(t);
  const replica = await Replica.create(path.join(root, 'r'), { sizeBytes: OLD });
  defer(() => replica.close());
  await assert.rejects(replica.expand(OLD - 4096), rejectsWith(ErrorCode.EINVAL, /cannot shrink/));
  await assert.rejects(replica.expand(OLD + 100), rejectsWith(ErrorCode.EINVAL, /multiple of 4096/));
  await assert.rejects(replica.expand(2 ** 50), rejectsWith(ErrorCode.EINVAL, /at most/));
  await assert.rejects(replica.expand(-4096), rejectsWith(ErrorCode.EINVAL, /positive/));
  const before = replica.info();
  assert.deepEqual(await replica.expand(OLD), before);
  assert.equal(replica.sizeBytes, OLD);
});

test('offline expand (expandOnDisk): grows a closed replica, never shrinks, names a missing one', async (t) => {
  const { root, defer } = scratch(t);
  const dir = path.join(root, 'r');
  let replica = await Replica.create(dir, { sizeBytes: OLD });
  await replica.write(0, pattern(7, MiB));
  await replica.close();
  assert.equal(await Replica.expandOnDisk(dir, NEW), OLD);
  assert.equal(await Replica.expandOnDisk(dir, NEW), NEW, 'again: nothing to do');
  await assert.rejects(Replica.expandOnDisk(dir, OLD), rejectsWith(ErrorCode.EINVAL, /cannot shrink/));
  await assert.rejects(Replica.expandOnDisk(path.join(root, 'none'), NEW), rejectsWith(ErrorCode.NOT_FOUND, /replica.json missing/));
  replica = await Replica.open(dir);
  defer(() => replica.close());
  assert.equal(replica.sizeBytes, NEW);
  assert.deepEqual(await read(replica, 0, MiB), pattern(7, MiB));
  assert.ok(isZero(await read(replica, OLD, NEW - OLD)));
});

test('the rebuilding mark and the revision taken from a rebuild source are durable', async (t) => {
  const { root, defer } = scratch(t);
  const dir = path.join(root, 'r');
  let replica = await Replica.create(dir, { sizeBytes: OLD });
  defer(() => replica.abandon());
  assert.equal(replica.info().rebuilding, false);
  assert.equal((await replica.setRebuilding('full')).rebuilding, true);
  await replica.write(0, pattern(8, 4096));
  await replica.abandon();
  replica = await Replica.open(dir);
  assert.equal(replica.info().rebuilding, true, 'a crash midway leaves the mark');

  await replica.write(4096, pattern(9, 4096));
  const taken = await replica.setRevision(1234);
  assert.equal(taken.revision, 1234);
  assert.equal(taken.flushedRevision, 1234);
  assert.equal((await replica.setRebuilding(null)).rebuilding, false);
  await replica.abandon();
  replica = await Replica.open(dir);
  const info = replica.info();
  assert.equal(info.rebuilding, false);
  assert.equal(info.revision, 1234);
  assert.equal(info.flushedRevision, 1234);
  assert.deepEqual(await read(replica, 4096, 4096), pattern(9, 4096), 'setRevision flushed the data too');
  await assert.rejects(replica.setRevision(-1), rejectsWith(ErrorCode.EINVAL, /revision/));
  await assert.rejects(replica.setRevision(1.5), rejectsWith(ErrorCode.EINVAL, /revision/));
});

test('replica serve --size: a larger size grows an existing replica on open, a smaller one is a clear error', async (t) => {
  const root = tempDir(t);
  const { file: secretFile, secret } = writeSecret(root);
  const dir = path.join(root, 'r');
  const first = await startReplica({ dir, sizeBytes: OLD, secretFile });
  t.after(() => first.child.kill('SIGKILL'));
  let client = await DataClient.connect({ port: first.port, secret, epoch: 1 });
  await client.open();
  await client.write(0, pattern(10, MiB));
  await client.flush();
  client.close();
  first.child.kill('SIGKILL');
  await first.exited;

  const grown = await startReplica({ dir, sizeBytes: NEW, secretFile });
  t.after(() => grown.child.kill('SIGKILL'));
  assert.equal(grown.ready.sizeBytes, NEW);
  client = await DataClient.connect({ port: grown.port, secret, epoch: 1 });
  assert.equal((await client.info()).sizeBytes, NEW);
  assert.deepEqual(await client.read(0, MiB), pattern(10, MiB));
  assert.ok(isZero(await client.read(OLD, NEW - OLD)));
  client.close();
  grown.child.kill('SIGTERM');
  await grown.exited;

  await assert.rejects(startReplica({ dir, sizeBytes: OLD, secretFile }), /has 20971520 bytes: it cannot shrink to 8388608/);
  // Refused without harm: the replica still opens at its size.
  const again = await startReplica({ dir, sizeBytes: NEW, secretFile });
  t.after(() => again.child.kill('SIGKILL'));
  assert.equal(again.ready.sizeBytes, NEW);
});
