/**
 * TRIM and WRITE_ZEROES give space back: the addon punches holes in a real file; a replica's
 * zero punches its head's data file (du drops), unless asked not to (NO_HOLE); what it punched
 * reads zeros after a reopen; snapshots keep their data; a disk that fails the punch fails the
 * zero (EIO), never silently.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { punchHole, holePunchUnavailable } from '../../src/replica/hole-punch.ts';
import { Replica } from '../../src/replica/replica.ts';
import { NodeDisk } from '../../src/replica/disk.ts';
import { FaultyDisk } from '../../src/replica/faulty-disk.ts';
import { MemoryDisk } from '../../src/replica/memory-disk.ts';
import { ErrorCode, ZebuError } from '../../src/errors.ts';
import { tempDir, pattern } from '../support/tmp.ts';

const KiB = 1024;
const MiB = 1024 * KiB;

/** Bytes the file takes on disk. */
function allocated(file: string): number {
  return fs.statSync(file).blocks * 512;
}

function headData(dir: string): string {
  const files = fs.readdirSync(dir).filter((f) => f.endsWith('.data'));
  assert.equal(files.length, 1, files.join(' '));
  return path.join(dir, files[0]);
}

async function read(replica: Replica, offset: number, length: number, snapshot?: string): Promise<Buffer> {
  const out = Buffer.alloc(length);
  if (snapshot === undefined) await replica.read(offset, length, out);
  else await replica.readSnapshot(snapshot, offset, length, out);
  return out;
}

const isZero = (b: Buffer): boolean => b.every((x) => x === 0);

test('the addon is built and punches a hole in a real file: zeros, blocks freed, size kept; a bad fd is an error', async (t) => {
  assert.equal(holePunchUnavailable(), null);
  const file = path.join(tempDir(t), 'f');
  const data = pattern(7, MiB);
  fs.writeFileSync(file, data);
  fs.fsyncSync(fs.openSync(file, 'r+'));
  const before = allocated(file);
  const fd = fs.openSync(file, 'r+');
  try {
    assert.equal(await punchHole(fd, file, 256 * KiB, 512 * KiB), true);
    assert.equal(await punchHole(fd, file, 0, 0), false, 'an empty range punches nothing');
  } finally {
    fs.closeSync(fd);
  }
  const after = fs.readFileSync(file);
  assert.equal(after.length, MiB);
  assert.ok(isZero(after.subarray(256 * KiB, 768 * KiB)));
  assert.deepEqual(after.subarray(0, 256 * KiB), data.subarray(0, 256 * KiB));
  assert.deepEqual(after.subarray(768 * KiB), data.subarray(768 * KiB));
  assert.ok(before - allocated(file) >= 512 * KiB, `${before} -> ${allocated(file)}`);
  await assert.rejects(punchHole(fd, file, 0, 4096), (err: NodeJS.ErrnoException) => err.code === 'EBADF' && /fallocate/.test(err.message));
});

test('a replica\'s zero punches its head (not with noHole); zeros after a reopen; a snapshot keeps its data', async (t) => {
  const dir = path.join(tempDir(t), 'r');
  let replica = await Replica.create(dir, { sizeBytes: 32 * MiB });
  const data = pattern(3, 16 * MiB);
  await replica.write(0, data);
  await replica.flush();
  const file = headData(dir);
  const full = allocated(file);
  assert.ok(full >= 16 * MiB);

  // Unaligned edges: the partial blocks are written as zeros, the whole ones punched.
  await replica.zero(MiB + 512, 4 * MiB);
  await replica.flush();
  const punched = allocated(file);
  assert.ok(full - punched >= 4 * MiB - 8 * KiB, `${full} -> ${punched}`);
  assert.ok(isZero(await read(replica, MiB + 512, 4 * MiB)));
  assert.deepEqual(await read(replica, MiB, 512), data.subarray(MiB, MiB + 512));
  assert.deepEqual(await read(replica, 5 * MiB + 512, 4096), data.subarray(5 * MiB + 512, 5 * MiB + 512 + 4096));
  const info = replica.info();
  assert.equal(info.holePunchUnavailable, null);
  assert.ok(info.punchedBytes! >= 4 * MiB - 8 * KiB);

  // NO_HOLE: reads zeros, keeps the space.
  await replica.zero(8 * MiB, 4 * MiB, { noHole: true });
  await replica.flush();
  assert.ok(Math.abs(allocated(file) - punched) < 64 * KiB, `${punched} -> ${allocated(file)}`);
  assert.ok(isZero(await read(replica, 8 * MiB, 4 * MiB)));

  await replica.close();
  replica = await Replica.open(dir);
  t.after(() => replica.abandon());
  assert.ok(isZero(await read(replica, MiB + 512, 4 * MiB)));
  assert.ok(isZero(await read(replica, 8 * MiB, 4 * MiB)));
  assert.deepEqual(await read(replica, 12 * MiB, 4 * MiB), data.subarray(12 * MiB));

  // Zeroed in the head over a snapshot: the snapshot keeps the bytes, the head reads zeros.
  await replica.snapshotCreate('s1');
  await replica.zero(12 * MiB, 2 * MiB);
  assert.ok(isZero(await read(replica, 12 * MiB, 2 * MiB)));
  assert.deepEqual(await read(replica, 12 * MiB, 2 * MiB, 's1'), data.subarray(12 * MiB, 14 * MiB));
});

test('a punch the disk fails (EIO) fails the zero; in memory a punch frees the chunks', async (t) => {
  const disk = new FaultyDisk(new NodeDisk());
  const dir = path.join(tempDir(t), 'r');
  const replica = await Replica.create(dir, { sizeBytes: 8 * MiB, disk });
  t.after(() => replica.abandon());
  await replica.write(0, pattern(5, 4 * MiB));
  disk.addRule({ op: 'write', errno: 'EIO', pathIncludes: '.data', count: 1 });
  await assert.rejects(replica.zero(0, MiB), (err) => err instanceof ZebuError && err.code === ErrorCode.EIO);

  const memory = new MemoryDisk();
  const inMemory = await Replica.create('/m', { sizeBytes: 8 * MiB, disk: memory });
  t.after(() => inMemory.abandon());
  await inMemory.write(0, pattern(6, 4 * MiB));
  const held = memory.usedBytes;
  await inMemory.zero(0, 2 * MiB);
  assert.ok(held - memory.usedBytes >= 2 * MiB, `${held} -> ${memory.usedBytes}`);
  assert.ok(isZero(await read(inMemory, 0, 2 * MiB)));
});
