/**
 * SNAPSHOT_CHANGES, what an incremental backup reads: where a snapshot may differ from an older
 * snapshot of its chain. Writes, trims and zeroes after the base count as changes; blocks only
 * the base or older layers hold do not; deleting a snapshot in between keeps the answer (its
 * blocks merge into its child); a base that is not an ancestor is NOT_FOUND. Also over the wire.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { Replica } from '../../src/replica/replica.ts';
import { ErrorCode, ZebuError } from '../../src/errors.ts';
import { startTestReplica } from '../support/replica-process.ts';
import { DataClient } from '../../src/protocol/client.ts';
import { tempDir, pattern } from '../support/tmp.ts';

const KiB = 1024;
const MiB = 1024 * KiB;

function changed(extents: { offset: number; length: number; data: boolean }[]): [number, number][] {
  return extents.filter((e) => e.data).map((e) => [e.offset, e.length]);
}

test('snapshot changes: writes, trims and zeroes since the base; merged deletes; a base off the chain is NOT_FOUND', async (t) => {
  const root = tempDir(t);
  const replica = await Replica.create(path.join(root, 'r'), { sizeBytes: 16 * MiB });
  t.after(() => replica.abandon());
  await replica.write(0, pattern(1, 2 * MiB));
  await replica.write(8 * MiB, pattern(2, 64 * KiB));
  await replica.snapshotCreate('s1');
  await replica.write(MiB, pattern(3, 4 * KiB));
  await replica.zero(8 * MiB, 4 * KiB);
  await replica.snapshotCreate('s2');
  await replica.write(12 * MiB, pattern(4, 8 * KiB));
  await replica.snapshotCreate('s3');
  await replica.write(15 * MiB, pattern(5, 4 * KiB)); // the head: in no snapshot

  // From nothing: everything the snapshot's chain holds.
  assert.deepEqual(changed(await replica.snapshotChanges('s1', null, 0, 16 * MiB)), [[0, 2 * MiB], [8 * MiB, 64 * KiB]]);
  // s1 -> s3: the write at 1 MiB, the zeroed block at 8 MiB, the write at 12 MiB.
  const s1s3 = await replica.snapshotChanges('s3', 's1', 0, 16 * MiB);
  assert.deepEqual(changed(s1s3), [[MiB, 4 * KiB], [8 * MiB, 4 * KiB], [12 * MiB, 8 * KiB]]);
  // The extents cover the range without gaps.
  assert.equal(s1s3.reduce((n, e) => n + e.length, 0), 16 * MiB);
  assert.deepEqual(changed(await replica.snapshotChanges('s3', 's2', 0, 16 * MiB)), [[12 * MiB, 8 * KiB]]);
  assert.deepEqual(changed(await replica.snapshotChanges('s3', 's3', 0, 16 * MiB)), []);
  // A sub-range is clipped to it.
  assert.deepEqual(changed(await replica.snapshotChanges('s3', 's1', MiB + 2 * KiB, 8 * MiB)), [[MiB + 2 * KiB, 2 * KiB], [8 * MiB, 4 * KiB]]);

  // Deleting s2 merges it into s3: s1 -> s3 is the same.
  await replica.snapshotDelete('s2');
  assert.deepEqual(changed(await replica.snapshotChanges('s3', 's1', 0, 16 * MiB)), changed(s1s3));

  // A base that is not an ancestor: s3 is newer than s1.
  await assert.rejects(replica.snapshotChanges('s1', 's3', 0, 16 * MiB), (err) => err instanceof ZebuError && err.code === ErrorCode.NOT_FOUND && /not an ancestor/.test(err.message));
  await assert.rejects(replica.snapshotChanges('nope', null, 0, 16 * MiB), (err) => err instanceof ZebuError && err.code === ErrorCode.NOT_FOUND);
  await assert.rejects(replica.snapshotChanges('s3', null, 0, 17 * MiB), (err) => err instanceof ZebuError && err.code === ErrorCode.EINVAL);
});

test('snapshot changes over the data protocol (zebu replica serve), bad payloads refused', async (t) => {
  const secret = Buffer.from('zebu-test-secret-0123456789abcdef');
  const proc = await startTestReplica(t, { sizeBytes: 8 * MiB, secret });
  const client = await DataClient.connect({ port: proc.port, secret });
  t.after(() => client.close());
  await client.write(4 * MiB, pattern(7, 8 * KiB));
  await client.snapshotCreate('a');
  await client.write(0, pattern(8, 4 * KiB));
  await client.snapshotCreate('b');
  assert.deepEqual(changed(await client.snapshotChanges('b', 'a', 0, 8 * MiB)), [[0, 4 * KiB]]);
  assert.deepEqual(changed(await client.snapshotChanges('b', null, 0, 8 * MiB)), [[0, 4 * KiB], [4 * MiB, 8 * KiB]]);
  const { Op } = await import('../../src/protocol/frames.ts');
  for (const payload of ['', 'not json', '{"snapshot":3}', '{"snapshot":"b","base":7}']) {
    await assert.rejects(client.request(Op.SNAPSHOT_CHANGES, 0, 0, MiB, Buffer.from(payload)), (err) => err instanceof ZebuError && err.code === ErrorCode.EINVAL, payload);
  }
  // The replica still serves.
  assert.deepEqual(changed(await client.snapshotChanges('a', null, 0, 8 * MiB)), [[4 * MiB, 8 * KiB]]);
});
