/**
 * Volumes on a backing image through `zebu up`, the CLI and real clients. The image is a VM
 * template: an ext4 file system with files in it, served by a local HTTP server that counts its
 * requests. A volume on it reads the template (qemu-io, nbdcopy), mounts it through nbdfuse and a
 * loop device, and takes new files while one replica process is SIGKILLed (brought back by a
 * delta rebuild) and then another is replaced by a new one (a full rebuild: only what differs
 * from the image is copied). Copies of the image onto the replicas' disks are made from a ready
 * file, never downloaded again. fsck is clean, every file reads back, the replicas are identical,
 * the image files never change, and a second volume on the image still sees the pristine
 * template. A backup records the image and restores without it. The image's file under one
 * replica changed on disk: that replica is replaced and the file copied again. Bad input and
 * deleting an image in use are refused with the reason.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { readSecretFile } from '../../src/protocol/auth.ts';
import { replicaDigest, run, mustRun } from '../support/volume-cluster.ts';
import { startZebuUp, stopZebuUp, zebu, mustZebu, mustZebuJson, zebuDataDir, waitFor } from '../support/zebu-up.ts';
import { loopOnVolume } from '../support/loop-device.ts';

const MiB = 1024 * 1024;
const IMAGE_BYTES = 64 * MiB;

/** An HTTP server for the image file: one line per request on stdout. */
const SERVER = `
const http = require('node:http');
const fs = require('node:fs');
const s = http.createServer((req, res) => {
  process.stdout.write('req ' + req.url + '\\n');
  if (req.url !== '/template.raw') { res.writeHead(404).end('not here'); return; }
  res.writeHead(200, { 'content-length': fs.statSync(process.env.IMAGE_FILE).size });
  fs.createReadStream(process.env.IMAGE_FILE).pipe(res);
});
s.listen(0, '127.0.0.1', () => process.stdout.write('port ' + s.address().port + '\\n'));
`;

function sha(data: Buffer, algorithm = 'sha256'): string {
  return crypto.createHash(algorithm).update(data).digest('hex');
}

interface ReplicaRow {
  name: string;
  pid: number | null;
  address: string | null;
  diskId: string;
  mode: string | null;
  failedAt: string | null;
}

