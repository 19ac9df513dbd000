/**
 * Block files written around the page cache: exact bytes and length whatever the size (aligned or
 * not, in parts), many at once through a few aligned buffers, and the page cache again when the
 * filesystem refuses O_DIRECT, with nothing left behind by the refused attempt.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { AlignedBuffers, DirectWriter, DIRECT_ALIGN, type OpenFile } from '../../src/backup/direct-write.ts';
import { tempDir } from '../support/tmp.ts';
import { assertInvariantFails } from '../support/assertions.ts';

const KiB = 1024;
const MiB = 1024 * KiB;

test('direct writes: every size lands with its exact bytes and length; small and huge files go through the page cache', async (t) => {
  const dir = tempDir(t, 'zb-direct-');
  const writer = new DirectWriter();
  const sizes = [100, 256 * KiB, 300 * KiB + 44, MiB, 2 * MiB + 44, 4 * MiB, 5 * MiB];
  for (const size of sizes) {
    const data = crypto.randomBytes(size);
    // In parts, as a block is written (header, then payload), split off the 4 KiB grid.
    const parts = [data.subarray(0, 44), data.subarray(44, size - 7), data.subarray(size - 7)];
    const file = path.join(dir, `f-${size}`);
    await writer.writeNew(file, parts, { datasync: true });
    const back = fs.readFileSync(file);
    assert.equal(back.length, size, `length of the ${size}-byte file`);
    assert.ok(back.equals(data), `bytes of the ${size}-byte file`);
  }
  // 256 KiB .. 4 MiB directly (the filesystem of the test directory takes O_DIRECT: ext4 or tmpfs).
  assert.equal(writer.usesDirect, true);
  assert.equal(writer.directFiles, 5);
  assert.equal(writer.bufferedFiles, 2);
  // An existing file is never overwritten.
  await assert.rejects(writer.writeNew(path.join(dir, `f-${MiB}`), [Buffer.alloc(MiB)]), { code: 'EEXIST' });
  assert.ok(fs.readFileSync(path.join(dir, `f-${MiB}`)).length === MiB);
});

test('direct writes: more files at once than aligned buffers all land intact', async (t) => {
  const dir = tempDir(t, 'zb-direct-many-');
  const writer = new DirectWriter();
  const blocks = Array.from({ length: 24 }, (_, i) => crypto.randomBytes(2 * MiB + 44 - i));
  await Promise.all(blocks.map((b, i) => writer.writeNew(path.join(dir, `b${i}`), [b])));
  blocks.forEach((b, i) => assert.ok(fs.readFileSync(path.join(dir, `b${i}`)).equals(b), `block ${i}`));
  assert.equal(writer.directFiles, 24);
});

test('aligned buffers: page-aligned views of one fixed memory; acquire waits for a release', async () => {
  const buffers = new AlignedBuffers(2, 5000);
  assert.equal(buffers.bytes, 2 * DIRECT_ALIGN);
  const a = await buffers.acquire();
  const b = await buffers.acquire();
  assert.equal(a.buffer, b.buffer);
  assert.equal(Math.abs(a.byteOffset - b.byteOffset) % DIRECT_ALIGN, 0);
  let third: Buffer | null = null;
  const waiting = buffers.acquire().then((buf) => (third = buf));
  await new Promise((resolve) => setImmediate(resolve));
  assert.equal(third, null, 'a third acquire waits while both are in use');
  buffers.release(a);
  await waiting;
  assert.equal(third, a);
  assertInvariantFails(() => buffers.release(Buffer.alloc(buffers.bytes)), /not acquired|released/);
});

test('direct writes: a filesystem that refuses O_DIRECT is written through the page cache, nothing left by the refusal', async (t) => {
  const dir = tempDir(t, 'zb-direct-refused-');
  const refusals: string[] = [];
  // Like a filesystem that creates the file and then refuses the flag.
  const open: OpenFile = async (file, flags, mode) => {
    if (typeof flags === 'number' && (flags & fs.constants.O_DIRECT) !== 0) {
      refusals.push(path.basename(file));
      fs.writeFileSync(file, '');
      throw Object.assign(new Error('EINVAL: invalid argument, open'), { code: 'EINVAL' });
    }
    return fsp.open(file, flags, mode);
  };
  const writer = new DirectWriter({ open });
  const first = crypto.randomBytes(2 * MiB + 44);
  await writer.writeNew(path.join(dir, 'first'), [first]);
  assert.ok(fs.readFileSync(path.join(dir, 'first')).equals(first));
  assert.equal(writer.usesDirect, false);
  // Not tried again.
  const second = crypto.randomBytes(MiB);
  await writer.writeNew(path.join(dir, 'second'), [second]);
  assert.ok(fs.readFileSync(path.join(dir, 'second')).equals(second));
  assert.deepEqual(refusals, ['first']);
  assert.deepEqual(fs.readdirSync(dir).sort(), ['first', 'second']);
});

test('direct writes: a failed write throws (not taken for a refusal); a missing directory is made again', async (t) => {
  const dir = tempDir(t, 'zb-direct-fail-');
  let failWrites = true;
  const open: OpenFile = async (file, flags, mode) => {
    const handle = await fsp.open(file, flags, mode);
    if (failWrites && typeof flags === 'number' && (flags & fs.constants.O_DIRECT) !== 0) {
      handle.write = (async () => {
        throw Object.assign(new Error('EIO: i/o error, write'), { code: 'EIO' });
      }) as typeof handle.write;
    }
    return handle;
  };
  const writer = new DirectWriter({ open });
  await assert.rejects(writer.writeNew(path.join(dir, 'x'), [crypto.randomBytes(MiB)]), { code: 'EIO' });
  assert.equal(writer.usesDirect, true, 'EIO is a failure, not a refusal of O_DIRECT');

  failWrites = false;
  const sub = path.join(dir, 'sub');
  let made = 0;
  const data = crypto.randomBytes(MiB + 3);
  await writer.writeNew(path.join(sub, 'y'), [data], {
    onMissingDir: async () => {
      made++;
      fs.mkdirSync(sub);
    },
  });
  assert.equal(made, 1);
  assert.ok(fs.readFileSync(path.join(sub, 'y')).equals(data));
});
