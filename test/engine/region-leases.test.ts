/**
 * Region leases without a process: the engine's claims (a lease gives way to client writes,
 * which go before a lease taken again) and the copier (one chunk per grant at least, release on
 * recall, replay from the committed offset after a revoke, a region revoked too often fails).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { RangeClaims } from '../../src/engine/rebuild.ts';
import { COPY_CHUNK_BYTES, copyRegionLeased, emptyLeaseCounters, type CopierHost } from '../../src/engine/leased-copy.ts';
import { ErrorCode, ZebuError } from '../../src/errors.ts';

const tick = (): Promise<void> => new Promise((resolve) => setImmediate(resolve));

test('a client write recalls the lease in its way, waits for its release, and goes before the lease is taken again', async () => {
  const claims = new RangeClaims();
  const recalls: number[] = [];
  const lease = await claims.claim(0, 1000, (id) => recalls.push(id));
  const ran: string[] = [];
  claims.whenRangeFree(2000, 10, () => ran.push('elsewhere'));
  claims.whenRangeFree(500, 10, () => ran.push('w1'));
  claims.whenRangeFree(505, 10, () => ran.push('w2'));
  await tick();
  assert.deepEqual(ran, ['elsewhere']);
  assert.deepEqual(recalls, [lease], 'recalled once, however many writes wait');
  assert.equal(claims.recalled(lease), true);
  // The copier asks again before giving the lease back: it must come after the waiting writes.
  let again = 0;
  const reacquired = claims.claim(0, 1000, () => {}).then((id) => (again = id));
  claims.release(lease);
  assert.deepEqual(ran, ['elsewhere', 'w1', 'w2']);
  assert.equal(claims.holds(lease), false);
  claims.release(lease); // again: nothing
  await reacquired;
  assert.ok(again > lease);
  assert.equal(claims.recalled(again), false);
});

test('a lease is granted only once the client writes to its range in flight are done', async () => {
  const claims = new RangeClaims();
  const token = claims.writeStarted(100, 50);
  let granted = false;
  const lease = claims.claim(0, 1000, () => {}).then((id) => {
    granted = true;
    return id;
  });
  await tick();
  assert.equal(granted, false);
  claims.writeDone(token);
  const id = await lease;
  assert.equal(granted, true);
  claims.release(id);
});

interface FakeTarget {
  writes: { lease: number; offset: number; zero: boolean }[];
  revokedLeases: Set<number>;
}

interface CopiedRegion {
  offset: number;
  length: number;
  /** Leases released when it was reported (the last one must still be held). */
  releasedBefore: number;
  acquiredBefore: number;
}

function fakeHost(options: { recallAfterWrites?: number; revokeOnWrite?: (n: number) => boolean; maxRetries?: number; extentsData?: boolean; busy?: boolean; dataBelow?: number }): { host: CopierHost; target: FakeTarget; acquired: [number, number][]; released: number[]; copied: CopiedRegion[]; chunks: number[]; turns: () => number } {
  const target: FakeTarget = { writes: [], revokedLeases: new Set() };
  const acquired: [number, number][] = [];
  const released: number[] = [];
  const copied: CopiedRegion[] = [];
  const chunks: number[] = [];
  let nextLease = 1;
  let turns = 0;
  let writeCount = 0;
  let wantedFrom = Infinity;
  const host: CopierHost = {
    acquireLease: async (start, end) => {
      acquired.push([start, end]);
      wantedFrom = Infinity;
      return nextLease++;
    },
    leaseWanted: () => writeCount >= wantedFrom,
    releaseLease: (id) => released.push(id),
    copyTurn: async () => {
      turns++;
      return () => {};
    },
    clientsBusy: () => options.busy === true,
    // Data where the source holds some: everywhere, or below `dataBelow` only.
    sourceExtents: async (_how, offset, length) => options.dataBelow === undefined || offset + length <= options.dataBelow || offset >= options.dataBelow
      ? [{ offset, length, data: (options.extentsData ?? true) && (options.dataBelow === undefined || offset < options.dataBelow) }]
      : [{ offset, length: options.dataBelow - offset, data: options.extentsData ?? true }, { offset: options.dataBelow, length: offset + length - options.dataBelow, data: false }],
    readSource: async (_offset, length) => Buffer.alloc(length, 7),
    writeTarget: async (lease, offset, data) => {
      writeCount++;
      if (options.recallAfterWrites !== undefined && wantedFrom === Infinity) wantedFrom = writeCount - 1 + options.recallAfterWrites;
      if (options.revokeOnWrite?.(writeCount) === true) target.revokedLeases.add(lease);
      if (target.revokedLeases.has(lease)) throw new ZebuError(ErrorCode.LEASE_REVOKED, `lease ${lease} was revoked`);
      target.writes.push({ lease, offset, zero: data === null });
    },
    check: () => {},
    pullChunk: null,
    regionCopied: (offset, length) => copied.push({ offset, length, releasedBefore: released.length, acquiredBefore: acquired.length }),
    chunkCopied: (end) => chunks.push(end),
    counters: emptyLeaseCounters(),
    maxRetries: options.maxRetries ?? 5,
    chunkBytes: COPY_CHUNK_BYTES,
  };
  return { host, target, acquired, released, copied, chunks, turns: () => turns };
}

