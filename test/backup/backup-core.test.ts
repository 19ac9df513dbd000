/**
 * The backup jobs against real replicas (snapshots read through SNAPSHOT_CHANGES and snapshot
 * reads) and real targets: a directory, and S3 (s3rver on 127.0.0.1 through @aws-sdk/client-s3).
 * Round trip byte for byte, incremental uploads, corrupt and missing blocks named at restore and
 * by verify, garbage collection (also against a backup running at the same time), retries of an
 * S3 server that fails, and a backup that crashed midway finished by a retry.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import crypto from 'node:crypto';
import { Replica } from '../../src/replica/replica.ts';
import { ZebuError, ErrorCode } from '../../src/errors.ts';
import { openTarget, parseTargetUrl, checkTarget, FileTarget } from '../../src/backup/target.ts';
import { BackupRepository } from '../../src/backup/repository.ts';
import { runBackup, type SnapshotReader } from '../../src/backup/backup-job.ts';
import { runRestore, type BlockWriter } from '../../src/backup/restore-job.ts';
import { runGc } from '../../src/backup/gc.ts';
import { verifyTarget } from '../../src/backup/verify-target.ts';
import { BACKUP_BLOCK_BYTES, blockKey, type Manifest } from '../../src/backup/format.ts';
import { tempDir } from '../support/tmp.ts';
import { startTestS3 } from '../support/s3-server.ts';
import { assertInvariantRejects } from '../support/assertions.ts';

const MiB = 1024 * 1024;
const SIZE = 40 * MiB;

function reader(replica: Replica): SnapshotReader {
  return {
    async readSnapshot(name, offset, length) {
      const out = Buffer.alloc(length);
      await replica.readSnapshot(name, offset, length, out);
      return out;
    },
    snapshotChanges: (name, base, offset, length) => replica.snapshotChanges(name, base, offset, length),
  };
}

function writer(replica: Replica): BlockWriter {
  return {
    write: (offset, data) => replica.write(offset, data),
    zero: (offset, length) => replica.zero(offset, length),
    flush: () => replica.flush(),
  };
}

async function readAll(replica: Replica, snapshot?: string): Promise<Buffer> {
  const out = Buffer.alloc(replica.sizeBytes);
  if (snapshot === undefined) await replica.read(0, out.length, out);
  else await replica.readSnapshot(snapshot, 0, out.length, out);
  return out;
}

/** A source replica with random data in most of it, zeros in some, and one repeated block. */
async function sourceVolume(root: string): Promise<Replica> {
  const replica = await Replica.create(path.join(root, 'source'), { sizeBytes: SIZE });
  await replica.write(0, crypto.randomBytes(20 * MiB));
  const same = crypto.randomBytes(2 * MiB);
  await replica.write(24 * MiB, same);
  await replica.write(28 * MiB, same); // the same block twice: stored once
  await replica.write(36 * MiB, Buffer.concat([crypto.randomBytes(MiB), Buffer.alloc(MiB, 7)]));
  return replica;
}

/** A directory target and a source replica (see sourceVolume) with snapshot s1. */
async function fileTargetWithSource(t: Parameters<typeof tempDir>[0], prefix: string): Promise<{ root: string; repo: BackupRepository; source: Replica }> {
  const root = tempDir(t, prefix);
  const repo = new BackupRepository(openTarget(`file://${path.join(root, 'target')}`));
  await repo.init();
  const source = await sourceVolume(root);
  t.after(() => source.abandon());
  await source.snapshotCreate('s1');
  return { root, repo, source };
}

/** The block files on a directory target (relative paths). */
function blockFilesOn(targetDir: string): string[] {
  const dir = path.join(targetDir, 'blocks');
  return fs.existsSync(dir) ? fs.readdirSync(dir, { recursive: true }).map(String).filter((f) => fs.statSync(path.join(dir, f)).isFile()) : [];
}

