/**
 * The replica's write-intent log (src/replica/intent-log.ts), in process: activation durable
 * before the data write, lazy leave only with the engine's confirmation, pins, OPEN, missed-write
 * maps across reopen, tree ops dropping maps, batching of activations, torn slots, EIO on the
 * log, replicas of the previous format, writeEpoch.
 */
import '../support/intent-idle-zero.ts';
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { createHash } from 'node:crypto';
import { crc32 } from 'node:zlib';
import { Replica } from '../../src/replica/replica.ts';
import { NodeDisk, type Disk, type DiskFile, type OpenMode } from '../../src/replica/disk.ts';
import { FaultyDisk } from '../../src/replica/faulty-disk.ts';
import { PowerLossDisk } from '../../src/replica/power-loss-disk.ts';
import { INTENT_REGION_BYTES, INTENT_SLOTS, IntentLog, decodeIntentRecord } from '../../src/replica/intent-log.ts';
import { JOURNAL_SLOTS, decodeRecord } from '../../src/replica/journal.ts';
import { ErrorCode, ZebuError } from '../../src/errors.ts';
import { pattern } from '../support/tmp.ts';
import os from 'node:os';

const MiB = 1024 * 1024;
const R = INTENT_REGION_BYTES;
const SIZE = 16 * R;

/** A disk that logs what reaches it, so tests can check the order of writes and syncs. */
class LoggingDisk implements Disk {
  readonly events: string[] = [];
  private readonly inner: Disk;
  /** While set, data-file writes wait for it. */
  dataGate: Promise<void> | null = null;
  /** While set, syncs of the write-intent log wait for it (taken when the sync begins). */
  intentGate: Promise<void> | null = null;
  constructor(inner: Disk) {
    this.inner = inner;
  }
  async open(filePath: string, mode: OpenMode): Promise<DiskFile> {
    const file = await this.inner.open(filePath, mode);
    const name = path.basename(filePath);
    const events = this.events;
    const self = this;
    return {
      path: file.path,
      read: (b, o, l, p) => file.read(b, o, l, p),
      punchHole: (o, l) => file.punchHole(o, l),
      async write(b, o, l, p) {
        if (name.endsWith('.data') && self.dataGate !== null) await self.dataGate;
        events.push(`write ${name}`);
        return file.write(b, o, l, p);
      },
      async datasync() {
        const gate = name.startsWith('intent.') ? self.intentGate : null;
        if (gate !== null) await gate;
        await file.datasync();
        events.push(`sync ${name}`);
      },
      truncate: (s) => file.truncate(s),
      sizeBytes: () => file.sizeBytes(),
      close: () => file.close(),
    };
  }
  readFile(p: string): Promise<Buffer> {
    return this.inner.readFile(p);
  }
  writeFileAtomic(p: string, d: Buffer): Promise<void> {
    return this.inner.writeFileAtomic(p, d);
  }
  unlink(p: string): Promise<void> {
    return this.inner.unlink(p);
  }
  exists(p: string): Promise<boolean> {
    return this.inner.exists(p);
  }
  readdir(p: string): Promise<string[]> {
    return this.inner.readdir(p);
  }
  mkdir(p: string): Promise<void> {
    return this.inner.mkdir(p);
  }
  syncDir(p: string): Promise<void> {
    return this.inner.syncDir(p);
  }
}

/**
 * A fresh directory `r` in a temporary root; when the test ends the replicas handed to
 * `closeAtEnd` are closed first, then the root is removed.
 */
function scratch(t: { after: (fn: () => void | Promise<void>) => void }): { dir: string; closeAtEnd: (r: Replica) => void } {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'zebu-intent-'));
  const replicas: Replica[] = [];
  t.after(async () => {
    for (const r of replicas) await r.close().catch(() => {});
    fs.rmSync(root, { recursive: true, force: true });
  });
  return { dir: path.join(root, 'r'), closeAtEnd: (r) => replicas.push(r) };
}

function intentSyncs(events: string[]): number {
  return events.filter((e) => e.startsWith('sync intent.')).length;
}

/** The engine's side of a flush: number it, say what is confirmed, run it. */
async function engineFlush(replica: Replica, seq: number, confirmed: number): Promise<void> {
  replica.flushArrived(seq, confirmed);
  await replica.flush();
}

