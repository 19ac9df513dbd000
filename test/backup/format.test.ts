/**
 * The backup format's own checks: blocks (compressed when it pays, stored as is when not, every
 * damage found by its header, its length or its hash), checksummed documents and manifests.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import { ZebuError, ErrorCode } from '../../src/errors.ts';
import {
  BACKUP_BLOCK_BYTES, BLOCK_HEADER_BYTES, CompressionMethod, decodeBlock, decodeDocument, decodeManifest, encodeBlock, encodeDocument, encodeManifest,
  isAllZero, sha256, type Manifest,
} from '../../src/backup/format.ts';

const MiB = 1024 * 1024;

function eio(pattern: RegExp): (err: unknown) => boolean {
  return (err) => err instanceof ZebuError && err.code === ErrorCode.EIO && pattern.test(err.message);
}

test('blocks: text compresses, random bytes are stored as is; both decode to the same bytes', async () => {
  const text = Buffer.from('the quick brown fox jumps over the lazy dog\n'.repeat(Math.ceil((2 * MiB) / 44))).subarray(0, 2 * MiB);
  const random = crypto.randomBytes(2 * MiB);
  const half = Buffer.concat([crypto.randomBytes(MiB), Buffer.alloc(MiB, 3)]);
  for (const [data, compressed] of [[text, true], [random, false], [half, true]] as const) {
    const hash = sha256(data);
    const stored = await encodeBlock(data, hash, CompressionMethod.ZSTD);
    assert.equal(stored.readUInt8(5), compressed ? CompressionMethod.ZSTD : CompressionMethod.NONE);
    if (compressed) assert.ok(stored.length < data.length * 0.8, `compressed to ${stored.length}`);
    assert.ok((await decodeBlock(stored, hash)).equals(data));
  }
  // method none: never compressed
  const stored = await encodeBlock(text, sha256(text), CompressionMethod.NONE);
  assert.equal(stored.length, BLOCK_HEADER_BYTES + text.length);
});

test('blocks: every kind of damage is EIO naming the block', async () => {
  const data = Buffer.from('x'.repeat(BACKUP_BLOCK_BYTES));
  const hash = sha256(data);
  const good = await encodeBlock(data, hash, CompressionMethod.ZSTD);
  await assert.rejects(decodeBlock(Buffer.alloc(10), hash), eio(new RegExp(`block ${hash} is corrupt: no block header`)));
  await assert.rejects(decodeBlock(good, sha256(Buffer.from('other'))), eio(/names another block/));
  const flipped = Buffer.from(good);
  flipped[flipped.length - 3] ^= 0x40;
  await assert.rejects(decodeBlock(flipped, hash), eio(/cannot decompress|does not match|bytes, the header says/));
  await assert.rejects(decodeBlock(good.subarray(0, good.length - 5), hash), eio(/corrupt/));
  const rawStored = await encodeBlock(data, hash, CompressionMethod.NONE);
  const rawFlipped = Buffer.from(rawStored);
  rawFlipped[BLOCK_HEADER_BYTES + 100] ^= 1;
  await assert.rejects(decodeBlock(rawFlipped, hash), eio(/does not match its SHA-256/));
  const method = Buffer.from(rawStored);
  method[5] = 9;
  await assert.rejects(decodeBlock(method, hash), eio(/unknown compression method 9/));
});

test('documents and manifests: a changed byte or a bad field is found', () => {
  const doc = encodeDocument({ a: 1, b: 'two' });
  assert.deepEqual(decodeDocument(doc, 'doc'), { a: 1, b: 'two' });
  const changed = Buffer.from(doc.toString().replace('two', 'tw0'));
  assert.throws(() => decodeDocument(changed, 'the doc'), eio(/the doc is damaged: its checksum does not match/));
  assert.throws(() => decodeDocument(Buffer.from('{}'), 'x'), eio(/not a checksummed document/));

  const m: Manifest = {
    format: 1, name: 'b', volume: 'v', sizeBytes: 8 * MiB, blockBytes: BACKUP_BLOCK_BYTES, snapshot: 's', createdAt: 'now', completedAt: 'now', labels: {},
    compression: 'zstd', base: null, stats: { readBytes: 0, uploadedBytes: 0, uploadedBlocks: 0, reusedBlocks: 0, blocks: 2 }, blocks: [[0, 'a'.repeat(64)], [3, 'b'.repeat(64)]],
  };
  assert.deepEqual(decodeManifest(encodeManifest(m), 'm'), m);
  for (const blocks of [[[4, 'a'.repeat(64)]], [[1, 'a'.repeat(64)], [1, 'b'.repeat(64)]], [[0, 'xyz']]] as [number, string][][]) {
    assert.throws(() => decodeManifest(encodeManifest({ ...m, blocks }), 'm'), eio(/block map entry/));
  }
  assert.throws(() => decodeManifest(encodeManifest({ ...m, blockBytes: 4096 }), 'm'), eio(/block size/));
});

test('all-zero detection', () => {
  assert.equal(isAllZero(Buffer.alloc(2 * MiB)), true);
  const b = Buffer.alloc(2 * MiB);
  b[2 * MiB - 1] = 1;
  assert.equal(isAllZero(b), false);
  b[2 * MiB - 1] = 0;
  b[70000] = 1;
  assert.equal(isAllZero(b), false);
});