async function backup(repo: BackupRepository, replica: Replica, name: string, snapshot: string, base: Manifest | null, concurrency = 3): Promise<Manifest> {
  return runBackup({ repo, source: reader(replica), volume: 'vol', name, snapshot, sizeBytes: replica.sizeBytes, createdAt: new Date().toISOString(), labels: {}, compression: 'zstd', base, concurrency });
}

async function restoreInto(root: string, repo: BackupRepository, manifest: Manifest, name: string): Promise<Replica> {
  const replica = await Replica.create(path.join(root, name), { sizeBytes: manifest.sizeBytes });
  await runRestore({ repo, sink: writer(replica), manifest, applied: null, sizeBytes: manifest.sizeBytes, concurrency: 3 });
  return replica;
}

async function roundTrip(t: { after: (fn: () => unknown) => void }, root: string, repo: BackupRepository): Promise<{ source: Replica; b1: Manifest; b2: Manifest }> {
  await repo.init();
  const source = await sourceVolume(root);
  t.after(() => source.abandon());
  await source.snapshotCreate('s1');
  const b1 = await backup(repo, source, 'b1', 's1', null);
  assert.equal(b1.base, null);
  // 20 MiB random + one 2 MiB block twice + 1 random MiB with 1 MiB of 7s: 10 + 1 + 1 blocks stored.
  assert.equal(b1.stats.uploadedBlocks, 12);
  assert.equal(b1.blocks.length, 13);
  assert.equal(b1.stats.readBytes, 26 * MiB, 'blocks never written are not read');

  // About 1% of the volume changes: one 4 KiB write, a 300 KiB write and a trim of a 2 MiB block.
  await source.write(5 * MiB + 12345 - (12345 % 4096), crypto.randomBytes(4096));
  await source.write(33 * MiB, crypto.randomBytes(300 * 1024));
  await source.zero(24 * MiB, 2 * MiB);
  await source.snapshotCreate('s2');
  const b2 = await backup(repo, source, 'b2', 's2', b1);
  assert.equal(b2.base, 'b1');
  assert.equal(b2.stats.readBytes, 6 * MiB, 'only the three changed blocks are read');
  assert.equal(b2.stats.uploadedBlocks, 2, 'two blocks have new content; the trimmed one is dropped');
  assert.equal(b2.blocks.length, 13, 'one block more (33 MiB), one fewer (24 MiB)');

  for (const [m, snapshot] of [[b1, 's1'], [b2, 's2']] as const) {
    const restored = await restoreInto(root, repo, m, `restored-${m.name}`);
    t.after(() => restored.abandon());
    assert.ok((await readAll(restored)).equals(await readAll(source, snapshot)), `restore of ${m.name} equals snapshot ${snapshot}`);
  }
  return { source, b1, b2 };
}

