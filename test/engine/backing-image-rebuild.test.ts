/**
 * Volumes on a backing image, through real processes: every replica reads its own copy of the
 * image as its base layer. A replica added later gets only what differs from the image (the
 * snapshots' and the live volume's changes, writes and zeroes over the image alike), and ends up
 * identical to the others — live data and every snapshot. A replica without the image, or with
 * another one, is refused.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { controlRequest } from '../../src/protocol/control-channel.ts';
import { startReplica, type ReplicaProcess } from '../support/replica-process.ts';
import { startVolume, replicaDigest, mustRun } from '../support/volume-cluster.ts';
import { tempDir } from '../support/tmp.ts';
import { waitFor } from '../support/zebu-up.ts';

const MiB = 1024 * 1024;

interface ReplicaRow {
  address: string;
  mode: 'RW' | 'WO' | 'ERR';
  reason: string | null;
}

function qemuIo(uri: string, ...commands: string[]): string {
  const out = mustRun('qemu-io', ['-f', 'raw', ...commands.flatMap((c) => ['-c', c]), uri], { timeoutMs: 120_000 });
  assert.doesNotMatch(out, /verification failed|error/i, out);
  return out;
}

/** Bytes a directory's files take on disk (sparse files count what is allocated). */
function allocatedBytes(dir: string): number {
  let sum = 0;
  for (const name of fs.readdirSync(dir)) sum += fs.statSync(path.join(dir, name)).blocks * 512;
  return sum;
}

test('a replica added to a volume on a backing image gets only what differs from the image, and is identical', async (t) => {
  const dir = tempDir(t);
  const size = 64 * MiB;
  const imageBytes = 40 * MiB + 4096 * 3; // not a whole number of regions
  const image = crypto.randomBytes(imageBytes);
  // Each replica has its own copy of the image, as on different disks.
  const imageOf = (i: number | string): string => {
    const file = path.join(dir, `image-${i}.raw`);
    if (!fs.existsSync(file)) fs.writeFileSync(file, image);
    return file;
  };
  const vol = await startVolume(t, { dir, replicas: 2, sizeBytes: size, replicaArgs: (i) => ['--backing', imageOf(i)] });
  const uri = vol.nbd;
  // s1: writes over the image and a zeroed range of it; s2: a trim of another range and data
  // past the image's end; the head: a write, and a zeroed range that s1 wrote.
  qemuIo(uri, 'write -P 0xa1 1M 3M', 'write -z 8M 4M', 'flush');
  await controlRequest(vol.controlSocket, 'POST', '/v1/snapshots', { name: 's1' });
  qemuIo(uri, 'discard 16M 4M', 'write -P 0xb2 44M 2M', 'flush');
  await controlRequest(vol.controlSocket, 'POST', '/v1/snapshots', { name: 's2' });
  qemuIo(uri, 'write -P 0xc3 30M 1M', 'write -z 1M 1M', 'flush');
  qemuIo(uri, 'read -P 0 8M 4M', 'read -P 0 16M 4M', 'read -P 0xa1 2M 2M', 'read -P 0 1M 1M', 'read -P 0xc3 30M 1M', 'read -P 0 50M 1M');
  const whole = path.join(dir, 'whole.raw');
  mustRun('nbdcopy', [uri, whole]);
  const content = fs.readFileSync(whole);
  assert.ok(content.subarray(20 * MiB, 30 * MiB).equals(image.subarray(20 * MiB, 30 * MiB)), 'an untouched range reads the image');
  assert.ok(content.subarray(31 * MiB, imageBytes).equals(image.subarray(31 * MiB)), 'up to its end');
  fs.rmSync(whole);

  // No image, or an image of another size: refused, the volume goes on.
  const bare = await startReplica({ dir: path.join(dir, 'bare'), sizeBytes: size, secretFile: path.join(dir, 'secret') });
  t.after(() => bare.child.kill('SIGKILL'));
  await assert.rejects(controlRequest(vol.controlSocket, 'POST', '/v1/replicas', { address: `127.0.0.1:${bare.port}` }), /backing image and the replica has none/);
  const otherImage = path.join(dir, 'other.raw');
  fs.writeFileSync(otherImage, image.subarray(0, imageBytes - 4096));
  const other = await startReplica({ dir: path.join(dir, 'other'), sizeBytes: size, secretFile: path.join(dir, 'secret'), extraArgs: ['--backing', otherImage] });
  t.after(() => other.child.kill('SIGKILL'));
  await assert.rejects(controlRequest(vol.controlSocket, 'POST', '/v1/replicas', { address: `127.0.0.1:${other.port}` }), /backing image has \d+ bytes, the volume's \d+/);

  const freshDir = path.join(dir, 'fresh');
  const fresh: ReplicaProcess = await startReplica({ dir: freshDir, sizeBytes: size, secretFile: path.join(dir, 'secret'), extraArgs: ['--backing', imageOf('fresh')] });
  t.after(() => fresh.child.kill('SIGKILL'));
  const address = `127.0.0.1:${fresh.port}`;
  await controlRequest(vol.controlSocket, 'POST', '/v1/replicas', { address });
  await waitFor('the new replica RW', async () => {
    const rows = (await controlRequest(vol.controlSocket, 'GET', '/v1/replicas')) as ReplicaRow[];
    const row = rows.find((r) => r.address === address)!;
    assert.notEqual(row.mode, 'ERR', row.reason ?? '');
    return row.mode === 'RW';
  }, 60_000, 50);

  qemuIo(uri, 'flush');
  const ports = [...vol.replicas.map((r) => r.port), fresh.port];
  for (const snapshot of [undefined, 's1', 's2']) {
    const digests = await Promise.all(ports.map((p) => replicaDigest(p, vol.secret, vol.epoch, size, snapshot)));
    assert.equal(new Set(digests).size, 1, `${snapshot ?? 'head'}: ${digests.join(' ')}`);
  }
  // What was copied: the regions (4 MiB) with data each layer changed — s1 one, s2 one (the
  // trim is only marked), the head two — not the 40 MiB image, nor a layer's unchanged regions.
  const copied = allocatedBytes(freshDir);
  assert.ok(copied < 18 * MiB, `the new replica holds ${copied} bytes: more than the changes were copied`);
  // The image files were only read.
  for (const i of [0, 1, 'fresh']) assert.ok(fs.readFileSync(imageOf(i)).equals(image), `image ${i} unchanged`);
});
