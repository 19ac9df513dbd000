/** Backup blocks hashed on a worker thread give the same names as hashing them in place. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import { BlockHasher } from '../../src/backup/block-hasher.ts';

const KiB = 1024;
const hex = (b: Buffer): string => crypto.createHash('sha256').update(b).digest('hex');

test('blocks hashed on the worker, more at once than it has slots, match SHA-256; a caller may reuse its buffer once answered', async (t) => {
  const hasher = new BlockHasher(3, 64 * KiB);
  t.after(() => hasher.close());
  assert.equal(hasher.offThread, true);
  const blocks = Array.from({ length: 40 }, (_, i) => crypto.randomBytes(i === 0 ? 0 : 1 + ((i * 7919) % (64 * KiB))));
  const hashes = await Promise.all(blocks.map((b) => hasher.hash(b)));
  assert.deepEqual(hashes, blocks.map(hex));

  // One buffer reused for every block, as a backup's read buffers are.
  const buffer = Buffer.alloc(64 * KiB);
  for (let i = 0; i < 5; i++) {
    crypto.randomFillSync(buffer);
    assert.equal(await hasher.hash(buffer), hex(buffer));
  }
  // Larger than a slot: hashed in place, still right.
  const large = crypto.randomBytes(64 * KiB + 1);
  assert.equal(await hasher.hash(large), hex(large));
});

test('closing the hasher while blocks are in flight answers every one of them correctly', async () => {
  const hasher = new BlockHasher(2, 256 * KiB);
  const blocks = Array.from({ length: 12 }, () => crypto.randomBytes(256 * KiB));
  const hashing = blocks.map((b) => hasher.hash(b));
  await hasher.close();
  assert.equal(hasher.offThread, false);
  assert.deepEqual(await Promise.all(hashing), blocks.map(hex));
  const after = crypto.randomBytes(KiB);
  assert.equal(await hasher.hash(after), hex(after), 'after close, blocks are hashed in place');
});
