/**
 * A real file system on a `zebu up` volume (ext4 on an nbdfuse file through a loop device):
 * files are written while a replica process is SIGKILLed; the volume heals itself (a delta
 * rebuild of the same replica once the agent restarted it); the file system checks clean, every file reads back as written, and the replicas are identical.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { readSecretFile } from '../../src/protocol/auth.ts';
import { replicaDigest, run, mustRun } from '../support/volume-cluster.ts';
import { startZebuUp, stopZebuUp, mustZebu, mustZebuJson, zebuDataDir, waitFor } from '../support/zebu-up.ts';
import { loopOnVolume } from '../support/loop-device.ts';

const MiB = 1024 * 1024;
const SIZE = 256 * MiB;

function sha256(data: Buffer): string {
  return crypto.createHash('sha256').update(data).digest('hex');
}

test('ext4 on a zebu up volume: a replica SIGKILLed while files are written; healed, fsck clean, files intact', {
  skip: process.getuid?.() !== 0 || !fs.existsSync('/dev/fuse') ? 'needs root and /dev/fuse' : false,
}, async (t) => {
  const dataDir = zebuDataDir(t);
  const up = await startZebuUp({ dataDir });
  t.after(() => stopZebuUp(up));
  mustZebu(up, ['volume', 'create', 'fs', '--size', String(SIZE), '--replicas', '3']);
  const uri = mustZebu(up, ['volume', 'attach', 'fs']).trim();
  const { loop, mnt, close } = await loopOnVolume(uri, path.dirname(dataDir));
  try {
    mustRun('mkfs.ext4', ['-q', '-F', loop]);
    mustRun('mount', [loop, mnt]);

    const sums = new Map<string, string>();
    const victim = mustZebuJson(up, ['replica', 'list', '--volume', 'fs'])[1];
    for (let i = 0; i < 60; i++) {
      const body = crypto.randomBytes(256 * 1024 + i * 4099);
      const file = path.join(mnt, `f${i}`);
      fs.writeFileSync(file, body);
      sums.set(file, sha256(body));
      if (i === 20) process.kill(victim.pid, 'SIGKILL');
      if (i % 10 === 9) mustRun('sync', []);
    }
    mustRun('sync', []);
    // The agent restarts the killed replica process; the engine brings it back by a delta
    // rebuild (the default replica-replenishment-wait-seconds keeps it): the same replica, RW.
    await waitFor('the delta rebuild reported', () => {
      const events = mustZebuJson(up, ['events', '--volume', 'fs']);
      return events.some((e: { reason: string; message: string }) => e.reason === 'ReplicaRebuilt' && /delta/.test(e.message)) ? true : undefined;
    }, 120_000, 250);
    await waitFor('healthy with the same replicas', () => {
      const v = mustZebuJson(up, ['volume', 'get', 'fs']);
      return v.robustness === 'healthy' && v.replicas.some((r: { name: string }) => r.name === victim.name)
        && v.replicas.every((r: { mode: string; failedAt: string | null }) => r.mode === 'RW' && r.failedAt === null) ? v : undefined;
    }, 120_000, 250);

    mustRun('umount', [mnt]);
    const fsck = run('fsck.ext4', ['-n', '-f', loop]);
    assert.equal(fsck.status, 0, fsck.stdout + fsck.stderr);
    mustRun('mount', [loop, mnt]);
    for (const [file, sum] of sums) assert.equal(sha256(fs.readFileSync(file)), sum, file);
    mustRun('umount', [mnt]);
  } finally {
    close();
  }
  const secret = readSecretFile(path.join(dataDir, 'secret'));
  const epoch = mustZebuJson(up, ['volume', 'get', 'fs']).epoch;
  const replicas = mustZebuJson(up, ['replica', 'list', '--volume', 'fs']);
  const digests = await Promise.all(replicas.map((r: { address: string }) => replicaDigest(Number(r.address.split(':')[1]), secret, epoch, SIZE)));
  assert.equal(new Set(digests).size, 1, digests.join(' '));
});