function isZebu(code: ErrorCode): (err: unknown) => boolean {
  return (err) => {
    assert.ok(err instanceof ZebuError, String(err));
    assert.equal(err.code, code, err.message);
    return true;
  };
}

test('activation is durable before the data write; a crash in between leaves the region active', async (t) => {
  const { dir, closeAtEnd } = scratch(t);
  const disk = new LoggingDisk(new NodeDisk());
  const replica = await Replica.create(dir, { sizeBytes: SIZE, disk });
  disk.events.length = 0;
  await replica.write(3 * R + 4096, pattern(1, 8192));
  const syncAt = disk.events.indexOf('sync intent.1');
  const writeAt = disk.events.findIndex((e) => e.endsWith('.data'));
  assert.ok(syncAt >= 0 && writeAt > syncAt, `intent synced before the data write: ${disk.events.join(', ')}`);
  assert.deepEqual(replica.intentGet().active, [3]);
  assert.equal(replica.info().activeRegions, 1);

  // A second write to the same region needs no record.
  const before = intentSyncs(disk.events);
  await replica.write(3 * R + 65536, pattern(2, 4096));
  assert.equal(intentSyncs(disk.events), before);

  // Crash while the data write of a new region is held: the region is active on reopen.
  let open!: () => void;
  disk.dataGate = new Promise((resolve) => (open = resolve));
  const held = replica.write(9 * R, pattern(3, 4096));
  while (intentSyncs(disk.events) === before) await new Promise((r) => setTimeout(r, 1));
  await replica.abandon();
  open();
  await held.catch(() => {});
  const reopened = await Replica.open(dir);
  closeAtEnd(reopened);
  assert.deepEqual(reopened.intentGet().active, [3, 9]);
});

test('overlapping writes apply in arrival order when a later one finds its region recorded while an earlier one waits for the record', async (t) => {
  const { dir, closeAtEnd } = scratch(t);
  const disk = new LoggingDisk(new NodeDisk());
  const replica = await Replica.create(dir, { sizeBytes: SIZE, disk });
  closeAtEnd(replica);
  let openFirst!: () => void;
  disk.intentGate = new Promise<void>((resolve) => (openFirst = resolve));
  // A record naming region 5 is being written (held at its sync)...
  const first = replica.write(5 * R, pattern(10, 4096));
  for (let i = 0; i < 100 && !disk.events.some((e) => e.startsWith('write intent.')); i++) await new Promise((resolve) => setTimeout(resolve, 5));
  // ...when a write to the region arrives: it waits for the next record.
  const earlier = replica.write(5 * R + 8192, pattern(18, 4096));
  let openSecond!: () => void;
  disk.intentGate = new Promise<void>((resolve) => (openSecond = resolve));
  openFirst();
  await first;
  // The region is recorded now (the next record is held): a later write to the same block needs
  // no record, but must not overtake the earlier one.
  const later = replica.write(5 * R + 8192, pattern(32, 4096));
  await new Promise((resolve) => setTimeout(resolve, 50));
  openSecond();
  await Promise.all([earlier, later]);
  const back = Buffer.alloc(4096);
  await replica.read(5 * R + 8192, 4096, back);
  assert.ok(back.equals(pattern(32, 4096)), 'the later write is what the block holds');
});

test('activation survives a power failure right after the write is acknowledged (unflushed)', async (t) => {
  const { dir, closeAtEnd } = scratch(t);
  const disk = new PowerLossDisk(new NodeDisk());
  const replica = await Replica.create(dir, { sizeBytes: SIZE, disk });
  await replica.write(5 * R, pattern(1, 4096));
  await replica.write(6 * R - 4096, pattern(2, 8192)); // spans regions 5 and 6
  disk.powerFail(7, 'drop');
  await replica.abandon();
  const reopened = await Replica.open(dir);
  closeAtEnd(reopened);
  assert.deepEqual(reopened.intentGet().active, [5, 6]);
});

