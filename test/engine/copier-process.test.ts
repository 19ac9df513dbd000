/**
 * The rebuild copier as a process of its own (`zebu volume serve` → engine → copier), under fio
 * `--verify` writing across the regions being copied: SIGKILLed midway (a new copier takes the
 * region over, the rebuild completes), and SIGSTOPped past the recall timeout (its leases are
 * revoked, client writes go on; after SIGCONT it meets the revoked lease and replays). After
 * each: fio saw no error and every replica is identical; an idle copier exits.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { controlRequest } from '../../src/protocol/control-channel.ts';
import { startReplica } from '../support/replica-process.ts';
import { startVolume, replicaDigest, mustRun, type VolumeCluster } from '../support/volume-cluster.ts';
import { startFio, fioFigures } from '../support/fio.ts';
import { tempDir } from '../support/tmp.ts';
import { waitFor, processesUnder } from '../support/zebu-up.ts';
import { engineInfo as info, type EngineInfo, type ReplicaRow } from './engine-process.ts';

const MiB = 1024 * 1024;

function replicasOf(control: string): Promise<ReplicaRow[]> {
  return controlRequest(control, 'GET', '/v1/replicas') as Promise<ReplicaRow[]>;
}

function copierPids(dir: string): number[] {
  return processesUnder(dir).filter((p) => p.role === 'copier').map((p) => p.pid);
}

/**
 * A volume of two replicas, its first 192 MiB written (0x5c) and fio verifying writes over the
 * last 64 MiB, and a new replica being rebuilt (in region order: the written part first).
 */
async function rebuildUnderFio(t: { after: (fn: () => unknown) => void }, dir: string, extraArgs: string[]): Promise<{ vol: VolumeCluster; address: string; port: number; fio: ReturnType<typeof startFio> }> {
  const size = 256 * MiB;
  const vol = await startVolume(t, { dir, replicas: 2, sizeBytes: size, extraArgs });
  mustRun('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5c 0 192M', '-c', 'flush', vol.nbd], { timeoutMs: 120_000 });
  const fio = startFio(t, [
    '--name=verify', '--ioengine=nbd', `--uri=${vol.nbd}`, '--rw=randwrite', '--bsrange=4k-64k', '--offset=192M', '--size=64M',
    '--io_size=1G', '--iodepth=8', '--verify=crc32c', '--do_verify=1', '--verify_fatal=1', '--verify_state_save=0', '--output-format=json', '--randseed=11',
  ]);
  await new Promise((r) => setTimeout(r, 300));
  const fresh = await startReplica({ dir: path.join(dir, 'replica-new'), sizeBytes: size, secretFile: path.join(dir, 'secret') });
  t.after(() => fresh.child.kill('SIGKILL'));
  const address = `127.0.0.1:${fresh.port}`;
  await controlRequest(vol.controlSocket, 'POST', '/v1/replicas', { address });
  await waitFor('copy under way', async () => ((await replicasOf(vol.controlSocket)).find((r) => r.address === address)?.rebuild?.copiedBytes ?? 0) > 0, 60_000, 5);
  return { vol, address, port: fresh.port, fio };
}

async function finish(vol: VolumeCluster, address: string, port: number, fio: ReturnType<typeof startFio>): Promise<EngineInfo> {
  const rows = await waitFor('rebuild over', async () => {
    const now = await replicasOf(vol.controlSocket);
    return now.find((r) => r.address === address)!.mode !== 'WO' ? now : undefined;
  }, 180_000, 50);
  assert.deepEqual(rows.map((r) => r.mode), ['RW', 'RW', 'RW'], JSON.stringify(rows));
  const result = await fio.exit;
  assert.equal(result.code, 0, result.stderr);
  assert.equal(fioFigures(result.stdout).error, 0);
  mustRun('qemu-io', ['-f', 'raw', '-c', 'flush', '-c', 'read -P 0x5c 0 192M', vol.nbd], { timeoutMs: 120_000 });
  const after = await info(vol.controlSocket);
  assert.equal(after.stats.errors, 0);
  const epoch = await vol.currentEpoch();
  const digests = await Promise.all([...vol.replicas.map((r) => r.port), port].map((p) => replicaDigest(p, vol.secret, epoch, vol.sizeBytes)));
  assert.equal(digests[1], digests[0]);
  assert.equal(digests[2], digests[0]);
  return after;
}

