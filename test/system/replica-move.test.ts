/**
 * Moving replicas with no downtime, through `zebu up` and the CLI, while fio writes and
 * verifies: `zebu replica move` to a free disk, then `zebu disk update --evict` of another disk.
 * Each time a new replica is rebuilt (its regions copied under leases while fio writes to them)
 * before the leaving one is removed; the volume never has fewer replicas in service than it
 * should, fio sees no error, the evicted disk ends empty, and the replicas hold the same bytes.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { spawnSync } from 'node:child_process';
import { replicaDigest } from '../support/volume-cluster.ts';
import { readSecretFile } from '../../src/protocol/auth.ts';
import { fioVerifyArgs, startFio, fioFigures } from '../support/fio.ts';
import { startZebuUp, stopZebuUp, mustZebu, mustZebuJson, zebu, zebuDataDir, waitFor } from '../support/zebu-up.ts';

const MiB = 1024 * 1024;
const SIZE = 256 * MiB;

interface ReplicaRow {
  name: string;
  diskId: string;
  mode: string | null;
  pid: number;
  address: string;
  dataPath: string;
  leaving: { reason: string } | null;
}

test('replica move and disk eviction under fio verify: rebuilt first, then removed; never below 2 in service; fio 0 errors; replicas identical', async (t) => {
  const dataDir = zebuDataDir(t);
  const up = await startZebuUp({ dataDir });
  t.after(() => stopZebuUp(up));
  mustZebu(up, ['volume', 'create', 'mv', '--size', String(SIZE), '--replicas', '2']);
  const uri = mustZebu(up, ['volume', 'attach', 'mv']).trim();
  // Data in every region before the moves, so that each copy has something to move.
  const fill = spawnSync('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 0 256M', '-c', 'flush', uri], { timeout: 120_000 });
  assert.equal(fill.status, 0, String(fill.stderr));
  const disks = mustZebuJson(up, ['disk', 'list']).map((d: { name: string }) => d.name) as string[];
  const before = mustZebuJson<ReplicaRow[]>(up, ['replica', 'list', '--volume', 'mv']);
  assert.equal(before.length, 2);
  const free = disks.find((d) => !before.some((r) => r.diskId === d))!;

  // Refused with a clear message, nothing changed.
  const same = zebu(up, ['replica', 'move', before[0].name, '--disk', before[0].diskId]);
  assert.notEqual(same.status, 0);
  assert.match(same.stderr, /already/);
  const unknown = zebu(up, ['replica', 'move', before[0].name, '--disk', 'no-such-disk']);
  assert.notEqual(unknown.status, 0);
  assert.match(unknown.stderr, /disk no-such-disk not found/);

  const fio = startFio(t, fioVerifyArgs(uri, { sizeMiB: 192 }));
  await new Promise((r) => setTimeout(r, 1500));
  let fewest = Infinity;
  const watch = (): ReplicaRow[] => {
    const rows = mustZebuJson<ReplicaRow[]>(up, ['replica', 'list', '--volume', 'mv']);
    fewest = Math.min(fewest, rows.filter((r) => r.mode === 'RW').length);
    return rows;
  };

  // 1. A replica moves to the free disk.
  const moved = before[0];
  assert.match(mustZebu(up, ['replica', 'move', moved.name, '--disk', free]), new RegExp(`replica ${moved.name} moves from disk ${moved.diskId} to disk ${free}`));
  await waitFor('the moved replica gone and a RW replica on the free disk', () => {
    const rows = watch();
    return !rows.some((r) => r.name === moved.name) && rows.some((r) => r.diskId === free && r.mode === 'RW') ? rows : undefined;
  }, 180_000, 100);
  await waitFor('the moved replica\'s directory removed', () => !fs.existsSync(moved.dataPath), 30_000, 200);

  // 2. The other original replica's disk is evicted: its replica moves too (to the disk freed above).
  const evicted = before[1].diskId;
  mustZebu(up, ['disk', 'update', evicted, '--evict']);
  const leaving = mustZebuJson<ReplicaRow[]>(up, ['replica', 'list', '--volume', 'mv']).find((r) => r.name === before[1].name);
  assert.ok(leaving === undefined || leaving.leaving !== null, 'the replica on the evicted disk says it is leaving');
  const empty = await waitFor('the evicted disk empty', () => {
    watch();
    const d = mustZebuJson(up, ['disk', 'list']).find((x: { name: string }) => x.name === evicted);
    return d.replicaCount === 0 ? d : undefined;
  }, 180_000, 100);
  assert.equal(empty.evict, true);
  assert.match(mustZebu(up, ['disk', 'list']), /done \(empty\)/);
  const healthy = await waitFor('healthy', () => {
    const v = mustZebuJson(up, ['volume', 'get', 'mv']);
    return v.robustness === 'healthy' && v.replicas.length === 2 && v.replicas.every((r: { mode: string }) => r.mode === 'RW') ? v : undefined;
  }, 60_000, 200);
  assert.ok(fewest >= 2, `never fewer than 2 replicas in service (saw ${fewest})`);
  assert.ok(!healthy.replicas.some((r: { diskId: string }) => r.diskId === evicted));

  const result = await fio.exit;
  assert.equal(result.code, 0, result.stderr);
  const figures = fioFigures(result.stdout);
  assert.equal(figures.error, 0, 'fio saw no error');
  assert.ok(figures.readBytes > 0, 'fio verified');

  // The copies ran under region leases, and the counters say so.
  // The engine's counters reach the volume with its stats, a few seconds apart.
  await waitFor('lease grants counted', () => (mustZebuJson(up, ['volume', 'get', 'mv']).rebuildLeases?.grants ?? 0) > 0, 30_000, 200);
  const reasons = mustZebuJson(up, ['events']).map((e: { reason: string }) => e.reason);
  for (const r of ['ReplicaMoveRequested', 'ReplicaMoving', 'ReplicaMoved', 'DiskEvicting']) assert.ok(reasons.includes(r), `event ${r}`);

  const secret = readSecretFile(path.join(dataDir, 'secret'));
  const replicas = mustZebuJson<ReplicaRow[]>(up, ['replica', 'list', '--volume', 'mv']);
  const digests = await Promise.all(replicas.map((r) => replicaDigest(Number(r.address.split(':')[1]), secret, healthy.epoch, SIZE)));
  assert.equal(new Set(digests).size, 1, `replica digests: ${digests.join(' ')}`);
});

test('disk eviction with detached volumes: one that holds data is attached without an export, moved and detached again, its data intact; one never attached gets an empty replica', async (t) => {
  const dataDir = zebuDataDir(t);
  const up = await startZebuUp({ dataDir });
  t.after(() => stopZebuUp(up));
  const size = 64 * MiB;
  mustZebu(up, ['volume', 'create', 'kept', '--size', String(size), '--replicas', '2']);
  mustZebu(up, ['volume', 'create', 'blank', '--size', String(size), '--replicas', '2']);
  const uri = mustZebu(up, ['volume', 'attach', 'kept']).trim();
  const fill = spawnSync('qemu-io', ['-f', 'raw', '-c', 'write -P 0x6b 0 64M', '-c', 'flush', uri], { timeout: 120_000 });
  assert.equal(fill.status, 0, String(fill.stderr));
  mustZebu(up, ['volume', 'detach', 'kept']);
  await waitFor('kept detached', () => mustZebuJson(up, ['volume', 'get', 'kept']).state === 'detached', 60_000, 200);

  // A disk that holds a replica of both (3 disks, 2 replicas each: one always does).
  const rows = (v: string) => mustZebuJson<ReplicaRow[]>(up, ['replica', 'list', '--volume', v]);
  const keptBefore = rows('kept');
  const evicted = keptBefore.map((r) => r.diskId).find((d) => rows('blank').some((r) => r.diskId === d))!;
  assert.ok(evicted !== undefined, 'a disk with a replica of both volumes');
  mustZebu(up, ['disk', 'update', evicted, '--evict']);
  const empty = await waitFor('the evicted disk empty', () => {
    const d = mustZebuJson(up, ['disk', 'list']).find((x: { name: string }) => x.name === evicted);
    return d.replicaCount === 0 ? d : undefined;
  }, 180_000, 200);
  assert.equal(empty.evict, true);
  const kept = await waitFor('kept detached again', () => {
    const v = mustZebuJson(up, ['volume', 'get', 'kept']);
    return v.state === 'detached' && v.replicas.length === 2 ? v : undefined;
  }, 60_000, 200);
  assert.ok(!kept.replicas.some((r: { diskId: string }) => r.diskId === evicted));
  const events = mustZebuJson(up, ['events', '--volume', 'kept']).map((e: { reason: string }) => e.reason);
  for (const r of ['MoveAttached', 'ReplicaMoving', 'ReplicaMoved', 'MoveDetached']) assert.ok(events.includes(r), `event ${r}`);
  const blank = mustZebuJson(up, ['volume', 'get', 'blank']);
  assert.equal(blank.epoch, 0, 'the volume never attached was not attached for its move');
  assert.equal(blank.replicas.length, 2);
  assert.ok(!blank.replicas.some((r: { diskId: string }) => r.diskId === evicted));

  // The data moved with it: attached again, every byte reads back, and the replicas agree.
  const again = mustZebu(up, ['volume', 'attach', 'kept']).trim();
  const read = spawnSync('qemu-io', ['-f', 'raw', '-c', 'read -P 0x6b 0 64M', again], { timeout: 120_000 });
  assert.equal(read.status, 0, String(read.stderr));
  assert.doesNotMatch(String(read.stdout), /Pattern verification failed/);
  const healthy = await waitFor('healthy', () => {
    const v = mustZebuJson(up, ['volume', 'get', 'kept']);
    return v.robustness === 'healthy' ? v : undefined;
  }, 60_000, 200);
  const secret = readSecretFile(path.join(dataDir, 'secret'));
  const digests = await Promise.all(rows('kept').map((r) => replicaDigest(Number(r.address.split(':')[1]), secret, healthy.epoch, size)));
  assert.equal(new Set(digests).size, 1, `replica digests: ${digests.join(' ')}`);
});
