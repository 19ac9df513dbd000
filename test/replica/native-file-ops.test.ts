/**
 * The native file operations. TRIM and WRITE_ZEROES give space back: the addon punches holes in a
 * real file; a replica's zero punches its head's data file (du drops), unless asked not to
 * (NO_HOLE); what it punched reads zeros after a reopen; snapshots keep their data; a disk that
 * fails the punch fails the zero (EIO), never silently. Reads from the page cache: served on the
 * loop when cached, nothing (not an error) when not, and the disk read then gives the same bytes.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { spawnSync } from 'node:child_process';
import { punchHole, readCached, holePunchUnavailable } from '../../src/replica/native-file-ops.ts';
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

test('reads from the page cache: all of a cached range, none of one evicted (the disk file read still gives it), a short read at the end, EBADF for a closed file', async (t) => {
  const file = path.join(tempDir(t), 'f');
  const data = pattern(9, 256 * KiB);
  fs.writeFileSync(file, data);
  const fd = fs.openSync(file, 'r+');
  const out = Buffer.alloc(64 * KiB);
  try {
    assert.equal(readCached(fd, file, out, 0, 64 * KiB, 64 * KiB), 64 * KiB);
    assert.deepEqual(out, data.subarray(64 * KiB, 128 * KiB));
    assert.equal(readCached(fd, file, out, 4096, 8192, 256 * KiB - 4096), 4096, 'short at the end of the file');
    assert.equal(readCached(fd, file, out, 0, 4096, 300 * KiB), 0, 'nothing beyond the end');
    assert.throws(() => readCached(fd, file, out, 60 * KiB, 8 * KiB, 0), /within the buffer/);

    // Evicted (written back, then dropped from the cache by dd's nocache): nothing from the cache,
    // and the DiskFile read (which falls back to the thread pool) returns the bytes.
    fs.fsyncSync(fd);
    const dd = spawnSync('dd', [`if=${file}`, 'iflag=nocache', 'count=0', 'status=none']);
    assert.equal(dd.status, 0, dd.stderr?.toString());
    const got = readCached(fd, file, out, 0, 64 * KiB, 0);
    assert.ok(got < 64 * KiB, `evicted, yet ${got} bytes came from the cache`);
    const disk = await new NodeDisk().open(file, 'read');
    const back = Buffer.alloc(256 * KiB);
    assert.equal(await disk.read(back, 0, 256 * KiB, 0), 256 * KiB);
    assert.deepEqual(back, data);
    const small = Buffer.alloc(4096);
    assert.equal(await disk.read(small, 0, 4096, 200 * KiB), 4096);
    assert.deepEqual(small, data.subarray(200 * KiB, 200 * KiB + 4096));
    await disk.close();
  } finally {
    fs.closeSync(fd);
  }
  assert.throws(() => readCached(fd, file, out, 0, 4096, 0), (err: NodeJS.ErrnoException) => err.code === 'EBADF');
});
