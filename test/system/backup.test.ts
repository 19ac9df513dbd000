/**
 * Backups through `zebu up`, the real CLI and real NBD clients (nbdcopy, qemu-io), to a
 * directory and to S3 (s3rver on 127.0.0.1):
 * - random data written through NBD, backed up, more written, backed up again (incremental:
 *   about 1% changed, at most 2% read and uploaded), both restored to new volumes and compared
 *   byte for byte with what the source held at each backup;
 * - verify of the target, a corrupt block named by verify and by the restore that meets it (the
 *   half-restored volume is not healthy and cannot be attached);
 * - delete and garbage collection; a DR standby volume that applies a newer backup by itself and
 *   is activated; a second `zebu up` pointed at the same target sees the backups;
 * - bad input: malformed URL, unknown volume and backup, restore into an existing name.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import crypto from 'node:crypto';
import { writeAt, readVolume } from '../support/volume-io.ts';
import { startZebuUp, stopZebuUp, zebu, mustZebu, mustZebuJson, zebuDataDir, waitFor, type ZebuUp } from '../support/zebu-up.ts';
import { startTestS3Process } from '../support/s3-server.ts';

const MiB = 1024 * 1024;
const SIZE = 256 * MiB;

function attach(up: ZebuUp, volume: string): string {
  return mustZebu(up, ['volume', 'attach', volume]).trim();
}

async function restored(up: ZebuUp, dir: string, volume: string): Promise<Buffer> {
  const uri = attach(up, volume);
  const data = readVolume(dir, uri);
  mustZebu(up, ['volume', 'detach', volume]);
  return data;
}

test('file target: incremental backups restore byte for byte; verify, corruption, GC, DR standby, a second cluster, bad input', async (t) => {
  const dataDir = zebuDataDir(t);
  const root = path.dirname(dataDir);
  const targetDir = path.join(root, 'backups');
  const work = path.join(root, 'work');
  fs.mkdirSync(work);
  const up = await startZebuUp({ dataDir });
  t.after(() => stopZebuUp(up));

  // Bad target URLs change nothing.
  for (const [url, why] of [['backups', /not a URL/], ['http://x/y', /unsupported scheme/], ['s3://B/x', /bucket name/]] as const) {
    const r = zebu(up, ['backup-target', 'set', url]);
    assert.equal(r.status, 1, url);
    assert.match(r.stderr, why);
  }
  assert.match(zebu(up, ['backup-target', 'get']).stderr, /no backup target is set/);
  const set = mustZebuJson(up, ['backup-target', 'set', `file://${targetDir}`]);
  assert.equal(set.available, true, JSON.stringify(set));

  mustZebu(up, ['volume', 'create', 'src', '--size', '256MiB', '--replicas', '2']);
  const uri = attach(up, 'src');
  const first = crypto.randomBytes(64 * MiB);
  writeAt(work, uri, 0, first);
  writeAt(work, uri, 200 * MiB, crypto.randomBytes(3 * MiB));
  const expected1 = readVolume(work, uri);

  const b1 = mustZebuJson(up, ['backup', 'create', 'src', '--label', 'kind=full']);
  assert.equal(b1.state, 'completed', JSON.stringify(b1));
  assert.equal(b1.base, null);
  assert.deepEqual(b1.labels, { kind: 'full' });
  assert.ok(b1.readBytes <= 68 * MiB, `only written blocks are read (${b1.readBytes})`);

  // About 1% of the volume changes.
  writeAt(work, uri, 4 * MiB, crypto.randomBytes(2.5 * MiB));
  const expected2 = readVolume(work, uri);
  const b2 = mustZebuJson(up, ['backup', 'create', 'src']);
  assert.equal(b2.state, 'completed');
  assert.equal(b2.base, b1.name, 'incremental from the first');
  assert.ok(b2.readBytes <= 0.02 * SIZE, `read ${b2.readBytes} bytes, at most 2% of the volume`);
  assert.ok(b2.uploadedBytes <= 0.02 * SIZE, `uploaded ${b2.uploadedBytes} bytes, at most 2% of the volume`);
  assert.ok(b2.uploadedBytes > 0);

  // The first backup's own snapshot is gone once the second completed (it was its base only).
  await waitFor('the first backup\'s snapshot to be deleted', () => {
    const names = mustZebuJson(up, ['snapshot', 'list', 'src']).map((x: { name: string }) => x.name);
    return !names.includes(b1.snapshot) && names.includes(b2.snapshot);
  });
  const list = mustZebuJson(up, ['backup', 'list', '--volume', 'src']);
  assert.deepEqual(list.map((b: { name: string }) => b.name), [b1.name, b2.name]);
  assert.match(mustZebu(up, ['backup', 'get', b2.name]), new RegExp(`incremental from:\\s+${b1.name}`));

  // Restore both and compare.
  const r1 = mustZebuJson(up, ['backup', 'restore', b1.name, '--to', 'r1', '--replicas', '2']);
  assert.equal(r1.restore.state, 'completed');
  assert.equal(r1.restore.applied, b1.name);
  mustZebu(up, ['volume', 'create', 'r2', '--from-backup', b2.name, '--replicas', '1']);
  assert.ok((await restored(up, work, 'r1')).equals(expected1), 'restore of the first backup equals the volume then');
  // Progress in events too, for the backup and for the restore.
  const reasons = (volume: string): string[] => mustZebuJson(up, ['events', '--volume', volume, '--limit', '1000']).map((e: { reason: string }) => e.reason);
  assert.ok(reasons('src').includes('BackupProgress') && reasons('src').includes('BackupCompleted'), reasons('src').join(' '));
  // The full backup read its blocks straight from the replicas, not through the engine.
  const completed = mustZebuJson(up, ['events', '--volume', 'src', '--limit', '1000']).find((e: { reason: string; message: string }) => e.reason === 'BackupCompleted' && e.message.includes(`backup ${b1.name} `));
  assert.match(completed?.message ?? '', new RegExp(`${b1.readBytes} bytes read \\(${b1.readBytes} straight from the replicas\\)`), completed?.message);
  assert.ok(reasons('r1').includes('RestoreProgress') && reasons('r1').includes('RestoreCompleted'), reasons('r1').join(' '));
  assert.ok((await restored(up, work, 'r2')).equals(expected2), 'restore of the second backup equals the volume then');
  const r2view = mustZebuJson(up, ['volume', 'get', 'r2']);
  assert.equal(r2view.robustness === 'healthy' || r2view.robustness === 'unknown', true);
  assert.match(mustZebu(up, ['volume', 'get', 'r2']), /restore:\s+from volume src; backup .* applied/);

  // Metrics per volume, from the catalog.
  const metrics = await (await fetch(`${up.api}/metrics`, { headers: { authorization: `Bearer ${up.token}` } })).text();
  assert.match(metrics, /zebu_backup_last_success_timestamp_seconds\{volume="src"\} \d/);
  assert.match(metrics, /zebu_backups\{volume="src",state="completed"\} 2/);
  assert.match(metrics, /zebu_backup_uploaded_bytes_total\{volume="src"\} \d/);
  // Bad API bodies: 400 naming the field; nothing changed.
  const put = await fetch(`${up.api}/v1/backuptargets/default`, { method: 'PUT', headers: { authorization: `Bearer ${up.token}`, 'content-type': 'application/json' }, body: JSON.stringify({ url: `file://${targetDir}`, bogus: 1 }) });
  assert.equal(put.status, 400);
  const post = await fetch(`${up.api}/v1/backups`, { method: 'POST', headers: { authorization: `Bearer ${up.token}`, 'content-type': 'application/json' }, body: JSON.stringify({ volume: 'src', labels: { k: 7 } }) });
  assert.equal(post.status, 400);
  assert.equal(mustZebuJson(up, ['backup', 'list']).length, 2);

  // Bad input: a clear error each, nothing created.
  assert.match(zebu(up, ['backup', 'restore', 'backup-nope', '--to', 'r3']).stderr, /backup backup-nope not found/);
  assert.match(zebu(up, ['backup', 'restore', b1.name, '--to', 'r1']).stderr, /volume r1 already exists/);
  assert.match(zebu(up, ['backup', 'create', 'nope']).stderr, /volume nope not found/);
  assert.match(zebu(up, ['backup', 'get', 'backup-nope']).stderr, /not found/);
  assert.match(zebu(up, ['backup', 'create', 'src', '--snapshot', 'nope']).stderr, /snapshot nope of volume src not found/);
  assert.equal(mustZebuJson(up, ['volume', 'list']).some((v: { name: string }) => v.name === 'r3'), false);

  // Verify the target; then corrupt a block only the second backup has.
  assert.equal(zebu(up, ['backup-target', 'verify']).status, 0);
  const manifest1 = fs.readFileSync(path.join(targetDir, `volumes/src/backups/${b1.name}.json`), 'utf8').split('\n')[0];
  const manifest2 = fs.readFileSync(path.join(targetDir, `volumes/src/backups/${b2.name}.json`), 'utf8').split('\n')[0];
  const hashes1 = new Set((JSON.parse(manifest1).blocks as [number, string][]).map(([, h]) => h));
  const onlyIn2 = (JSON.parse(manifest2).blocks as [number, string][]).filter(([, h]) => !hashes1.has(h));
  assert.equal(onlyIn2.length, 2, 'two new blocks (2.5 MiB at 4 MiB)');
  const [badIndex, badHash] = onlyIn2[0];
  const badFile = path.join(targetDir, 'blocks', badHash.slice(0, 2), badHash.slice(2, 4), badHash);
  const good = fs.readFileSync(badFile);
  const broken = Buffer.from(good);
  broken[broken.length - 100] ^= 0x55;
  fs.writeFileSync(badFile, broken);
  const verify = zebu(up, ['backup-target', 'verify', '--json']);
  assert.equal(verify.status, 1);
  const report = JSON.parse(verify.stdout);
  assert.equal(report.corruptBlocks, 1);
  assert.deepEqual(report.backups.find((b: { backup: string }) => b.backup === b2.name).problems.map((p: { hash: string; offset: number }) => [p.hash, p.offset]), [[badHash, badIndex * 2 * MiB]]);
  const failed = zebu(up, ['backup', 'restore', b2.name, '--to', 'bad']);
  assert.equal(failed.status, 1);
  assert.match(failed.stderr, new RegExp(`backup ${b2.name}.*${badHash}`));
  const bad = mustZebuJson(up, ['volume', 'get', 'bad']);
  assert.equal(bad.restore.state, 'error');
  assert.notEqual(bad.robustness, 'healthy');
  await waitFor('the failed restore to detach', () => mustZebuJson(up, ['volume', 'get', 'bad']).state !== 'attaching');
  const refused = zebu(up, ['volume', 'attach', 'bad']);
  assert.equal(refused.status, 1);
  assert.match(refused.stderr, /restore of backup .* failed/);
  mustZebu(up, ['volume', 'delete', 'bad']);
  fs.writeFileSync(badFile, good);
  assert.equal(zebu(up, ['backup-target', 'verify']).status, 0);

  // DR standby of src from b1; a newer backup is applied by itself; activation; data equal.
  const standby = mustZebuJson(up, ['volume', 'create', 'dr', '--from-backup', b1.name, '--standby', '--replicas', '1']);
  assert.equal(standby.restore.standby, true);
  await waitFor('the standby to apply the newest backup', () => mustZebuJson(up, ['volume', 'get', 'dr']).restore.applied === b2.name, 120_000);
  assert.match(zebu(up, ['volume', 'attach', 'dr']).stderr, /DR standby .* activate it first/);
  writeAt(work, uri, 100 * MiB, crypto.randomBytes(MiB));
  const expected3 = readVolume(work, uri);
  const b3 = mustZebuJson(up, ['backup', 'create', 'src']);
  await waitFor('the standby to apply backup 3', () => mustZebuJson(up, ['volume', 'get', 'dr']).restore.applied === b3.name, 120_000);
  const activated = mustZebuJson(up, ['volume', 'activate', 'dr']);
  assert.equal(activated.restore.standby, false);
  const drData = await restored(up, work, 'dr');
  assert.ok(drData.equals(expected3), 'the activated standby holds the newest backup');

  // Delete the first backup: its blocks nothing else uses go; the others still restore.
  const manifestHashes = (name: string): Set<string> =>
    new Set((JSON.parse(fs.readFileSync(path.join(targetDir, `volumes/src/backups/${name}.json`), 'utf8').split('\n')[0]).blocks as [number, string][]).map(([, h]) => h));
  const kept = new Set([...manifestHashes(b2.name), ...manifestHashes(b3.name)]);
  const onlyIn1 = [...hashes1].filter((h) => !kept.has(h));
  assert.ok(onlyIn1.length >= 1, 'the first backup has blocks the others do not');
  const blockFile = (h: string): string => path.join(targetDir, 'blocks', h.slice(0, 2), h.slice(2, 4), h);
  assert.ok(onlyIn1.every((h) => fs.existsSync(blockFile(h))));
  mustZebu(up, ['backup', 'delete', b1.name]);
  assert.equal(fs.existsSync(path.join(targetDir, `volumes/src/backups/${b1.name}.json`)), false);
  // Collected by itself after the delete (an explicit run finds nothing left to do, or does it).
  mustZebuJson(up, ['backup-target', 'gc']);
  await waitFor('the blocks only the deleted backup had to be removed', () => onlyIn1.every((h) => !fs.existsSync(blockFile(h))));
  assert.ok([...kept].every((h) => fs.existsSync(blockFile(h))), 'blocks other backups use are kept');
  assert.ok(mustZebuJson(up, ['events']).some((e: { reason: string }) => e.reason === 'BackupGarbageCollected'));
  assert.equal(zebu(up, ['backup-target', 'verify']).status, 0);
  mustZebu(up, ['backup', 'restore', b2.name, '--to', 'r4', '--replicas', '1']);
  assert.ok((await restored(up, work, 'r4')).equals(expected2));

  // Deleting the volume keeps its backups.
  mustZebu(up, ['volume', 'detach', 'src']);
  mustZebu(up, ['volume', 'delete', 'src']);
  assert.deepEqual(mustZebuJson(up, ['backup', 'list', '--volume', 'src']).map((b: { name: string }) => b.name).sort(), [b2.name, b3.name].sort());

  // A second cluster pointed at the same target sees the backups.
  const other = await startZebuUp({ dataDir: path.join(root, 'other') });
  t.after(() => stopZebuUp(other));
  mustZebu(other, ['backup-target', 'set', `file://${targetDir}`]);
  const seen = mustZebuJson(other, ['backup', 'list']).map((b: { name: string }) => b.name).sort();
  assert.deepEqual(seen, [b2.name, b3.name].sort());
  mustZebu(other, ['backup', 'restore', b3.name, '--to', 'copy', '--replicas', '1']);
  assert.ok((await restored(other, work, 'copy')).equals(expected3));
});

test('S3 target (s3rver): set with an endpoint and a credential file, back up, restore, wrong credentials refused', async (t) => {
  const dataDir = zebuDataDir(t);
  const root = path.dirname(dataDir);
  const work = path.join(root, 'work');
  fs.mkdirSync(work);
  const s3 = await startTestS3Process(root);
  t.after(() => s3.close());
  const up = await startZebuUp({ dataDir });
  t.after(() => stopZebuUp(up));

  const wrong = path.join(root, 'wrong.env');
  fs.writeFileSync(wrong, 'AWS_ACCESS_KEY_ID=NOBODY\nAWS_SECRET_ACCESS_KEY=nothing\n');
  const refused = zebu(up, ['backup-target', 'set', `s3://${s3.bucket}/zebu/`, '--endpoint', s3.endpoint, '--credential-file', wrong]);
  assert.equal(refused.status, 1);
  assert.match(refused.stderr, /not usable: .*(InvalidAccessKeyId|HTTP 403)/);

  const creds = path.join(root, 'creds.json');
  fs.writeFileSync(creds, JSON.stringify(s3.credentials));
  const target = mustZebuJson(up, ['backup-target', 'set', `s3://${s3.bucket}/zebu/`, '--endpoint', s3.endpoint, '--credential-file', creds]);
  assert.equal(target.available, true, JSON.stringify(target));
  assert.equal(target.credentials, 'set');
  // The secret is never shown.
  assert.doesNotMatch(JSON.stringify(target), /S3RVER/);
  assert.doesNotMatch(mustZebu(up, ['backup-target', 'get']), /S3RVER/);

  mustZebu(up, ['volume', 'create', 'v', '--size', '64MiB', '--replicas', '2']);
  const uri = attach(up, 'v');
  writeAt(work, uri, 0, crypto.randomBytes(20 * MiB));
  const expected = readVolume(work, uri);
  await s3.failNext(2);
  const b = mustZebuJson(up, ['backup', 'create', 'v']);
  assert.equal(b.state, 'completed', JSON.stringify(b));
  assert.ok(fs.readdirSync(s3.dir).length > 0);
  mustZebu(up, ['backup', 'restore', b.name, '--to', 'w', '--replicas', '1']);
  assert.ok((await restored(up, work, 'w')).equals(expected));
  assert.match(mustZebu(up, ['backup-target', 'check']), /reachable and writable/);

  // The server away: the check says why.
  await s3.stop();
  const down = zebu(up, ['backup-target', 'check']);
  assert.equal(down.status, 1);
  assert.match(down.stderr, /ECONNREFUSED|connect/i);
  await s3.start();
});