test('the copier copies a region chunk by chunk under one lease when nobody recalls it', async () => {
  const { host, target, acquired, released, copied } = fakeHost({});
  const region = 4 * 1024 * 1024;
  const written = await copyRegionLeased(host, 0, region, { kind: 'status', zeroIfEmpty: false });
  assert.equal(written, region);
  assert.deepEqual(acquired, [[0, region]]);
  assert.deepEqual(released, [1]);
  assert.equal(target.writes.length, region / COPY_CHUNK_BYTES);
  assert.deepEqual(target.writes.map((w) => w.offset), Array.from({ length: region / COPY_CHUNK_BYTES }, (_, i) => i * COPY_CHUNK_BYTES));
  // Reported copied once, with its lease still held (no client write to it in between).
  assert.deepEqual(copied, [{ offset: 0, length: region, releasedBefore: 0, acquiredBefore: 1 }]);
});

test('clients busy: one chunk that wrote something per turn and lease; chunks with nothing to copy do not end a turn', async () => {
  const busy = fakeHost({ busy: true });
  const region = 4 * COPY_CHUNK_BYTES;
  assert.equal(await copyRegionLeased(busy.host, 0, region, { kind: 'status', zeroIfEmpty: false }), region);
  assert.equal(busy.turns(), 4, 'a turn per chunk (the engine rests between turns)');
  assert.deepEqual(busy.acquired, [[0, region], [COPY_CHUNK_BYTES, region], [2 * COPY_CHUNK_BYTES, region], [3 * COPY_CHUNK_BYTES, region]]);
  assert.deepEqual(busy.target.writes.map((w) => w.offset), [0, COPY_CHUNK_BYTES, 2 * COPY_CHUNK_BYTES, 3 * COPY_CHUNK_BYTES]);
  assert.deepEqual(busy.copied.map((c) => [c.offset, c.length]), [[0, region]]);

  // Data in the first chunk only: that chunk ends its turn, the three empty ones go in the next.
  const sparse = fakeHost({ busy: true, dataBelow: COPY_CHUNK_BYTES });
  assert.equal(await copyRegionLeased(sparse.host, 0, region, { kind: 'status', zeroIfEmpty: false }), COPY_CHUNK_BYTES);
  assert.equal(sparse.turns(), 2);
  assert.deepEqual(sparse.acquired, [[0, region], [COPY_CHUNK_BYTES, region]]);
  assert.deepEqual(sparse.copied.map((c) => [c.offset, c.length]), [[0, region]]);

  // Quiet clients: the whole region in one turn.
  const quiet = fakeHost({});
  await copyRegionLeased(quiet.host, 0, region, { kind: 'status', zeroIfEmpty: false });
  assert.equal(quiet.turns(), 1);
});

