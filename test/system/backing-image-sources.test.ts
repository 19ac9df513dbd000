/**
 * Backing images whose bytes pass through the manager, through `zebu up` and the real CLI: an
 * upload (streamed through the API, checked against its checksum, copied to a second disk), an
 * upload with the wrong bytes (failed with the reason, sent again), and an export of a volume's
 * snapshot (later writes to the volume are not in it; a volume on the exported image reads as the
 * snapshot), and a restore of a backup. An upload whose every file is lost says plainly that it
 * cannot be fetched again.
 * Bad input is refused with the reason.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { mustRun } from '../support/volume-cluster.ts';
import { startZebuUp, stopZebuUp, zebu, mustZebu, mustZebuJson, zebuDataDir, waitFor } from '../support/zebu-up.ts';

const MiB = 1024 * 1024;

function sha512(data: Buffer): string {
  return crypto.createHash('sha512').update(data).digest('hex');
}

interface FileRow {
  disk: string;
  state: string;
  from: string;
  message: string | null;
}

test('backing images uploaded through the API, exported from a volume\'s snapshot and restored from a backup; wrong bytes refused; a lost upload says why', async (t) => {
  const dataDir = zebuDataDir(t);
  const work = path.dirname(dataDir);
  let up = await startZebuUp({ dataDir, disks: 3 });
  t.after(() => stopZebuUp(up));
  mustZebu(up, ['setting', 'set', 'backing-image-recovery-wait-seconds', '1']);
  const disks = mustZebuJson<{ name: string; path: string }[]>(up, ['disk', 'list']);
  const fileOn = (image: string, disk: string): string => path.join(disks.find((d) => d.name === disk)!.path, 'backing-images', image, 'image.raw');

  // Upload: streamed, verified, then copied from the ready file.
  const image = crypto.randomBytes(6 * MiB + 4096 * 3);
  const imageFile = path.join(work, 'upload.raw');
  fs.writeFileSync(imageFile, image);
  const created = mustZebuJson(up, ['backing-image', 'create', 'up1', '--upload', imageFile, '--checksum', sha512(image), '--min-copies', '2']);
  assert.equal(created.state, 'ready');
  assert.equal(created.sizeBytes, image.length);
  assert.deepEqual(created.source, { type: 'upload' });
  const two = await waitFor('two ready copies', () => {
    const i = mustZebuJson(up, ['backing-image', 'get', 'up1']);
    return i.readyCopies === 2 ? i : undefined;
  });
  for (const f of two.files as FileRow[]) assert.ok(fs.readFileSync(fileOn('up1', f.disk)).equals(image), f.disk);
  assert.deepEqual((two.files as FileRow[]).map((f) => f.from).sort(), ['disk ' + (two.files as FileRow[]).find((f) => f.from === 'source')!.disk, 'source']);
  const again = zebu(up, ['backing-image', 'upload', 'up1', imageFile]);
  assert.equal(again.status, 1);
  assert.match(again.stderr, /backing image up1 is already uploaded/);

  // Wrong bytes: failed with the reason, nothing ready; sent again with the right ones: ready.
  const wrong = zebu(up, ['backing-image', 'create', 'up2', '--upload', imageFile, '--checksum', 'ab'.repeat(64), '--min-copies', '1']);
  assert.equal(wrong.status, 1);
  assert.match(wrong.stderr, /checksum mismatch: the upload's SHA-512 is [0-9a-f]{128}, expected (ab){64}/);
  const failed = mustZebuJson(up, ['backing-image', 'get', 'up2']);
  assert.equal(failed.readyCopies, 0);
  assert.ok((failed.files as FileRow[]).every((f) => f.state === 'failed'));
  mustZebu(up, ['backing-image', 'delete', 'up2']);
  mustZebu(up, ['backing-image', 'create', 'up3', '--upload', imageFile, '--min-copies', '1']);
  assert.equal(mustZebuJson(up, ['backing-image', 'get', 'up3']).checksum, sha512(image), 'no checksum given: fixed by the upload');
  // A qcow2 upload is converted: the image is the raw bytes, its --checksum the qcow2 file's.
  const qcow2File = path.join(work, 'upload.qcow2');
  mustRun('qemu-img', ['convert', '-q', '-f', 'raw', '-O', 'qcow2', imageFile, qcow2File]);
  const fromQcow2 = mustZebuJson(up, ['backing-image', 'create', 'upq', '--upload', qcow2File, '--checksum', sha512(fs.readFileSync(qcow2File)), '--min-copies', '1']);
  assert.equal(fromQcow2.checksum, sha512(image));
  assert.equal(fromQcow2.sizeBytes, image.length);
  mustZebu(up, ['backing-image', 'delete', 'upq']);

  // Bad input.
  assert.match(zebu(up, ['backing-image', 'create', 'x', '--upload', path.join(work, 'nope.raw')]).stderr, /cannot read .*nope\.raw: no such file/);
  assert.match(zebu(up, ['backing-image', 'create', 'x', '--upload', imageFile, '--url', 'http://127.0.0.1:1/x']).stderr, /give exactly one source/);
  assert.match(zebu(up, ['backing-image', 'upload', 'nope', imageFile]).stderr, /backing image nope not found/);
  mustZebu(up, ['backing-image', 'create', 'dl', '--url', 'http://127.0.0.1:1/x.raw', '--no-wait', '--min-copies', '1']);
  assert.match(zebu(up, ['backing-image', 'upload', 'dl', imageFile]).stderr, /backing image dl is not an upload \(its source is download\)/);
  mustZebu(up, ['backing-image', 'delete', 'dl']);
  assert.match(zebu(up, ['backing-image', 'create', 'x', '--from-volume', 'nope', '--snapshot', 's1']).stderr, /volume nope not found/);

  // Every file of an upload lost, and no backup target: nothing to fetch it from, the status says why.
  const spoil = (name: string, on: { api: string; token: string }): void => {
    for (const f of mustZebuJson(on, ['backing-image', 'get', name]).files as FileRow[]) fs.writeFileSync(fileOn(name, f.disk), Buffer.alloc(16));
  };
  spoil('up3', up);
  // The agent checks files when it starts and periodically; a restart makes it look now.
  await stopZebuUp(up);
  up = await startZebuUp({ dataDir, disks: 3 });
  const lost = await waitFor('the lost upload to say why', () => {
    const i = mustZebuJson(up, ['backing-image', 'get', 'up3']);
    return /cannot be fetched again: the image was uploaded and no copy of it is kept in the backup target/.test(i.message ?? '') ? i : undefined;
  }, 60_000);
  assert.equal(lost.state, 'failed');
  // It can be uploaded again.
  mustZebu(up, ['backing-image', 'upload', 'up3', imageFile]);
  await waitFor('up3 ready again', () => mustZebuJson(up, ['backing-image', 'get', 'up3']).state === 'ready' || undefined);

  // Export: a snapshot of an attached volume; what is written after it is not in the image.
  mustZebu(up, ['volume', 'create', 'src', '--size', '16MiB', '--replicas', '2']);
  const uri = mustZebu(up, ['volume', 'attach', 'src']).trim();
  mustRun('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 0 3M', '-c', 'write -P 0x6b 9M 1M', uri]);
  mustZebu(up, ['snapshot', 'create', 'src', 's1']);
  const snapshotView = path.join(work, 'src-s1.raw');
  mustRun('nbdcopy', [uri, snapshotView]);
  const atSnapshot = fs.readFileSync(snapshotView);
  mustRun('qemu-io', ['-f', 'raw', '-c', 'write -P 0x7c 0 1M', uri]);
  assert.match(zebu(up, ['backing-image', 'create', 'x', '--from-volume', 'src', '--snapshot', 'nope']).stderr, /volume src has no snapshot nope/);
  const exported = mustZebuJson(up, ['backing-image', 'create', 'ex1', '--from-volume', 'src', '--snapshot', 's1', '--min-copies', '1']);
  assert.equal(exported.state, 'ready');
  assert.equal(exported.checksum, sha512(atSnapshot));
  const exportedOn = (exported.files as FileRow[]).find((f) => f.state === 'ready')!.disk;
  assert.ok(fs.readFileSync(fileOn('ex1', exportedOn)).equals(atSnapshot));
  // A volume on the exported image reads as the snapshot.
  mustZebu(up, ['volume', 'create', 'clone', '--backing-image', 'ex1', '--replicas', '1']);
  const cloneUri = mustZebu(up, ['volume', 'attach', 'clone'], { timeoutMs: 120_000 }).trim();
  const cloneView = path.join(work, 'clone.raw');
  mustRun('nbdcopy', [cloneUri, cloneView]);
  assert.ok(fs.readFileSync(cloneView).equals(atSnapshot), 'the clone reads as snapshot s1');

  // Restore: a backup of the volume becomes an image holding the volume's bytes at the backup.
  const targetDir = path.join(work, 'backups');
  fs.mkdirSync(targetDir);
  mustZebu(up, ['backup-target', 'set', `file://${targetDir}`]);
  const nowView = path.join(work, 'src-now.raw');
  mustRun('nbdcopy', [uri, nowView]);
  const atBackup = fs.readFileSync(nowView);
  const backup = mustZebuJson(up, ['backup', 'create', 'src']);
  assert.equal(backup.state, 'completed');
  assert.match(zebu(up, ['backing-image', 'create', 'x', '--from-backup', 'backup-nope']).stderr, /backup backup-nope not found/);
  const restoredImage = mustZebuJson(up, ['backing-image', 'create', 'rs1', '--from-backup', backup.name, '--min-copies', '1']);
  assert.equal(restoredImage.state, 'ready', JSON.stringify(restoredImage));
  assert.equal(restoredImage.checksum, sha512(atBackup));
  assert.equal(restoredImage.sizeBytes, 16 * MiB);

  // With a target set, uploads and exports get their own backup by themselves (up1 asked for too).
  const saved = await waitFor('the upload backed up', () => mustZebuJson(up, ['backing-image', 'get', 'up3']).backup ?? undefined, 60_000);
  assert.equal(saved.targetUrl, `file://${targetDir}`);
  assert.match(mustZebu(up, ['backing-image', 'backup', 'up1']), /backing image up1 is in the backup target file:\/\/.* as image-[0-9a-f]{40}/);
  await waitFor('the export backed up', () => mustZebuJson(up, ['backing-image', 'get', 'ex1']).backup ?? undefined, 60_000);
  assert.ok(!mustZebuJson(up, ['backup', 'list']).some((b: { volume: string }) => b.volume.startsWith('Image.')), 'image backups are not volume backups');
  assert.match(zebu(up, ['backing-image', 'backup', 'nope']).stderr, /backing image nope not found/);

  // Every file of the upload lost again: now it comes back from its backup.
  spoil('up3', up);
  await stopZebuUp(up);
  up = await startZebuUp({ dataDir, disks: 3 });
  const back = await waitFor('up3 restored from its backup', () => {
    const i = mustZebuJson(up, ['backing-image', 'get', 'up3']);
    return i.state === 'ready' && (i.files as FileRow[]).some((f) => f.state === 'ready' && f.from === 'backup') ? i : undefined;
  }, 90_000);
  assert.equal(back.checksum, sha512(image));
  const restoredOn = (back.files as FileRow[]).find((f) => f.from === 'backup')!.disk;
  assert.ok(fs.readFileSync(fileOn('up3', restoredOn)).equals(image), 'the restored file holds the upload');
  const reasons = mustZebuJson<{ reason: string }[]>(up, ['events']).map((e) => e.reason);
  for (const r of ['BackingImageBackedUp', 'BackingImageLost', 'BackingImageRestored']) assert.ok(reasons.includes(r), r);
});
