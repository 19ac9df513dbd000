/**
 * Acceptance against real NBD clients: qemu-io, qemu-img, nbdcopy, nbdinfo, fio, and ext4 on an
 * nbdfuse file through a loop device. Three replica processes + `zebu volume serve`.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { spawn } from 'node:child_process';
import { tempDir } from '../support/tmp.ts';
import { startVolume, replicaDigest, run, mustRun } from '../support/volume-cluster.ts';

const SIZE = 64 * 1024 * 1024;

function sha256File(file: string): string {
  return crypto.createHash('sha256').update(fs.readFileSync(file)).digest('hex');
}

test('real NBD clients on a 3-replica volume', async (t) => {
  const dir = tempDir(t);
  const vol = await startVolume(t, { dir, replicas: 3, sizeBytes: SIZE });
  const ref = path.join(dir, 'ref.img');
  fs.writeFileSync(ref, Buffer.alloc(0));
  fs.truncateSync(ref, SIZE);

  await t.test('nbdinfo shows size, block sizes and flags', () => {
    const info = JSON.parse(mustRun('nbdinfo', ['--json', vol.nbd]));
    const exp = info.exports[0];
    assert.equal(exp['export-size'], SIZE);
    assert.equal(exp.block_size_minimum, 512);
    assert.equal(exp.block_size_preferred, 4096);
    assert.equal(exp.block_size_maximum, 32 * 1024 * 1024);
    for (const flag of ['can_flush', 'can_fua', 'can_trim', 'can_zero', 'can_fast_zero', 'can_multi_conn', 'can_cache', 'can_df']) {
      assert.equal(exp[flag], true, flag);
    }
    assert.equal(exp.is_read_only, false);
    assert.ok(exp.contexts.includes('base:allocation'));
    assert.equal(info.protocol, 'newstyle-fixed');
  });

  // The same commands go to the volume (TCP, then UNIX socket) and to a local reference image.
  const tcpOps = ['write -P 0x5a 0 1M', 'write -P 0x33 3M 512k', 'write -P 0x11 5000 3000', 'write -z 200k 64k', 'discard 3M 128k', 'flush'];
  const unixOps = ['write -P 0x77 10M 2M', 'write -P 0x78 12M 4k', 'discard 11M 256k', 'write -z 12M 4k', 'flush'];
  await t.test('qemu-io writes, zeroes, discards and verifies over TCP and the UNIX socket', () => {
    const asArgs = (ops: string[]) => ops.flatMap((c) => ['-c', c]);
    mustRun('qemu-io', ['-f', 'raw', ...asArgs(tcpOps), vol.nbd]);
    mustRun('qemu-io', ['-f', 'raw', ...asArgs(unixOps), vol.nbdUnix]);
    mustRun('qemu-io', ['-f', 'raw', ...asArgs([...tcpOps, ...unixOps]), ref]);
    const verify = ['read -P 0x5a 0 4k', 'read -P 0x11 5000 3000', 'read -P 0x5a 8000 196800', 'read -P 0 200k 64k', 'read -P 0x5a 264k 760k', 'read -P 0 3M 128k', 'read -P 0x33 3200k 384k', 'read -P 0x77 10M 1M', 'read -P 0 11M 256k', 'read -P 0 12M 4k'];
    const out = mustRun('qemu-io', ['-f', 'raw', ...asArgs(verify), vol.nbdUnix]);
    assert.doesNotMatch(out, /Pattern verification failed|error/i);
    const bad = run('qemu-io', ['-f', 'raw', '-c', 'read -P 0x99 0 4k', vol.nbd]);
    assert.match(bad.stdout + bad.stderr, /Pattern verification failed/, 'a wrong pattern is detected (the check can fail)');
  });

  await t.test('qemu-img compare against the reference image', () => {
    mustRun('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', ref, vol.nbd]);
  });

  await t.test('nbdinfo --map shows data after writes and holes after trim', () => {
    const map = JSON.parse(mustRun('nbdinfo', ['--map', '--json', vol.nbd])) as { offset: number; length: number; type: number }[];
    const typeAt = (off: number) => map.find((e) => e.offset <= off && off < e.offset + e.length)!.type;
    assert.equal(typeAt(0), 0, 'written: data');
    assert.equal(typeAt(200 * 1024), 3, 'write -z: hole,zero');
    assert.equal(typeAt(3 * 1024 * 1024), 3, 'discarded: hole,zero');
    assert.equal(typeAt(3 * 1024 * 1024 + 200 * 1024), 0, 'data after the discarded range');
    assert.equal(typeAt(40 * 1024 * 1024), 3, 'never written: hole,zero');
    const total = map.reduce((s, e) => s + e.length, 0);
    assert.equal(total, SIZE);
  });

  await t.test('nbdcopy in and out keeps the sha256', () => {
    const src = path.join(dir, 'src.img');
    const out = path.join(dir, 'out.img');
    const data = crypto.randomBytes(SIZE);
    data.fill(0, 8 << 20, 16 << 20); // a zero stretch: nbdcopy may send it as zeroes
    fs.writeFileSync(src, data);
    mustRun('nbdcopy', [src, vol.nbd]);
    mustRun('nbdcopy', [vol.nbdUnix, out]);
    assert.equal(sha256File(out), sha256File(src));
  });

  await t.test('fio nbd engine with crc32c verify: 0 errors', () => {
    const r = run('fio', [
      '--name=verify', '--ioengine=nbd', `--uri=${vol.nbd}`, '--rw=randwrite', '--bsrange=512-256k', '--size=48M',
      '--iodepth=16', '--verify=crc32c', '--do_verify=1', '--verify_fatal=1', '--verify_state_save=0', '--output-format=json',
    ], { timeoutMs: 300_000 });
    assert.equal(r.status, 0, r.stderr);
    const job = JSON.parse(r.stdout.slice(r.stdout.indexOf('{'))).jobs[0];
    assert.equal(job.error, 0);
    assert.ok(job.write.io_bytes >= 48 * 1024 * 1024);
    assert.ok(job.read.io_bytes > 0, 'verify read back');
  });

  await t.test('replicas are identical', async () => {
    const digests = await Promise.all(vol.replicas.map((r) => replicaDigest(r.port, vol.secret, vol.epoch, SIZE)));
    assert.equal(new Set(digests).size, 1, digests.join(' '));
  });

  await t.test('ext4 on an nbdfuse file through a loop device', { skip: process.getuid?.() !== 0 || !fs.existsSync('/dev/fuse') ? 'needs root and /dev/fuse' : false }, async () => {
    const fuseDir = path.join(dir, 'fuse');
    const mnt = path.join(dir, 'mnt');
    fs.mkdirSync(fuseDir);
    fs.mkdirSync(mnt);
    const fuse = spawn('nbdfuse', [path.join(fuseDir, 'disk'), vol.nbd], { stdio: 'ignore' });
    let loop = '';
    try {
      const deadline = Date.now() + 10_000;
      while (!fs.existsSync(path.join(fuseDir, 'disk')) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 100));
      loop = mustRun('losetup', ['-f', '--show', path.join(fuseDir, 'disk')]).trim();
      mustRun('mkfs.ext4', ['-q', '-F', loop]);
      mustRun('mount', [loop, mnt]);
      const sums = new Map<string, string>();
      for (let i = 0; i < 40; i++) {
        const sub = path.join(mnt, `d${i % 5}`);
        fs.mkdirSync(sub, { recursive: true });
        const body = crypto.randomBytes(1000 + i * 7919);
        const file = path.join(sub, `f${i}`);
        fs.writeFileSync(file, body);
        sums.set(file, crypto.createHash('sha256').update(body).digest('hex'));
      }
      mustRun('sync', []);
      mustRun('umount', [mnt]);
      mustRun('mount', [loop, mnt]);
      for (const [file, sum] of sums) assert.equal(sha256File(file), sum, file);
      mustRun('umount', [mnt]);
      const fsck = run('fsck.ext4', ['-n', '-f', loop]);
      assert.equal(fsck.status, 0, fsck.stdout + fsck.stderr);
    } finally {
      run('umount', [mnt]);
      if (loop) run('losetup', ['-d', loop]);
      run('fusermount3', ['-u', fuseDir]);
      fuse.kill();
    }
  });

  await t.test('a snapshot is identical on all replicas and the volume reads the same', async () => {
    const { controlRequest } = await import('../../src/protocol/control-channel.ts');
    const before = await replicaDigest(vol.replicas[0].port, vol.secret, vol.epoch, SIZE);
    await controlRequest(vol.controlSocket, 'POST', '/v1/snapshots', { name: 'snap1' });
    const snaps = await Promise.all(vol.replicas.map((r) => replicaDigest(r.port, vol.secret, vol.epoch, SIZE, 'snap1')));
    assert.deepEqual(snaps, [before, before, before]);
    const live = await Promise.all(vol.replicas.map((r) => replicaDigest(r.port, vol.secret, vol.epoch, SIZE)));
    assert.deepEqual(live, [before, before, before]);
    const list = (await controlRequest(vol.controlSocket, 'GET', '/v1/snapshots')) as { name: string }[];
    assert.deepEqual(list.map((s) => s.name), ['snap1']);
    mustRun('qemu-io', ['-f', 'raw', '-c', 'write -P 0x42 0 64k', vol.nbd]);
    assert.equal(await replicaDigest(vol.replicas[1].port, vol.secret, vol.epoch, SIZE, 'snap1'), before, 'snapshot is immutable');
  });

  await t.test('SIGTERM stops the volume cleanly', async () => {
    await vol.stop();
    assert.equal(await vol.volumeExited, 0);
  });
});