test('file target: full and incremental backups restore byte for byte; corrupt and missing blocks are named; GC keeps what is referenced', async (t) => {
  const root = tempDir(t);
  const dir = path.join(root, 'target');
  const repo = new BackupRepository(openTarget(`file://${dir}`));
  assert.equal(await checkTarget(repo.target), null);
  const { source, b1, b2 } = await roundTrip(t, root, repo);
  assert.ok(fs.existsSync(path.join(dir, 'zebu-backupstore.json')));
  assert.ok(fs.existsSync(path.join(dir, 'volumes/vol/backups/b2.json')));
  assert.ok(!fs.existsSync(path.join(dir, 'volumes/vol/backups/b2.partial')), 'the partial manifest is gone once completed');

  // Verify: all good; then corrupt one block and delete another.
  let report = await verifyTarget(repo);
  assert.equal(report.missingBlocks + report.corruptBlocks, 0);
  assert.equal(report.blocksChecked, 14);
  const [corruptIndex, corruptHash] = b2.blocks[0];
  const corruptFile = path.join(dir, blockKey(corruptHash));
  const bytes = fs.readFileSync(corruptFile);
  bytes[bytes.length - 10] ^= 0xff;
  fs.writeFileSync(corruptFile, bytes);
  const [missingIndex, missingHash] = b2.blocks[b2.blocks.length - 1];
  fs.rmSync(path.join(dir, blockKey(missingHash)));
  report = await verifyTarget(repo);
  assert.equal(report.corruptBlocks, 1);
  assert.equal(report.missingBlocks, 1);
  const ofB2 = report.backups.find((b) => b.backup === 'b2')!;
  assert.deepEqual(ofB2.problems.map((p) => [p.hash, p.offset, p.problem]).sort(), [[corruptHash, corruptIndex * BACKUP_BLOCK_BYTES, 'corrupt'], [missingHash, missingIndex * BACKUP_BLOCK_BYTES, 'missing']].sort());
  const broken = await Replica.create(path.join(root, 'broken'), { sizeBytes: SIZE });
  t.after(() => broken.abandon());
  await assert.rejects(
    runRestore({ repo, sink: writer(broken), manifest: b2, applied: null, sizeBytes: SIZE, concurrency: 1 }),
    (err) => err instanceof ZebuError && err.code === ErrorCode.EIO && /backup b2 of volume vol/.test(err.message) && (err.message.includes(corruptHash) || err.message.includes(missingHash)),
  );
  // A fresh backup of the same data heals nothing by itself (the index says the blocks exist);
  // repairing the target: put the good blocks back from a backup of the source.
  fs.writeFileSync(corruptFile, Buffer.from(bytes.map((b, i) => (i === bytes.length - 10 ? b ^ 0xff : b))));
  fs.rmSync(path.join(dir, 'volumes/vol/backups/b2.json'));
  const b2again = await backup(new BackupRepository(openTarget(`file://${dir}`)), source, 'b2', 's2', null);
  assert.equal(b2again.stats.uploadedBlocks >= 1, true, 'a repository without the index uploads what it does not know');

  // GC: delete b1; blocks only b1 had go, b2 still restores.
  const gcRepo = new BackupRepository(openTarget(`file://${dir}`));
  assert.equal(await gcRepo.deleteBackup('vol', 'b1'), true);
  assert.equal(await gcRepo.deleteBackup('vol', 'b1'), false, 'deleting twice is harmless');
  const onlyB1 = new Set(b1.blocks.map(([, h]) => h));
  for (const [, h] of b2again.blocks) onlyB1.delete(h);
  const gc = await runGc(gcRepo);
  assert.equal(gc.tombstones, 1);
  assert.equal(gc.removedBlocks, onlyB1.size);
  for (const h of onlyB1) assert.ok(!fs.existsSync(path.join(dir, blockKey(h))));
  assert.equal((await runGc(gcRepo)).tombstones, 0, 'the tombstone is gone');
  const after = await verifyTarget(gcRepo);
  assert.equal(after.missingBlocks + after.corruptBlocks, 0);
  assert.deepEqual(after.backups.map((b) => b.backup), ['b2']);
  const restored = await restoreInto(root, gcRepo, b2again, 'after-gc');
  t.after(() => restored.abandon());
  assert.ok((await readAll(restored)).equals(await readAll(source, 's2')));
});

test('GC during a backup: a block the backup relies on is never removed', async (t) => {
  const root = tempDir(t);
  const repo = new BackupRepository(openTarget(`file://${path.join(root, 'target')}`));
  await repo.init();
  const source = await sourceVolume(root);
  t.after(() => source.abandon());
  await source.snapshotCreate('s1');
  const b1 = await backup(repo, source, 'b1', 's1', null);
  repo.learn(b1);
  await source.write(0, crypto.randomBytes(4096));
  await source.snapshotCreate('s2');
  // b2 carries over b1's blocks; b1 is deleted and collected while b2 runs (its reads slowed down).
  const slow = reader(source);
  let gcDone: Promise<unknown> | null = null;
  const slowed: SnapshotReader = {
    snapshotChanges: slow.snapshotChanges,
    async readSnapshot(name, offset, length) {
      if (gcDone === null) {
        gcDone = repo.deleteBackup('vol', 'b1').then(() => runGc(repo));
        await gcDone;
      }
      return slow.readSnapshot(name, offset, length);
    },
  };
  const b2 = await runBackup({ repo, source: slowed, volume: 'vol', name: 'b2', snapshot: 's2', sizeBytes: SIZE, createdAt: new Date().toISOString(), labels: {}, compression: 'zstd', base: b1, concurrency: 2 });
  const gc = (await gcDone!) as { keptClaimed: number; removedBlocks: number };
  assert.ok(gc.keptClaimed >= 11, `claimed blocks kept (${gc.keptClaimed})`);
  const report = await verifyTarget(repo);
  assert.equal(report.missingBlocks, 0, JSON.stringify(report.backups));
  const restored = await restoreInto(root, repo, b2, 'r2');
  t.after(() => restored.abandon());
  assert.ok((await readAll(restored)).equals(await readAll(source, 's2')));
  // The tombstone waited for the next collection, which removes only the block b2 replaced.
  const second = await runGc(repo);
  assert.equal(second.tombstones, 1);
  assert.equal(second.removedBlocks, 1);
  assert.equal((await verifyTarget(repo)).missingBlocks, 0);
});