test('a region leaves only at a FLUSH confirming a flush that arrived after its last write; removal reaches disk lazily', async (t) => {
  const { dir, closeAtEnd } = scratch(t);
  const replica = await Replica.create(dir, { sizeBytes: SIZE, disk: new NodeDisk() });
  await replica.write(0, pattern(1, 4096));
  await replica.write(2 * R, pattern(2, 4096));
  await engineFlush(replica, 1, 0);
  assert.deepEqual(replica.intentGet().active, [0, 2]);
  // Written after FLUSH 1 arrived: flush 1 does not cover it.
  await replica.write(2 * R + 4096, pattern(3, 4096));
  // Unnumbered flushes and confirmations of nothing change nothing.
  await engineFlush(replica, 0, 0);
  await engineFlush(replica, 2, 0);
  assert.deepEqual(replica.intentGet().active, [0, 2]);
  await engineFlush(replica, 3, 1);
  assert.deepEqual(replica.intentGet().active, [2], 'region 0 confirmed by flush 1; region 2 needs flush 2');
  // Not yet on disk: a crash now still reports region 0 (the disk holds a superset).
  const onDisk = (): number[] => {
    const records = INTENT_SLOTS.map((s) => decodeIntentRecord(fs.readFileSync(path.join(dir, s)))).filter((r) => r !== null);
    records.sort((a, b) => b.seq - a.seq);
    return records[0].active;
  };
  assert.deepEqual(onDisk(), [0, 2]);
  await engineFlush(replica, 4, 2);
  assert.deepEqual(replica.intentGet().active, []);
  assert.equal(replica.info().activeRegions, 0);
  // The lazy write follows within a few hundred ms.
  const deadline = Date.now() + 3000;
  while (onDisk().length > 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
  assert.deepEqual(onDisk(), []);
  // Written again: active again, durably.
  await replica.write(0, pattern(4, 4096));
  assert.deepEqual(onDisk(), [0]);
  await replica.close();
});

test('a write in flight keeps its region active whatever is confirmed', async (t) => {
  const { dir, closeAtEnd } = scratch(t);
  const disk = new LoggingDisk(new NodeDisk());
  const replica = await Replica.create(dir, { sizeBytes: SIZE, disk });
  closeAtEnd(replica);
  await replica.write(R, pattern(1, 4096));
  await engineFlush(replica, 1, 0);
  let open!: () => void;
  disk.dataGate = new Promise((resolve) => (open = resolve));
  const held = replica.write(R + 8192, pattern(2, 4096));
  replica.flushArrived(2, 1);
  assert.deepEqual(replica.intentGet().active, [1]);
  disk.dataGate = null;
  open();
  await held;
  await engineFlush(replica, 3, 2);
  assert.deepEqual(replica.intentGet().active, [1], 'completed after flush 2 arrived: needs flush 3 confirmed');
  await engineFlush(replica, 4, 3);
  assert.deepEqual(replica.intentGet().active, []);
});

test('a failed write pins its region until the next OPEN; OPEN restarts the numbering', async (t) => {
  const { dir, closeAtEnd } = scratch(t);
  const disk = new FaultyDisk(new NodeDisk());
  const replica = await Replica.create(dir, { sizeBytes: SIZE, disk });
  closeAtEnd(replica);
  await replica.write(4 * R, pattern(1, 4096));
  disk.addRule({ op: 'write', errno: 'EIO', pathIncludes: '.data', count: 1 });
  await assert.rejects(replica.write(7 * R, pattern(2, 4096)), isZebu(ErrorCode.EIO));
  disk.clearRules();
  await engineFlush(replica, 1, 0);
  await engineFlush(replica, 2, 1);
  assert.deepEqual(replica.intentGet(), { regionBytes: R, active: [7], pinned: [7], missed: {}, invalidMissed: [] });

  // A new engine: its flush numbers start at 1 again; pins become ordinary active regions.
  await replica.write(4 * R, pattern(3, 4096));
  replica.engineOpened();
  assert.deepEqual(replica.intentGet().pinned, []);
  await engineFlush(replica, 1, 0);
  assert.deepEqual(replica.intentGet().active, [4, 7]);
  await engineFlush(replica, 2, 1);
  assert.deepEqual(replica.intentGet().active, []);
});

test('missed-write maps: start with the active set, grow with activations, survive reopen, drop and prune', async (t) => {
  const { dir, closeAtEnd } = scratch(t);
  let replica = await Replica.create(dir, { sizeBytes: SIZE, disk: new NodeDisk() });
  await replica.write(1 * R, pattern(1, 4096));
  await replica.missedStart('replica-b');
  assert.deepEqual(replica.missedGet('replica-b'), [1]);
  await replica.write(8 * R, pattern(2, 4096));
  await replica.write(1 * R + 4096, pattern(3, 4096));
  assert.deepEqual(replica.missedGet('replica-b'), [1, 8]);
  // Regions leaving the active set stay in the map.
  await engineFlush(replica, 1, 0);
  await engineFlush(replica, 2, 1);
  assert.deepEqual(replica.intentGet().active, []);
  await replica.write(12 * R, pattern(4, 4096));
  await replica.missedStart('127.0.0.1:7001');
  await replica.missedStart('replica-b'); // idempotent: kept, extended
  assert.deepEqual(replica.missedGet('replica-b'), [1, 8, 12]);
  assert.deepEqual(replica.missedGet('127.0.0.1:7001'), [12]);
  assert.throws(() => replica.missedGet('nobody'), isZebu(ErrorCode.NOT_FOUND));
  assert.deepEqual(replica.intentGet().missed, { 'replica-b': 3, '127.0.0.1:7001': 1 });

  // Across a crash (no clean close).
  await replica.abandon();
  replica = await Replica.open(dir);
  assert.deepEqual(replica.missedGet('replica-b'), [1, 8, 12]);
  assert.deepEqual(replica.missedGet('127.0.0.1:7001'), [12]);
  await replica.missedStart('c');
  await replica.missedPrune(['replica-b', 'c']);
  assert.deepEqual(Object.keys(replica.intentGet().missed).sort(), ['c', 'replica-b']);
  await replica.missedDrop('replica-b');
  await replica.close();
  replica = await Replica.open(dir);
  closeAtEnd(replica);
  assert.deepEqual(Object.keys(replica.intentGet().missed), ['c']);
});

test('snapshot create, delete and revert invalidate every missed-write map; expand keeps them', async (t) => {
  const { dir, closeAtEnd } = scratch(t);
  let replica = await Replica.create(dir, { sizeBytes: SIZE, disk: new NodeDisk() });
  await replica.write(0, pattern(1, 4096));
  await replica.missedStart('b');
  await replica.expand(SIZE * 2);
  assert.deepEqual(replica.missedGet('b'), [0]);
  await replica.write(SIZE + R, pattern(2, 4096)); // a region of the new space
  assert.deepEqual(replica.missedGet('b'), [0, 17]);

  const invalidated = (): void => {
    assert.deepEqual(replica.intentGet().missed, {});
    assert.deepEqual(replica.intentGet().invalidMissed, ['b']);
    assert.throws(() => replica.missedGet('b'), (err: ZebuError) => err.code === ErrorCode.CONFLICT);
  };
  await replica.snapshotCreate('s1');
  invalidated();
  // An invalid map stays invalid: a later MISSED_START or merge does not make a delta possible.
  await replica.missedStart('b');
  await replica.missedMerge('b', [3], false);
  invalidated();
  await replica.missedDrop('b');
  assert.deepEqual(replica.intentGet().invalidMissed, []);
  await replica.missedStart('b');
  await replica.snapshotCreate('s2');
  invalidated();
  await replica.missedDrop('b');
  await replica.missedStart('b');
  await replica.snapshotDelete('s1');
  invalidated();
  await replica.missedDrop('b');
  await replica.missedStart('b');
  await replica.snapshotRevert('s2');
  invalidated();
  // Durably so.
  await replica.abandon();
  replica = await Replica.open(dir);
  closeAtEnd(replica);
  invalidated();
  await replica.missedPrune([]);
  assert.deepEqual(replica.intentGet().invalidMissed, []);
});

test('missedMerge hands a map over: regions added to the active set, or the map marked invalid, durably', async (t) => {
  const { dir, closeAtEnd } = scratch(t);
  let replica = await Replica.create(dir, { sizeBytes: SIZE, disk: new NodeDisk() });
  await replica.write(2 * R, pattern(1, 4096));
  await replica.missedMerge('b', [5, 7], false);
  await replica.missedMerge('c', [], true);
  await assert.rejects(replica.missedMerge('d', [SIZE / R], false), (err: ZebuError) => err.code === ErrorCode.EINVAL);
  await replica.abandon();
  replica = await Replica.open(dir);
  closeAtEnd(replica);
  assert.deepEqual(replica.missedGet('b'), [2, 5, 7]);
  assert.deepEqual(replica.intentGet().invalidMissed, ['c']);
  assert.throws(() => replica.missedGet('d'), (err: ZebuError) => err.code === ErrorCode.NOT_FOUND);
});

test('missedClear: copied regions leave a map, durably; one active here stays; copy writes stay out of the log', async (t) => {
  const { dir, closeAtEnd } = scratch(t);
  let replica = await Replica.create(dir, { sizeBytes: SIZE, disk: new NodeDisk() });
  await replica.missedMerge('b', [1, 2, 3, 4], false);
  // Region 3 is written here and not yet confirmed: the target may miss that write.
  await replica.write(3 * R, pattern(1, 4096));
  await replica.missedClear('b', [1, 3, 4]);
  assert.deepEqual(replica.missedGet('b'), [2, 3]);
  // No map, an unknown key, or a region outside the volume.
  await replica.missedClear('nobody', [1]);
  await assert.rejects(replica.missedClear('b', [SIZE / R]), (err: ZebuError) => err.code === ErrorCode.EINVAL);
  // A rebuild's copy write is not logged (the maps say what is left to copy).
  await replica.copyWrite(1, 6 * R, pattern(2, 4096), 4096);
  await replica.copyWrite(2, 7 * R, null, R);
  assert.deepEqual(replica.intentGet().active, [3]);
  // The rebuild flushes the target before it clears a region from the maps.
  await replica.flush();
  await replica.abandon();
  replica = await Replica.open(dir);
  closeAtEnd(replica);
  assert.deepEqual(replica.missedGet('b'), [2, 3]);
  const back = Buffer.alloc(4096);
  await replica.read(6 * R, 4096, back);
  assert.deepEqual(back, pattern(2, 4096));
});

test('missedClear progress: a region copied in part is noted durably; a write to it, a merge or an active region make it whole again', async (t) => {
  const { dir, closeAtEnd } = scratch(t);
  let replica = await Replica.create(dir, { sizeBytes: SIZE, disk: new NodeDisk() });
  await replica.missedMerge('b', [1, 2, 3, 4, 5], false);
  // Region 3 is written here and not yet confirmed: a note for it would be wrong, so none is made.
  await replica.write(3 * R, pattern(1, 4096));
  await replica.missedClear('b', [1], [[2, 256 * 1024], [3, 512 * 1024], [4, R / 2], [9, 4096]]);
  assert.deepEqual(replica.missedGet('b'), [2, 3, 4, 5]);
  // Not in the map (9), active (3): no note. A note only grows.
  assert.deepEqual(replica.missedPartial('b'), [[2, 256 * 1024], [4, R / 2]]);
  await replica.missedClear('b', [], [[2, 128 * 1024], [5, 4096]]);
  assert.deepEqual(replica.missedPartial('b'), [[2, 256 * 1024], [4, R / 2], [5, 4096]]);
  // Bad notes are refused: not whole blocks, a whole region, a region outside the volume.
  for (const bad of [[[2, 1000]], [[2, R]], [[2, 0]], [[SIZE / R, 4096]]] as [number, number][][]) {
    await assert.rejects(replica.missedClear('b', [], bad), (err: ZebuError) => err.code === ErrorCode.EINVAL);
  }
  // Durable: after a crash the notes are there.
  await replica.abandon();
  replica = await Replica.open(dir);
  assert.deepEqual(replica.missedPartial('b'), [[2, 256 * 1024], [4, R / 2], [5, 4096]]);
  // A write to region 4 makes it whole (the copied front may miss it), durably before the write.
  await replica.write(4 * R + 4096, pattern(2, 4096));
  assert.deepEqual(replica.missedPartial('b'), [[2, 256 * 1024], [5, 4096]]);
  // A merge of region 5 makes it whole; a clear of region 2 drops its note with it.
  await replica.missedMerge('b', [5], false);
  await replica.missedClear('b', [2]);
  assert.deepEqual(replica.missedPartial('b'), []);
  await replica.missedClear('b', [], [[1, 4096], [5, 8192]]);
  assert.deepEqual(replica.missedPartial('b'), [[5, 8192]], 'region 1 left the map: no note');
  await replica.abandon();
  replica = await Replica.open(dir);
  closeAtEnd(replica);
  // Region 4 was active when the replica stopped: no note for it comes back, and none for 2.
  assert.deepEqual(replica.missedPartial('b'), [[5, 8192]]);
  assert.deepEqual(replica.missedGet('b'), [3, 4, 5]);
  // Drop takes the notes with the map.
  await replica.missedDrop('b');
  assert.deepEqual(replica.missedPartial('b'), []);
});

test('concurrent activations share record writes', async (t) => {
  const { dir, closeAtEnd } = scratch(t);
  const disk = new LoggingDisk(new NodeDisk());
  const replica = await Replica.create(dir, { sizeBytes: 64 * R, disk });
  closeAtEnd(replica);
  disk.events.length = 0;
  await Promise.all(Array.from({ length: 64 }, (_, i) => replica.write(i * R, pattern(i, 4096))));
  assert.equal(replica.intentGet().active.length, 64);
  assert.ok(intentSyncs(disk.events) <= 2, `64 activations took ${intentSyncs(disk.events)} record writes`);
});

test('a torn newest intent slot is ignored: the other slot wins; garbage in both reads as empty', async (t) => {
  const { dir, closeAtEnd } = scratch(t);
  let replica = await Replica.create(dir, { sizeBytes: SIZE, disk: new NodeDisk() });
  await replica.write(1 * R, pattern(1, 4096)); // record 1 -> intent.1
  await replica.write(2 * R, pattern(2, 4096)); // record 2 -> intent.0
  await replica.abandon();
  const newest = path.join(dir, 'intent.0');
  assert.deepEqual(decodeIntentRecord(fs.readFileSync(newest))?.active, [1, 2]);
  const bytes = fs.readFileSync(newest);
  fs.writeFileSync(newest, bytes.subarray(0, bytes.length - 3)); // torn tail
  replica = await Replica.open(dir);
  assert.deepEqual(replica.intentGet().active, [1]);
  // The next record goes to the slot after the surviving one, and wins from then on.
  await replica.write(3 * R, pattern(3, 4096));
  await replica.abandon();
  replica = await Replica.open(dir);
  assert.deepEqual(replica.intentGet().active, [1, 3]);
  await replica.abandon();
  for (const slot of INTENT_SLOTS) fs.writeFileSync(path.join(dir, slot), Buffer.from('not a record at all, not even close'));
  replica = await Replica.open(dir);
  closeAtEnd(replica);
  assert.deepEqual(replica.intentGet().active, []);
});

test('EIO on the intent file fails the write with EIO and the replica refuses further I/O until reopened', async (t) => {
  const { dir, closeAtEnd } = scratch(t);
  const disk = new FaultyDisk(new NodeDisk());
  let replica = await Replica.create(dir, { sizeBytes: SIZE, disk });
  await replica.write(0, pattern(1, 4096));
  await replica.flush();
  disk.addRule({ op: 'sync', errno: 'EIO', pathIncludes: 'intent.' });
  await assert.rejects(replica.write(5 * R, pattern(2, 4096)), isZebu(ErrorCode.EIO));
  // Even where no activation is needed, and reads, flushes: refused.
  await assert.rejects(replica.write(4096, pattern(3, 4096)), isZebu(ErrorCode.EIO));
  await assert.rejects(replica.read(0, 4096, Buffer.alloc(4096)), isZebu(ErrorCode.EIO));
  await assert.rejects(replica.flush(), isZebu(ErrorCode.EIO));
  await replica.close();
  disk.clearRules();
  replica = await Replica.open(dir, { disk });
  closeAtEnd(replica);
  const out = Buffer.alloc(4096);
  await replica.read(0, 4096, out);
  assert.ok(out.equals(pattern(1, 4096)));
  await replica.write(5 * R, pattern(2, 4096));
  assert.deepEqual(replica.intentGet().active, [0, 5]);
});

/** The journal record format before writeEpoch existed (a copy of the old encoder). */
function encodeOldJournalRecord(seq: number, revision: number, flushedRevision: number, clean: boolean): Buffer {
  const head = Buffer.from(JSON.stringify({ revision, flushedRevision, clean, pages: [] }));
  const bodyBytes = 4 + head.length;
  const buf = Buffer.alloc(24 + bodyBytes);
  buf.writeUInt32BE(0x5a4a4e4c, 0);
  buf.writeUInt32BE(0, 4);
  buf.writeUInt32BE(seq, 8);
  buf.writeUInt32BE(bodyBytes, 12);
  buf.writeUInt32BE(head.length, 24);
  head.copy(buf, 28);
  buf.writeUInt32BE(crc32(buf.subarray(24)), 16);
  buf.writeUInt32BE(crc32(buf.subarray(0, 20)), 20);
  return buf;
}

test('a replica of the previous format (no intent files, no writeEpoch) opens, keeps its data, gets a log', async (t) => {
  const { dir, closeAtEnd } = scratch(t);
  let replica = await Replica.create(dir, { sizeBytes: SIZE, disk: new NodeDisk() });
  await replica.write(R, pattern(9, 8192));
  await replica.close();
  // Make it look like the old software left it.
  for (const slot of INTENT_SLOTS) fs.rmSync(path.join(dir, slot));
  const records = JOURNAL_SLOTS.map((s) => decodeRecord(fs.readFileSync(path.join(dir, s))));
  const newest = records.filter((r) => r !== null).sort((a, b) => b.seq - a.seq)[0];
  assert.equal(newest.pages.length, 0, 'a clean close leaves a record without pages');
  fs.writeFileSync(path.join(dir, JOURNAL_SLOTS[newest.seq % 2]), encodeOldJournalRecord(newest.seq, newest.revision, newest.flushedRevision, true));
  assert.equal(decodeRecord(fs.readFileSync(path.join(dir, JOURNAL_SLOTS[newest.seq % 2])))?.writeEpoch, 0);

  replica = await Replica.open(dir);
  const info = replica.info();
  assert.equal(info.cleanShutdown, true);
  assert.equal(info.writeEpoch, 0);
  assert.equal(info.flushedRevision, newest.flushedRevision);
  assert.equal(info.intentRegionBytes, R);
  assert.deepEqual(replica.intentGet().active, []);
  const out = Buffer.alloc(8192);
  await replica.read(R, 8192, out);
  assert.ok(out.equals(pattern(9, 8192)));
  for (const slot of INTENT_SLOTS) assert.ok(fs.existsSync(path.join(dir, slot)), `${slot} created`);
  await replica.write(2 * R, pattern(1, 4096));
  await replica.abandon();
  replica = await Replica.open(dir);
  closeAtEnd(replica);
  assert.deepEqual(replica.intentGet().active, [2]);
});

test('writeEpoch: the epoch of the last journal record that advanced flushedRevision, persisted', async (t) => {
  const { dir, closeAtEnd } = scratch(t);
  let replica = await Replica.create(dir, { sizeBytes: SIZE, disk: new NodeDisk() });
  assert.equal(replica.info().writeEpoch, 0);
  await replica.checkEpoch(3);
  await replica.write(0, pattern(1, 4096));
  await replica.flush();
  assert.equal(replica.info().writeEpoch, 3);
  await replica.checkEpoch(5); // OPEN adopts the epoch but does not change writeEpoch
  await replica.flush();
  assert.equal(replica.info().writeEpoch, 3);
  await replica.abandon();
  replica = await Replica.open(dir);
  assert.equal(replica.info().writeEpoch, 3);
  assert.equal(replica.info().epoch, 5);
  await replica.write(0, pattern(2, 4096));
  await replica.flush();
  assert.equal(replica.info().writeEpoch, 5);
  await replica.close();
  replica = await Replica.open(dir);
  closeAtEnd(replica);
  assert.equal(replica.info().writeEpoch, 5);
});

test('regionHash is the SHA-256 of the bytes read through the chain; holes hash as zeros', async (t) => {
  const { dir, closeAtEnd } = scratch(t);
  const replica = await Replica.create(dir, { sizeBytes: SIZE, disk: new NodeDisk() });
  closeAtEnd(replica);
  const sha = (b: Buffer): string => createHash('sha256').update(b).digest('hex');
  assert.equal((await replica.regionHash(0, R)).toString('hex'), sha(Buffer.alloc(R)));
  await replica.write(R + 4096, pattern(1, 3 * MiB));
  await replica.snapshotCreate('s');
  await replica.write(R + 8192, pattern(2, 4096));
  const expect = Buffer.alloc(R);
  await replica.read(R, R, expect);
  assert.equal((await replica.regionHash(R, R)).toString('hex'), sha(expect));
  const big = Buffer.alloc(2 * R + 4096);
  await replica.read(R - 4096, big.length, big);
  assert.equal((await replica.regionHash(R - 4096, big.length)).toString('hex'), sha(big));
  await assert.rejects(replica.regionHash(SIZE - 4096, 8192), isZebu(ErrorCode.EINVAL));
});

test('intentLog: false (benchmark baseline) keeps no log at all', async (t) => {
  const { dir, closeAtEnd } = scratch(t);
  const replica = await Replica.create(dir, { sizeBytes: SIZE, disk: new NodeDisk(), intentLog: false });
  closeAtEnd(replica);
  await replica.write(0, pattern(1, 4096));
  assert.deepEqual(replica.intentGet().active, []);
  assert.equal(replica.info().activeRegions, 0);
  for (const slot of INTENT_SLOTS) assert.equal(fs.existsSync(path.join(dir, slot)), false);
  assert.throws(() => replica.missedGet('b'), isZebu(ErrorCode.NOT_FOUND));
});

test('a confirmed region stays until it has been idle for the idle time; an EVICT flush lets it go at once', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'zebu-intent-idle-'));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  const failures: unknown[] = [];
  const log = await IntentLog.open(dir, new NodeDisk(), (err) => failures.push(err), 150);
  t.after(() => log.close());
  const written = async (region: number): Promise<void> => {
    await log.enter(region * R, 4096);
    log.exit(region * R, 4096, true);
  };
  await written(1);
  await written(2);
  log.flushArrived(1, 0);
  log.flushArrived(2, 1); // confirms flush 1, which covers both writes: but they are not idle yet
  assert.deepEqual(log.summary().active, [1, 2]);
  log.flushArrived(3, 2, true); // the engine is at its bound: every confirmed region goes
  assert.deepEqual(log.summary().active, []);

  await written(3);
  log.flushArrived(4, 3);
  log.flushArrived(5, 4);
  assert.deepEqual(log.summary().active, [3], 'written just now: stays');
  await new Promise((resolve) => setTimeout(resolve, 200));
  log.flushArrived(6, 5);
  assert.deepEqual(log.summary().active, [], 'idle for longer than the idle time: leaves');
  assert.deepEqual(failures, []);
});