test('recalled: the copier gives the lease back after a chunk and continues from where it got', async () => {
  const { host, target, acquired, released, copied } = fakeHost({ recallAfterWrites: 1 });
  const region = 4 * COPY_CHUNK_BYTES;
  await copyRegionLeased(host, 0, region, { kind: 'status', zeroIfEmpty: false });
  // One chunk per grant; every lease covers only what is left.
  assert.deepEqual(acquired, [[0, region], [COPY_CHUNK_BYTES, region], [2 * COPY_CHUNK_BYTES, region], [3 * COPY_CHUNK_BYTES, region]]);
  assert.deepEqual(released, [1, 2, 3, 4]);
  // Reported under the last lease, not before the region is all there.
  assert.deepEqual(copied, [{ offset: 0, length: region, releasedBefore: 3, acquiredBefore: 4 }]);
  assert.deepEqual(target.writes.map((w) => [w.lease, w.offset]), [[1, 0], [2, COPY_CHUNK_BYTES], [3, 2 * COPY_CHUNK_BYTES], [4, 3 * COPY_CHUNK_BYTES]]);
  assert.equal(host.counters.grants, 4);
});

test('revoked: the copier replays from the committed offset; a region revoked too often fails the rebuild with its reason', async () => {
  const replay = fakeHost({ revokeOnWrite: (n) => n === 3 });
  const region = 4 * COPY_CHUNK_BYTES;
  await copyRegionLeased(replay.host, region, region, { kind: 'status', zeroIfEmpty: true });
  assert.deepEqual(replay.acquired, [[region, 2 * region], [region + 2 * COPY_CHUNK_BYTES, 2 * region]]);
  assert.deepEqual(replay.target.writes.map((w) => w.offset - region), [0, COPY_CHUNK_BYTES, 2 * COPY_CHUNK_BYTES, 3 * COPY_CHUNK_BYTES]);
  assert.equal(replay.host.counters.replays, 1);
  assert.deepEqual(replay.copied.map((c) => [c.offset, c.length]), [[region, region]]);
  // Progress is reported chunk by chunk, only for chunks on the target: the revoked write is not.
  assert.deepEqual(replay.chunks.map((end) => end - region), [COPY_CHUNK_BYTES, 2 * COPY_CHUNK_BYTES, 3 * COPY_CHUNK_BYTES]);

  const hopeless = fakeHost({ revokeOnWrite: () => true, maxRetries: 2 });
  await assert.rejects(copyRegionLeased(hopeless.host, 0, region, { kind: 'status', zeroIfEmpty: false }), (err: unknown) => {
    assert.ok(err instanceof ZebuError);
    assert.match(err.message, /region at offset 0 .*revoked 3 times.*gave up after 2 retries/);
    return true;
  });
  assert.equal(hopeless.released.length, 3, 'every lease is given back');
  assert.deepEqual(hopeless.copied, [], 'a region that failed is not reported copied');
});

test('a range the source holds nothing of is skipped, or zeroed when the target may hold something there', async () => {
  const skip = fakeHost({ extentsData: false });
  assert.equal(await copyRegionLeased(skip.host, 0, 2 * COPY_CHUNK_BYTES, { kind: 'status', zeroIfEmpty: false }), 0);
  assert.equal(skip.target.writes.length, 0);
  const zero = fakeHost({ extentsData: false });
  await copyRegionLeased(zero.host, 0, 2 * COPY_CHUNK_BYTES, { kind: 'status', zeroIfEmpty: true });
  assert.deepEqual(zero.target.writes.map((w) => w.zero), [true, true]);
});

test('a lease revoked while it still waited for client writes in flight reaches its holder already ended (found by the simulator)', async () => {
  const claims = new RangeClaims();
  const token = claims.writeStarted(0, 10);
  const recalls: number[] = [];
  const lease = claims.claim(0, 1000, (id) => recalls.push(id));
  let later = false;
  claims.whenRangeFree(5, 10, () => (later = true));
  await tick();
  assert.equal(recalls.length, 1, 'the waiting write recalled the lease not yet granted');
  claims.release(recalls[0]); // the engine revokes it
  const id = await lease;
  assert.equal(id, recalls[0]);
  assert.equal(claims.holds(id), false);
  assert.equal(later, true, 'the waiting write went');
  claims.writeDone(token);
});

test('ids go on from where the last claims object stopped: a lease id is never handed out twice (the target keeps revoked ids for the epoch)', async () => {
  const first = new RangeClaims();
  const a = await first.claim(0, 10);
  const b = await first.claim(20, 30);
  first.releaseAll();
  const second = new RangeClaims(first.nextId);
  const c = await second.claim(0, 10);
  assert.ok(c > a && c > b, `${c} after ${a}, ${b}`);
});