test('GC killed midway (a delete fails): nothing referenced is lost and a second run finishes the job', async (t) => {
  const root = tempDir(t);
  const dir = path.join(root, 'target');
  const target = openTarget(`file://${dir}`);
  const repo = new BackupRepository(target);
  await repo.init();
  const source = await sourceVolume(root);
  t.after(() => source.abandon());
  await source.snapshotCreate('s1');
  const b1 = await backup(repo, source, 'b1', 's1', null);
  await source.write(0, crypto.randomBytes(8 * MiB));
  await source.snapshotCreate('s2');
  const b2 = await backup(repo, source, 'b2', 's2', b1);
  await repo.deleteBackup('vol', 'b1');
  const onlyB1 = [...new Set(b1.blocks.map(([, h]) => h))].filter((h) => !b2.blocks.some(([, x]) => x === h));
  assert.ok(onlyB1.length >= 4);
  // The third block delete fails, as a crash there would stop the run.
  const realDelete = target.delete.bind(target);
  let deletes = 0;
  target.delete = async (key: string) => {
    if (key.startsWith('blocks/') && ++deletes === 3) throw new ZebuError(ErrorCode.EIO, 'injected: the process died here');
    return realDelete(key);
  };
  await assert.rejects(runGc(repo), /injected/);
  assert.equal(fs.existsSync(path.join(dir, 'volumes/vol/deleted/b1.json')), true, 'the tombstone stays until the job is done');
  target.delete = realDelete;
  const again = await runGc(new BackupRepository(openTarget(`file://${dir}`)));
  assert.equal(again.tombstones, 1);
  for (const h of onlyB1) assert.equal(fs.existsSync(path.join(dir, blockKey(h))), false);
  assert.equal(fs.existsSync(path.join(dir, 'volumes/vol/deleted/b1.json')), false);
  const report = await verifyTarget(repo);
  assert.equal(report.missingBlocks + report.corruptBlocks, 0);
  const restored = await restoreInto(root, repo, b2, 'r2');
  t.after(() => restored.abandon());
  assert.ok((await readAll(restored)).equals(await readAll(source, 's2')));
});

