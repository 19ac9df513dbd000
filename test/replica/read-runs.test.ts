/**
 * Reads of fragmented ranges (src/replica/replica.ts readResolved): a range many runs make up is
 * read with one read of the head's file (only the head holds data) or with its runs' reads in
 * flight together (snapshots below). Either way every byte is what was written: zeros where
 * nothing was, or where a block was zeroed over stale bytes; the head's data over a snapshot's;
 * zeros past a head file that the volume outgrew.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { Replica } from '../../src/replica/replica.ts';
import { tempDir, pattern } from '../support/tmp.ts';

const KiB = 1024;
const MiB = 1024 * KiB;
const BLOCK = 4 * KiB;

async function read(replica: Replica, offset: number, length: number): Promise<Buffer> {
  const out = Buffer.alloc(length, 0xee);
  await replica.read(offset, length, out);
  return out;
}

test('fragmented reads: head only, zeroed blocks over stale bytes, a snapshot below, past the end of an outgrown head file', async (t) => {
  let replica: Replica | null = null;
  // Registered before the directory's removal: hooks run in that order.
  t.after(() => replica?.close());
  const dir = path.join(tempDir(t), 'r');
  const model = Buffer.alloc(16 * MiB);
  replica = await Replica.create(dir, { sizeBytes: 8 * MiB });
  const write = async (offset: number, data: Buffer): Promise<void> => {
    await replica!.write(offset, data);
    data.copy(model, offset);
  };

  // Every other block of the first MiB: 128 data runs between holes.
  for (let b = 0; b < 256; b += 2) await write(b * BLOCK, pattern(b + 1, BLOCK));
  assert.deepEqual(await read(replica, 0, MiB), model.subarray(0, MiB));
  // Zeroed blocks keep their old bytes in the file: they must read as zeros.
  for (let b = 0; b < 256; b += 8) {
    await replica.zero(b * BLOCK, BLOCK);
    model.fill(0, b * BLOCK, (b + 1) * BLOCK);
  }
  assert.deepEqual(await read(replica, 0, MiB), model.subarray(0, MiB));
  // Unaligned edges of a fragmented range.
  assert.deepEqual(await read(replica, 4096 + 100, 300 * KiB), model.subarray(4096 + 100, 4096 + 100 + 300 * KiB));

  // A snapshot below, the head fragmented over it: runs from two layers.
  await replica.snapshotCreate('s1');
  for (let b = 1; b < 256; b += 3) await write(b * BLOCK, pattern(1000 + b, BLOCK));
  assert.deepEqual(await read(replica, 0, MiB), model.subarray(0, MiB));

  // Grown offline: the head file is shorter than the volume; past it, zeros.
  await replica.close();
  await Replica.expandOnDisk(dir, 16 * MiB);
  replica = await Replica.open(dir);
  await write(12 * MiB, pattern(7, BLOCK));
  await write(12 * MiB + 8 * BLOCK, pattern(8, BLOCK));
  assert.deepEqual(await read(replica, 7 * MiB, 9 * MiB), model.subarray(7 * MiB, 16 * MiB));
  assert.deepEqual(await read(replica, 0, 16 * MiB), model);
});