test('INTENT_RELEASE: released regions leave at once (on disk with the next record); one with a write in flight or pinned stays', async (t) => {
  const { dir, closeAtEnd } = scratch(t);
  const faulty = new FaultyDisk(new NodeDisk());
  const disk = new LoggingDisk(faulty);
  const replica = await Replica.create(dir, { sizeBytes: SIZE, disk });
  for (const region of [1, 2, 3]) await replica.write(region * R, pattern(region, 4096));
  // Region 5 pinned by a failed write; region 6 with a write in flight.
  faulty.addRule({ op: 'write', errno: 'EIO', pathIncludes: '.data', count: 1 });
  await assert.rejects(replica.write(5 * R, pattern(5, 4096)), isZebu(ErrorCode.EIO));
  faulty.clearRules();
  let open!: () => void;
  disk.dataGate = new Promise((resolve) => (open = resolve));
  const held = replica.write(6 * R, pattern(6, 4096));
  await new Promise((r) => setTimeout(r, 50));
  await replica.intentRelease([1, 2, 5, 6, 7]);
  assert.deepEqual(replica.intentGet().active, [3, 5, 6], 'released at once in memory; pinned and in flight stay; 7 was not active');
  disk.dataGate = null;
  open();
  await held;
  // On disk with the next record (lazily): a reopen sees the same.
  await new Promise((r) => setTimeout(r, 300));
  await replica.close();
  const again = await Replica.open(dir, { disk: new NodeDisk() });
  closeAtEnd(again);
  assert.deepEqual(again.intentGet().active, [3, 5, 6]);
});