test('an apply onto a standby that stopped midway is covered by the next apply (its blocks are written or zeroed again)', async (t) => {
  const root = tempDir(t);
  const repo = new BackupRepository(openTarget(`file://${path.join(root, 'target')}`));
  await repo.init();
  const source = await Replica.create(path.join(root, 'source'), { sizeBytes: 12 * MiB });
  t.after(() => source.abandon());
  const a = crypto.randomBytes(12 * MiB);
  await source.write(0, a);
  await source.snapshotCreate('sa');
  await source.write(4 * MiB, crypto.randomBytes(4 * MiB)); // X: blocks 2 and 3 changed
  await source.snapshotCreate('sx');
  await source.write(4 * MiB, a.subarray(4 * MiB, 8 * MiB)); // Y: blocks 2 and 3 back as in A,
  await source.zero(8 * MiB, 2 * MiB); // block 4 zeroed,
  await source.write(10 * MiB, crypto.randomBytes(2 * MiB)); // block 5 new
  await source.snapshotCreate('sy');
  const [ba, bx, by] = [await backup(repo, source, 'ba', 'sa', null), await backup(repo, source, 'bx', 'sx', null), await backup(repo, source, 'by', 'sy', null)];

  const standby = async (name: string): Promise<Replica> => {
    const r = await restoreInto(root, repo, ba, name);
    t.after(() => r.abandon());
    // The apply of bx stops after its first write (the process died).
    let writes = 0;
    const dying: BlockWriter = { ...writer(r), write: async (offset, data) => {
      if (++writes > 1) throw new ZebuError(ErrorCode.DISCONNECTED, 'injected: the engine died');
      await r.write(offset, data);
    } };
    await assert.rejects(runRestore({ repo, sink: dying, manifest: bx, applied: ba, sizeBytes: 12 * MiB, concurrency: 1 }), /injected/);
    return r;
  };
  const covered = await standby('covered');
  await runRestore({ repo, sink: writer(covered), manifest: by, applied: ba, interrupted: [bx], sizeBytes: 12 * MiB, concurrency: 2 });
  assert.ok((await readAll(covered)).equals(await readAll(source, 'sy')), 'the standby equals the newest backup');
  // Without naming the interrupted apply, its block stays: the case this guards against.
  const uncovered = await standby('uncovered');
  await runRestore({ repo, sink: writer(uncovered), manifest: by, applied: ba, sizeBytes: 12 * MiB, concurrency: 2 });
  assert.ok(!(await readAll(uncovered)).equals(await readAll(source, 'sy')));
});

test('S3 target (s3rver): round trip, retries through 500s, a clear error when the server is away, and a crashed backup finished by a retry', async (t) => {
  const root = tempDir(t);
  const s3 = await startTestS3(root);
  t.after(() => s3.close());
  const options = { endpoint: s3.endpoint, credentials: s3.credentials, retryDelayMs: 20, attempts: 4 };
  const repo = new BackupRepository(openTarget(`s3://${s3.bucket}/cluster-a/`, options));
  t.after(() => repo.close());
  assert.equal(await checkTarget(repo.target), null);
  const { source } = await roundTrip(t, root, repo);
  assert.ok(fs.existsSync(s3.dir), 'objects are in the bucket');

  // Three 500s in a row are retried through.
  await source.write(0, crypto.randomBytes(MiB));
  await source.snapshotCreate('s3');
  s3.failNext(3);
  const b3 = await backup(repo, source, 'b3', 's3', null, 1);
  assert.ok(b3.completedAt !== null);

  // The server goes away mid-backup: an error that says so, and no completed manifest.
  await source.write(2 * MiB, crypto.randomBytes(6 * MiB));
  await source.snapshotCreate('s4');
  const base = await repo.readManifest('vol', 'b3');
  let reads = 0;
  const source4 = reader(source);
  const failing: SnapshotReader = {
    snapshotChanges: source4.snapshotChanges,
    async readSnapshot(name, offset, length) {
      if (++reads === 2) await s3.stop();
      return source4.readSnapshot(name, offset, length);
    },
  };
  await assert.rejects(
    runBackup({ repo, source: failing, volume: 'vol', name: 'b4', snapshot: 's4', sizeBytes: SIZE, createdAt: new Date().toISOString(), labels: {}, compression: 'zstd', base, concurrency: 1 }),
    (err) => err instanceof ZebuError && /s3:\/\/zebu-backups\/cluster-a\//.test(err.message) && /ECONNREFUSED|connect/i.test(err.message),
  );
  await s3.start();
  assert.equal(await repo.readManifest('vol', 'b4'), null, 'no completed manifest');
  assert.ok((await repo.readPartial('vol', 'b4')) !== null, 'the partial manifest names what it stored');
  // The retry completes and restores right.
  const b4 = await backup(repo, source, 'b4', 's4', base);
  assert.equal(await repo.readPartial('vol', 'b4'), null);
  const restored = await restoreInto(root, repo, b4, 'r4');
  t.after(() => restored.abandon());
  assert.ok((await readAll(restored)).equals(await readAll(source, 's4')));

  // Wrong credentials and a missing bucket: clear reasons from the check.
  const wrong = openTarget(`s3://${s3.bucket}/x/`, { ...options, credentials: { accessKeyId: 'NOBODY', secretAccessKey: 'nothing' } });
  assert.match((await checkTarget(wrong)) ?? '', /InvalidAccessKeyId|HTTP 403/);
  wrong.close();
  const noBucket = openTarget('s3://no-such-bucket/x/', options);
  assert.match((await checkTarget(noBucket)) ?? '', /HTTP 404|NotFound|NoSuchBucket/);
  noBucket.close();
  const away = openTarget(`s3://${s3.bucket}/x/`, { ...options, endpoint: 'http://127.0.0.1:1' });
  assert.match((await checkTarget(away)) ?? '', /ECONNREFUSED|connect/i);
  away.close();
});

