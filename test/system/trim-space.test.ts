/**
 * TRIM gives space back: ext4 on a `zebu up` volume (nbdfuse file, loop device), a file written
 * and removed, then `fstrim`: the replica directories hold less on disk (du), by about the file's
 * size; what is still there reads back; the replicas are identical. WRITE_ZEROES with NO_HOLE
 * (qemu-io `write -z` without -u) zeros without giving space back; without NO_HOLE it gives it back.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { readSecretFile } from '../../src/protocol/auth.ts';
import { holePunchUnavailable } from '../../src/replica/native-file-ops.ts';
import { replicaDigest, run, mustRun } from '../support/volume-cluster.ts';
import { startZebuUp, stopZebuUp, mustZebu, mustZebuJson, zebuDataDir } from '../support/zebu-up.ts';
import { loopOnVolume } from '../support/loop-device.ts';

const MiB = 1024 * 1024;
const SIZE = 256 * MiB;

/** Bytes the directory's files take on disk (du: allocated blocks, not sizes). */
function diskUsage(dir: string): number {
  return Number(mustRun('du', ['-s', '--block-size=1', dir]).split(/\s+/)[0]);
}

function sha256(data: Buffer): string {
  return crypto.createHash('sha256').update(data).digest('hex');
}

test('fstrim on ext4 in a volume gives the replicas\' disk space back; files left intact; replicas identical', {
  skip: process.getuid?.() !== 0 || !fs.existsSync('/dev/fuse') ? 'needs root and /dev/fuse' : false,
}, async (t) => {
  assert.equal(holePunchUnavailable(), null, 'the hole-punching addon is built (scripts/build-native.sh)');
  const dataDir = zebuDataDir(t);
  const up = await startZebuUp({ dataDir });
  t.after(() => stopZebuUp(up));
  mustZebu(up, ['volume', 'create', 'fs', '--size', String(SIZE), '--replicas', '2']);
  const uri = mustZebu(up, ['volume', 'attach', 'fs']).trim();
  const replicas = mustZebuJson<{ name: string; dataPath: string; address: string }[]>(up, ['replica', 'list', '--volume', 'fs']);
  assert.equal(replicas.length, 2);
  const { loop, mnt, close } = await loopOnVolume(uri, path.dirname(dataDir));
  const keep = crypto.randomBytes(3 * MiB + 12345);
  try {
    mustRun('mkfs.ext4', ['-q', '-F', '-E', 'nodiscard', loop]);
    mustRun('mount', [loop, mnt]);
    fs.writeFileSync(path.join(mnt, 'keep'), keep);
    fs.writeFileSync(path.join(mnt, 'big'), crypto.randomBytes(96 * MiB));
    mustRun('sync', []);
    const full = replicas.map((r) => diskUsage(r.dataPath));
    for (const used of full) assert.ok(used > 96 * MiB, `a replica holds the file: ${used}`);

    fs.rmSync(path.join(mnt, 'big'));
    mustRun('sync', []);
    const trimmed = mustRun('fstrim', ['-v', mnt]);
    assert.match(trimmed, /trimmed/);
    mustRun('sync', []);
    const after = replicas.map((r) => diskUsage(r.dataPath));
    for (let i = 0; i < replicas.length; i++) {
      assert.ok(full[i] - after[i] > 88 * MiB, `replica ${replicas[i].name}: ${full[i]} -> ${after[i]} bytes on disk after fstrim`);
    }
    assert.equal(sha256(fs.readFileSync(path.join(mnt, 'keep'))), sha256(keep));
    mustRun('umount', [mnt]);
    const fsck = run('fsck.ext4', ['-n', '-f', loop]);
    assert.equal(fsck.status, 0, fsck.stdout + fsck.stderr);
  } finally {
    close();
  }

  // WRITE_ZEROES (qemu-io `write -z`): QEMU asks for NO_HOLE unless told it may unmap (-u).
  // With NO_HOLE the range reads zeros but stays allocated; without, it gives space back.
  const base = 200 * MiB;
  const qemuIo = (...commands: string[]): string => mustRun('qemu-io', ['-f', 'raw', ...commands.flatMap((c) => ['-c', c]), uri]);
  qemuIo(`write -P 0x5a ${base} ${32 * MiB}`, 'flush');
  const written = replicas.map((r) => diskUsage(r.dataPath));
  assert.doesNotMatch(qemuIo(`write -z ${base} ${16 * MiB}`, 'flush', `read -P 0 ${base} ${16 * MiB}`), /fail|error/i);
  const noHole = replicas.map((r) => diskUsage(r.dataPath));
  assert.doesNotMatch(qemuIo(`write -z -u ${base + 16 * MiB} ${16 * MiB}`, 'flush', `read -P 0 ${base + 16 * MiB} ${16 * MiB}`), /fail|error/i);
  const punched = replicas.map((r) => diskUsage(r.dataPath));
  for (let i = 0; i < replicas.length; i++) {
    assert.ok(Math.abs(written[i] - noHole[i]) < 2 * MiB, `NO_HOLE kept the space: ${written[i]} -> ${noHole[i]}`);
    assert.ok(noHole[i] - punched[i] > 15 * MiB, `WRITE_ZEROES gave 16 MiB back: ${noHole[i]} -> ${punched[i]}`);
  }
  const view = mustZebuJson(up, ['volume', 'get', 'fs']);
  const secret = readSecretFile(path.join(dataDir, 'secret'));
  const now = mustZebuJson<{ address: string }[]>(up, ['replica', 'list', '--volume', 'fs']);
  const digests = await Promise.all(now.map((r) => replicaDigest(Number(r.address.split(':')[1]), secret, view.epoch, SIZE)));
  assert.equal(new Set(digests).size, 1, digests.join(' '));
});