test('a volume on a backing image: the template read and mounted, replicas killed and replaced, files intact, the image unchanged', {
  skip: process.getuid?.() !== 0 || !fs.existsSync('/dev/fuse') ? 'needs root and /dev/fuse' : false,
}, async (t) => {
  const dataDir = zebuDataDir(t);
  const work = path.dirname(dataDir);
  // The template: ext4 made from a directory (no mount needed), with a text file and random data.
  const templateDir = path.join(work, 'template');
  fs.mkdirSync(path.join(templateDir, 'etc'), { recursive: true });
  fs.writeFileSync(path.join(templateDir, 'etc', 'hostname'), 'template\n');
  const payload = crypto.randomBytes(5 * MiB + 12345);
  fs.writeFileSync(path.join(templateDir, 'payload.bin'), payload);
  const imageFile = path.join(work, 'template.raw');
  mustRun('mkfs.ext4', ['-q', '-F', '-d', templateDir, imageFile, `${IMAGE_BYTES / MiB}M`]);
  const image = fs.readFileSync(imageFile);
  const imageSum = sha(image, 'sha512');

  const server = spawn(process.execPath, ['-e', SERVER], { stdio: ['ignore', 'pipe', 'inherit'], env: { ...process.env, IMAGE_FILE: imageFile } });
  t.after(() => server.kill());
  let output = '';
  server.stdout.on('data', (d) => (output += d));
  const port = await waitFor('the image server', () => /^port (\d+)$/m.exec(output)?.[1], 10_000, 20);
  const requests = async (): Promise<number> => {
    await new Promise((r) => setTimeout(r, 100));
    return output.split('\n').filter((l) => l === 'req /template.raw').length;
  };

  let up = await startZebuUp({ dataDir, disks: 3 });
  t.after(() => stopZebuUp(up));
  // One copy asked for: the copies on the replicas' disks are made because the replicas need them.
  mustZebu(up, ['backing-image', 'create', 'tmpl', '--url', `http://127.0.0.1:${port}/template.raw`, '--checksum', imageSum, '--min-copies', '1']);

  // Bad input: clear errors, nothing created.
  assert.match(zebu(up, ['volume', 'create', 'v0', '--backing-image', 'nope']).stderr, /backing image nope not found/);
  assert.match(zebu(up, ['volume', 'create', 'v0', '--backing-image', 'tmpl', '--size', '32MiB']).stderr, /backing image tmpl is 67108864 bytes; the volume must be at least that/);
  assert.match(zebu(up, ['volume', 'create', 'v0', '--backing-image', 'Bad Name']).stderr, /backingImage/);

  const created = mustZebuJson(up, ['volume', 'create', 'v1', '--backing-image', 'tmpl', '--replicas', '2']);
  assert.equal(created.sizeBytes, IMAGE_BYTES, 'the size defaults to the image\'s');
  assert.deepEqual(created.backingImage, { name: 'tmpl', checksum: imageSum });
  const deleting = zebu(up, ['backing-image', 'delete', 'tmpl']);
  assert.equal(deleting.status, 1);
  assert.match(deleting.stderr, /backing image tmpl is in use by volume v1: delete it first/);

  const uri = mustZebu(up, ['volume', 'attach', 'v1'], { timeoutMs: 180_000 }).trim();
  const files = mustZebuJson(up, ['backing-image', 'get', 'tmpl']).files as { disk: string; state: string }[];
  const replicas = (): ReplicaRow[] => mustZebuJson(up, ['replica', 'list', '--volume', 'v1']);
  for (const r of replicas()) assert.ok(files.some((f) => f.disk === r.diskId && f.state === 'ready'), `a ready file on ${r.diskId}, where replica ${r.name} is`);
  assert.equal(await requests(), 1, 'downloaded once; the other copy was made from the ready file');

  // The volume reads the template.
  const whole = path.join(work, 'whole.raw');
  mustRun('nbdcopy', [uri, whole]);
  assert.equal(sha(fs.readFileSync(whole)), sha(image), 'the volume reads as the image');
  fs.rmSync(whole);
  mustRun('qemu-io', ['-f', 'raw', '-c', 'read -P 0 60M 4M', uri]);

  const { loop, mnt, close } = await loopOnVolume(uri, work);
  const sums = new Map<string, string>();
  try {
    mustRun('mount', [loop, mnt]);
    assert.equal(fs.readFileSync(path.join(mnt, 'etc', 'hostname'), 'utf8'), 'template\n');
    assert.equal(sha(fs.readFileSync(path.join(mnt, 'payload.bin'))), sha(payload));
    fs.writeFileSync(path.join(mnt, 'etc', 'hostname'), 'v1\n');

    // New files while one replica process is SIGKILLed: the agent restarts it, a delta rebuild
    // brings it back.
    const victim = replicas()[1];
    const write = (i: number): void => {
      const body = crypto.randomBytes(200 * 1024 + i * 4099);
      const file = path.join(mnt, `f${i}`);
      fs.writeFileSync(file, body);
      sums.set(file, sha(body));
    };
    for (let i = 0; i < 30; i++) {
      write(i);
      if (i === 10) process.kill(victim.pid!, 'SIGKILL');
      if (i % 10 === 9) mustRun('sync', []);
    }
    mustRun('sync', []);
    await waitFor('the delta rebuild', () => {
      const events = mustZebuJson(up, ['events', '--volume', 'v1']);
      return events.some((e: { reason: string; message: string }) => e.reason === 'ReplicaRebuilt' && /delta/.test(e.message)) ? true : undefined;
    }, 120_000, 250);

    // Now one replaced: no waiting for a replica to come back, so the killed one is failed and a
    // new one takes its place.
    await waitFor('healthy', () => mustZebuJson(up, ['volume', 'get', 'v1']).robustness === 'healthy' || undefined, 120_000, 250);
    mustZebu(up, ['setting', 'set', 'replica-replenishment-wait-seconds', '0']);
    const before = replicas();
    const replaced = before[0];
    process.kill(replaced.pid!, 'SIGKILL');
    for (let i = 30; i < 45; i++) write(i);
    mustRun('sync', []);
    const healed = await waitFor('a new replica rebuilt', () => {
      const now = replicas();
      const fresh = now.filter((r) => !before.some((b) => b.name === r.name));
      return fresh.length === 1 && fresh[0].mode === 'RW' && now.filter((r) => r.mode === 'RW' && r.failedAt === null).length === 2 ? fresh[0] : undefined;
    }, 180_000, 250);
    assert.ok(healed.diskId !== before[1].diskId, 'not next to the other replica');
    assert.equal(await requests(), 1, 'never downloaded again');

    mustRun('umount', [mnt]);
    const fsck = run('fsck.ext4', ['-n', '-f', loop]);
    assert.equal(fsck.status, 0, fsck.stdout + fsck.stderr);
    mustRun('mount', [loop, mnt]);
    for (const [file, sum] of sums) assert.equal(sha(fs.readFileSync(file)), sum, file);
    assert.equal(fs.readFileSync(path.join(mnt, 'etc', 'hostname'), 'utf8'), 'v1\n');
    mustRun('umount', [mnt]);
  } finally {
    close();
  }

  // The new replica holds what differs from the image, not a copy of it; all replicas identical.
  const secret = readSecretFile(path.join(dataDir, 'secret'));
  const epoch = mustZebuJson(up, ['volume', 'get', 'v1']).epoch;
  const live = replicas().filter((r) => r.failedAt === null && r.address !== null);
  assert.equal(live.length, 2);
  const digests = await Promise.all(live.map((r) => replicaDigest(Number(r.address!.split(':')[1]), secret, epoch, IMAGE_BYTES)));
  assert.equal(new Set(digests).size, 1, digests.join(' '));
  // Exit status 1 if any region differs between the replicas.
  mustZebu(up, ['volume', 'verify', 'v1'], { timeoutMs: 120_000 });

  // The image's files never changed; a second volume on it sees the pristine template.
  const disks = mustZebuJson<{ name: string; path: string }[]>(up, ['disk', 'list']);
  for (const f of mustZebuJson(up, ['backing-image', 'get', 'tmpl']).files as { disk: string; state: string }[]) {
    const file = path.join(disks.find((d) => d.name === f.disk)!.path, 'backing-images', 'tmpl', 'image.raw');
    assert.equal(sha(fs.readFileSync(file), 'sha512'), imageSum, `${f.disk}: the image is only read`);
  }
  mustZebu(up, ['volume', 'create', 'v2', '--backing-image', 'tmpl', '--replicas', '1']);
  const uri2 = mustZebu(up, ['volume', 'attach', 'v2'], { timeoutMs: 180_000 }).trim();
  const copy2 = path.join(work, 'v2.raw');
  mustRun('nbdcopy', [uri2, copy2]);
  assert.equal(sha(fs.readFileSync(copy2)), sha(image), 'v1\'s writes are not in the image');
  fs.rmSync(copy2);
  mustZebu(up, ['volume', 'detach', 'v2']);
  mustZebu(up, ['volume', 'delete', 'v2']);

  // A backup of v1 records the image and holds every byte (the image's too): its restore is a
  // volume of its own that reads as v1.
  const targetDir = path.join(work, 'backups');
  fs.mkdirSync(targetDir);
  mustZebu(up, ['backup-target', 'set', `file://${targetDir}`]);
  const expected = path.join(work, 'v1.raw');
  mustRun('nbdcopy', [uri, expected]);
  const expectedSum = sha(fs.readFileSync(expected));
  fs.rmSync(expected);
  const backup = mustZebuJson(up, ['backup', 'create', 'v1']);
  assert.equal(backup.state, 'completed', JSON.stringify(backup));
  assert.deepEqual(backup.backingImage, { name: 'tmpl', checksum: imageSum });
  assert.match(mustZebu(up, ['backup', 'get', backup.name]), /backing image:\s+tmpl \(sha512 [0-9a-f]{16}…; its bytes are in the backup\)/);
  assert.match(zebu(up, ['volume', 'create', 'r0', '--from-backup', backup.name, '--backing-image', 'tmpl']).stderr, /restore it without backingImage/);
  const restored = mustZebuJson(up, ['backup', 'restore', backup.name, '--to', 'r1', '--replicas', '1']);
  assert.equal(restored.restore.state, 'completed');
  assert.equal(restored.backingImage, null);
  const uri3 = mustZebu(up, ['volume', 'attach', 'r1'], { timeoutMs: 180_000 }).trim();
  const copy3 = path.join(work, 'r1.raw');
  mustRun('nbdcopy', [uri3, copy3]);
  assert.equal(sha(fs.readFileSync(copy3)), expectedSum, 'the restore reads as v1');
  fs.rmSync(copy3);

  // The image's file under one of v1's replicas changes on disk: found when the agent checks it
  // (at its start here), that replica is replaced, and the file copied there again once unused.
  const victimReplica = replicas().filter((r) => r.failedAt === null)[0];
  const spoiled = path.join(disks.find((d) => d.name === victimReplica.diskId)!.path, 'backing-images', 'tmpl', 'image.raw');
  const fd = fs.openSync(spoiled, 'r+');
  fs.writeSync(fd, Buffer.alloc(4096, 0xee), 0, 4096, 1024 * 1024);
  fs.closeSync(fd);
  await stopZebuUp(up);
  up = await startZebuUp({ dataDir, disks: 3 });
  await waitFor('the replica on the changed file replaced', () => {
    const events = mustZebuJson(up, ['events', '--volume', 'v1', '--limit', '1000']);
    return events.some((e: { reason: string; message: string }) => e.reason === 'ReplicaFailed' && e.message.includes(victimReplica.name) && /backing image tmpl on its disk .* failed/.test(e.message)) || undefined;
  }, 120_000, 250);
  await waitFor('healthy again on good files', () => {
    const v = mustZebuJson(up, ['volume', 'get', 'v1']);
    const image = mustZebuJson(up, ['backing-image', 'get', 'tmpl']);
    return v.robustness === 'healthy' && !v.replicas.some((r: { name: string }) => r.name === victimReplica.name)
      && (image.files as { state: string }[]).every((f) => f.state === 'ready') ? v : undefined;
  }, 180_000, 250);
  assert.equal(sha(fs.readFileSync(spoiled), 'sha512'), imageSum, 'the changed file was replaced by a good copy');
  mustZebu(up, ['volume', 'verify', 'v1'], { timeoutMs: 120_000 });
});