test('file target: the directories a put creates are made durable with it (their names in their parents)', async (t) => {
  const root = tempDir(t, 'zb-dirsync-');
  const synced: string[] = [];
  const target = new FileTarget(`file://${root}`, root, {
    sync: async (p: string) => {
      synced.push(path.relative(root, p) || '.');
    },
  });
  // A deferred put: nothing until flush, then the file, its directory and each new directory's parent.
  await target.put('blocks/ab/cd/abcd', Buffer.from('x'), { deferSync: true });
  assert.deepEqual(synced, []);
  await target.flush();
  assert.deepEqual(synced.sort(), ['.', 'blocks', 'blocks/ab', 'blocks/ab/cd', 'blocks/ab/cd/abcd'].sort());
  // Only what the put created: a sibling in an existing directory syncs its file and directory.
  synced.length = 0;
  await target.put('blocks/ab/ef/abef', Buffer.from('y'), { deferSync: true });
  await target.flush();
  assert.deepEqual(synced.sort(), ['blocks/ab', 'blocks/ab/ef', 'blocks/ab/ef/abef'].sort());
  // An immediate put syncs before it returns.
  synced.length = 0;
  await target.put('volumes/v/volume.json', Buffer.from('{}'));
  assert.deepEqual(synced.sort(), ['.', 'volumes', 'volumes/v'].sort());
  // A directory removed behind the target's back is made again (and made durable again).
  fs.rmSync(path.join(root, 'blocks'), { recursive: true });
  synced.length = 0;
  await target.put('blocks/ab/cd/abcd', [Buffer.from('he'), Buffer.alloc(0), Buffer.from('llo')], { deferSync: true });
  await target.flush();
  assert.equal(fs.readFileSync(path.join(root, 'blocks/ab/cd/abcd'), 'utf8'), 'hello');
  assert.deepEqual(synced.sort(), ['.', 'blocks', 'blocks/ab', 'blocks/ab/cd', 'blocks/ab/cd/abcd'].sort());
});

test('file target: a staged object is invisible until committed; discarded or stale ones leave nothing', async (t) => {
  const root = tempDir(t, 'zb-stage-');
  const synced: string[] = [];
  const target = new FileTarget(`file://${root}`, root, {
    sync: async (p: string) => {
      synced.push(path.relative(root, p) || '.');
    },
  });
  // A staged file a crashed process left an hour ago, and one of a process still working.
  fs.mkdirSync(path.join(root, '.staging'));
  const stale = path.join(root, '.staging', 'old-1-aaaa');
  const fresh = path.join(root, '.staging', 'new-2-bbbb');
  fs.writeFileSync(stale, 'x');
  fs.writeFileSync(fresh, 'y');
  const hourAgo = new Date(Date.now() - 61 * 60 * 1000);
  fs.utimesSync(stale, hourAgo, hourAgo);

  const parts = [Buffer.from('hea'), Buffer.from('der')];
  const staged = await target.stage('blocks/ab/cd/abcd', parts);
  parts[0].fill(0); // the caller may reuse its buffers once staged
  assert.equal(await target.get('blocks/ab/cd/abcd'), null);
  assert.equal(await target.exists('blocks/ab/cd/abcd'), false);
  assert.deepEqual((await target.list('')).prefixes, [], 'the staging directory is not listed');
  await staged.commit();
  assert.equal((await target.get('blocks/ab/cd/abcd'))?.toString(), 'header', 'the bytes as they were when staged');
  await assertInvariantRejects(() => staged.commit(), /twice/);
  // Durable at the next flush, with the directories the commit created.
  await target.flush();
  assert.deepEqual(synced.sort(), ['.', 'blocks', 'blocks/ab', 'blocks/ab/cd', 'blocks/ab/cd/abcd'].sort());

  const dropped = await target.stage('blocks/ef/01/ef01', Buffer.from('gone'));
  await dropped.discard();
  assert.equal(await target.exists('blocks/ef/01/ef01'), false);
  assert.deepEqual(fs.readdirSync(path.join(root, '.staging')), ['new-2-bbbb'], 'the stale file is removed, the fresh one kept, nothing of ours left');
});