test('the copier SIGKILLed mid-rebuild: its leases are revoked, a new copier copies its regions again, the rebuild completes; fio verify sees no error', async (t) => {
  const dir = tempDir(t);
  const { vol, address, port, fio } = await rebuildUnderFio(t, dir, []);
  const [first] = await waitFor('a copier process', async () => {
    const pids = copierPids(dir);
    return pids.length === 1 ? pids : undefined;
  }, 10_000, 20);
  process.kill(first, 'SIGKILL');
  // The rebuild goes on with a new copier, still under way when it is seen.
  const second = await waitFor('a new copier', async () => copierPids(dir).find((pid) => pid !== first), 30_000, 20);
  assert.notEqual(second, first);
  const after = await finish(vol, address, port, fio);
  assert.equal(after.lastRebuild?.error ?? null, null, JSON.stringify(after.lastRebuild));
  assert.match(vol.stderr(), /rebuild-copier-lost/);
  assert.ok(after.stats.rebuildCopiersLost >= 1, JSON.stringify(after.stats));
  // With nothing left to copy, the copier exits (the next rebuild starts one).
  await waitFor('the idle copier gone', async () => (copierPids(dir).length === 0 ? true : undefined), 30_000, 200);
});

test('the copier SIGSTOPped past the recall timeout: its lease is revoked and client writes go on; after SIGCONT it gets the revoked-lease error and replays', async (t) => {
  const dir = tempDir(t);
  const { vol, address, port, fio } = await rebuildUnderFio(t, dir, ['--lease-recall-timeout-ms', '150']);
  const [copier] = await waitFor('a copier process', async () => {
    const pids = copierPids(dir);
    return pids.length === 1 ? pids : undefined;
  }, 10_000, 20);
  t.after(() => {
    try {
      process.kill(copier, 'SIGCONT');
    } catch {
      // gone
    }
  });
  // Stopped while it holds leases (the engine's INFO lists those held; a copier stopped between
  // regions holds none: go on and stop it again), then a client write into each leased range:
  // it recalls the lease, the recall times out, the lease is revoked and the write completes
  // while the copier stands still. The writes are of the regions' own bytes (0x5c: the copy is in
  // the first 192 MiB, fio writes above). After SIGCONT the copier meets the revoke and replays,
  // unless its last chunk of the region was already under way (the target lands that one before
  // the client write): then it moves on to other regions, and it is stopped again.
  let replayed = false;
  let revokes = 0;
  for (let round = 0; round < 200 && !replayed && revokes < 6; round++) {
    process.kill(copier, 'SIGSTOP');
    // Messages it sent before it stopped (a release) reach the engine first.
    await new Promise((r) => setTimeout(r, 30));
    const before = await info(vol.controlSocket);
    const leases = before.rebuildLeases;
    if (leases.length === 0) {
      process.kill(copier, 'SIGCONT');
      assert.ok(before.rebuilding, 'the rebuild ended before the copier could be stopped while it held a lease');
      await new Promise((r) => setTimeout(r, 5 + Math.floor(Math.random() * 40)));
      continue;
    }
    for (const lease of leases) assert.ok(lease.end <= 192 * MiB, `the copy reached fio's range before a lease could be stopped in the written part: ${JSON.stringify(lease)}`);
    mustRun('qemu-io', ['-f', 'raw', ...leases.flatMap((l) => ['-c', `write -P 0x5c ${l.end - 4096} 4096`]), vol.nbd], { timeoutMs: 60_000 });
    const during = await info(vol.controlSocket);
    assert.ok(during.stats.writes - before.stats.writes >= leases.length, 'client writes went on while the copier was stopped');
    assert.ok(during.stats.rebuildLeaseRevokes > before.stats.rebuildLeaseRevokes, `a write to a lease held by a stopped copier revoked it: ${JSON.stringify(during.stats)}`);
    revokes++;
    process.kill(copier, 'SIGCONT');
    const newest = Math.max(...leases.map((l) => l.id));
    replayed = 'replayed' === await waitFor('the copier replays or moves on', async () => {
      const now = await info(vol.controlSocket);
      if (now.stats.rebuildLeaseReplays > 0) return 'replayed';
      if (!now.rebuilding || now.rebuildLeases.some((l) => l.id > newest)) return 'moved on';
      return undefined;
    }, 10_000, 10);
  }
  assert.ok(replayed, 'after a revoke, the copier replayed from its committed offset');
  const after = await finish(vol, address, port, fio);
  assert.ok(after.stats.rebuildLeaseRevokes > 0 && after.stats.rebuildLeaseReplays > 0, JSON.stringify(after.stats));
  assert.deepEqual(copierPids(dir).filter((pid) => pid !== copier), [], 'the same copier went on');
});