test('a backup whose listing fails makes none of its new blocks visible and leaves nothing staged', async (t) => {
  const { root, repo, source } = await fileTargetWithSource(t, 'zb-listfail-');
  const writeSegment = repo.writePartialSegment.bind(repo);
  repo.writePartialSegment = async () => {
    throw new ZebuError(ErrorCode.EIO, 'injected: partial manifest write failed');
  };
  await assert.rejects(backup(repo, source, 'b1', 's1', null), /injected/);
  assert.deepEqual(blockFilesOn(path.join(root, 'target')), [], 'no block is visible that no manifest lists');
  assert.deepEqual(fs.readdirSync(path.join(root, 'target', '.staging')), [], 'staged blocks are discarded');

  // The second listing fails: the blocks of the first are on the target, listed by the partial.
  let writes = 0;
  repo.writePartialSegment = async (...args) => {
    if (++writes > 1) throw new ZebuError(ErrorCode.EIO, 'injected: second write failed');
    return writeSegment(...args);
  };
  await assert.rejects(backup(repo, source, 'b1', 's1', null), /injected/);
  const partial = await repo.readPartialSegments('vol', 'b1');
  assert.equal(partial?.segments, 1);
  const listed = new Set(partial!.manifest.blocks.map(([, hash]) => hash));
  assert.ok(listed.size >= 1);
  const visible = blockFilesOn(path.join(root, 'target')).map((f) => path.basename(f));
  assert.ok(visible.length >= 1 && visible.every((hash) => listed.has(hash)), 'every visible block is listed');

  // A retry writes the segments after the earlier ones and completes; the partial is gone.
  repo.writePartialSegment = writeSegment;
  const b1 = await backup(repo, source, 'b1', 's1', null);
  assert.equal(b1.blocks.length, 13);
  assert.equal(await repo.readPartial('vol', 'b1'), null);
  assert.deepEqual(fs.readdirSync(path.join(root, 'target', 'volumes', 'vol', 'backups')).sort(), ['b1.json']);
  const restored = await restoreInto(root, repo, b1, 'restored');
  t.after(() => restored.abandon());
  assert.ok((await readAll(restored)).equals(await readAll(source, 's1')));
});

test('an abandoned backup (its partial manifest in several segments) is deleted with every block it listed collected', async (t) => {
  const { root, repo, source } = await fileTargetWithSource(t, 'zb-abandon-');
  // One block per segment (concurrency 1), and the backup stops after a few of them.
  const writeSegment = repo.writePartialSegment.bind(repo);
  let writes = 0;
  repo.writePartialSegment = async (...args) => {
    if (++writes > 4) throw new ZebuError(ErrorCode.EIO, 'injected: target went away');
    return writeSegment(...args);
  };
  await assert.rejects(backup(repo, source, 'b1', 's1', null, 1), /injected/);
  repo.writePartialSegment = writeSegment;
  const partial = await repo.readPartialSegments('vol', 'b1');
  assert.equal(partial?.segments, 4);
  assert.ok(partial!.manifest.blocks.length >= 4, 'each segment lists one block or more');
  assert.deepEqual((await repo.listBackups('vol')).partial, ['b1']);

  assert.equal(await repo.deleteBackup('vol', 'b1'), true);
  assert.deepEqual(fs.readdirSync(path.join(root, 'target', 'volumes', 'vol', 'backups')), [], 'head and segments removed');
  const gc = await runGc(repo);
  assert.equal(gc.removedBlocks, partial!.manifest.blocks.length, 'the tombstone names every block the segments listed');
  assert.deepEqual(blockFilesOn(path.join(root, 'target')), [], 'nothing leaked');
});

test('file target: deferred files are synced early, in the background; a failed early sync fails the next flush', async (t) => {
  const root = tempDir(t, 'zb-early-');
  const synced: string[] = [];
  let failNext = false;
  const target = new FileTarget(`file://${root}`, root, {
    sync: async (p: string) => {
      if (failNext && path.basename(p) === 'f40') throw Object.assign(new Error('injected EIO'), { code: 'EIO' });
      synced.push(path.relative(root, p));
    },
  });
  for (let i = 0; i < 40; i++) await target.put(`blocks/aa/bb/f${i}`, Buffer.from(`${i}`), { deferSync: true });
  await new Promise((resolve) => setTimeout(resolve, 50));
  const early = synced.filter((p) => p.startsWith('blocks/aa/bb/f'));
  assert.ok(early.length >= 32, `the first 32 files are synced before any flush (${early.length})`);
  assert.ok(!synced.includes('blocks/aa/bb'), 'directories wait for the flush');
  await target.flush();
  assert.equal(synced.filter((p) => p.startsWith('blocks/aa/bb/f')).length, 40, 'each file synced once');
  assert.ok(synced.includes('blocks/aa/bb'));

  // An early sync fails: the flush after it says so, even though the flush's own syncs work.
  failNext = true;
  for (let i = 40; i < 72; i++) await target.put(`blocks/aa/bb/f${i}`, Buffer.from(`${i}`), { deferSync: true });
  await assert.rejects(target.flush(), (err) => err instanceof ZebuError && /make blocks durable/.test(err.message) && /injected EIO/.test(err.message));
});

test('a backup whose blocks cannot be made durable fails, and its retry stores them again', async (t) => {
  const { root, repo, source } = await fileTargetWithSource(t, 'zb-flushfail-');
  const flushBlocks = repo.flushBlocks.bind(repo);
  repo.flushBlocks = async () => {
    throw new ZebuError(ErrorCode.EIO, 'injected: fsync failed');
  };
  await assert.rejects(backup(repo, source, 'b1', 's1', null), /injected/);
  assert.equal(repo.index.known.size, 0, 'blocks not known to be durable are not trusted');
  repo.flushBlocks = flushBlocks;
  const b1 = await backup(repo, source, 'b1', 's1', null);
  assert.equal(b1.stats.uploadedBlocks, 12, 'every block stored again');
});

test('target URLs: malformed ones are refused with the reason', () => {
  assert.deepEqual(parseTargetUrl('file:///srv/backups/'), { scheme: 'file', location: '/srv/backups', prefix: '' });
  assert.deepEqual(parseTargetUrl('s3://bucket-1/a/b'), { scheme: 's3', location: 'bucket-1', prefix: 'a/b/' });
  assert.deepEqual(parseTargetUrl('s3://bucket-1'), { scheme: 's3', location: 'bucket-1', prefix: '' });
  for (const [url, why] of [
    ['', /1-1024/],
    ['backups', /not a URL/],
    ['http://x/y', /unsupported scheme/],
    ['file://host/dir', /no host/],
    ['file:///', /absolute path other than \//],
    ['s3://B/x', /bucket name/],
    ['s3://user:pw@bucket/x', /credentials/],
    ['s3://bucket/a/../b', /\.\./],
  ] as const) {
    assert.throws(() => parseTargetUrl(url), (err) => err instanceof ZebuError && err.code === ErrorCode.EINVAL && err.field === 'url' && why.test(err.message), url);
  }
});
