/**
 * Region leases through real processes (`zebu up`): a replacement replica is rebuilt while fio
 * writes and verifies, with a recall timeout of 1 ms, so that client writes to regions being
 * copied make the engine revoke leases at the target replica (LEASE_REVOKE) and the copy replay
 * them after LEASE_REVOKED. With retries allowed the rebuild completes, fio sees no error and the
 * replicas are identical; with none allowed it fails with a reason that names the region and the
 * cause, and the volume keeps serving.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { spawnSync } from 'node:child_process';
import { replicaDigest } from '../support/volume-cluster.ts';
import { readSecretFile } from '../../src/protocol/auth.ts';
import { fioVerifyArgs, startFio, fioFigures } from '../support/fio.ts';
import { startZebuUp, stopZebuUp, mustZebu, mustZebuJson, zebuDataDir, waitFor } from '../support/zebu-up.ts';

const MiB = 1024 * 1024;
const SIZE = 256 * MiB;

async function volumeUnderFio(t: { after: (fn: () => unknown) => void }, maxRetries: number) {
  const dataDir = zebuDataDir(t);
  const up = await startZebuUp({ dataDir });
  t.after(() => stopZebuUp(up));
  mustZebu(up, ['setting', 'set', 'replica-replenishment-wait-seconds', '0']);
  mustZebu(up, ['setting', 'set', 'rebuild-lease-recall-timeout-ms', '1']);
  mustZebu(up, ['setting', 'set', 'rebuild-max-region-retries', String(maxRetries)]);
  mustZebu(up, ['volume', 'create', 'lease', '--size', String(SIZE), '--replicas', '2']);
  const uri = mustZebu(up, ['volume', 'attach', 'lease']).trim();
  const fill = spawnSync('qemu-io', ['-f', 'raw', '-c', 'write -P 0x2b 0 256M', '-c', 'flush', uri], { timeout: 120_000 });
  assert.equal(fill.status, 0, String(fill.stderr));
  const before = mustZebuJson(up, ['replica', 'list', '--volume', 'lease']);
  // Writes go on for a while (768 MiB over 224 MiB): the replacement's copy, which starts a few
  // seconds after the kill, must meet client writes (on a busy machine a single pass ended first).
  const fio = startFio(t, [...fioVerifyArgs(uri, { sizeMiB: 224, iodepth: 16, blockSizes: '4k-16k' }), '--io_size=768M']);
  await new Promise((r) => setTimeout(r, 1500));
  // The replacement is a full rebuild under fio.
  process.kill(before[1].pid, 'SIGKILL');
  return { up, dataDir, fio, victim: before[1].name as string };
}

test('revoked leases are replayed: the rebuild completes under fio verify; fio 0 errors; replicas identical; counters show revokes', async (t) => {
  const { up, dataDir, fio, victim } = await volumeUnderFio(t, 1000);
  const healthy = await waitFor('healthy with a new replica', () => {
    const v = mustZebuJson(up, ['volume', 'get', 'lease']);
    return v.robustness === 'healthy' && !v.replicas.some((r: { name: string }) => r.name === victim) ? v : undefined;
  }, 240_000, 200);
  const result = await fio.exit;
  assert.equal(result.code, 0, result.stderr);
  const figures = fioFigures(result.stdout);
  assert.equal(figures.error, 0, 'fio saw no error');
  assert.ok(figures.readBytes > 0, 'fio verified');

  // The engine's counters reach the volume with its stats, a few seconds apart. (On a timeout the
  // message says what was seen: the counters, the epoch and the volume's events.)
  let seen = '';
  const leases = await waitFor('recalls, revokes and replays counted', () => {
    const v = mustZebuJson(up, ['volume', 'get', 'lease']);
    const got = v.rebuildLeases;
    seen = `counters ${JSON.stringify(got)}, epoch ${v.epoch} (healthy at epoch ${healthy.epoch})`;
    if (got !== null && got.recalls > 0 && got.revokes > 0 && got.replays > 0) return got;
    throw new Error(seen);
  }, 30_000, 200).catch((err: Error) => {
    const events = (mustZebuJson(up, ['events', '--volume', 'lease']) as { reason: string; message: string }[]).map((e) => `${e.reason}: ${e.message}`);
    throw new Error(`${err.message}; ${seen}; events:\n${events.join('\n')}`);
  });
  assert.ok(leases.grants > 0, JSON.stringify(leases));
  const metrics = await fetch(`${up.api}/metrics`, { headers: { authorization: `Bearer ${up.token}` } }).then((r) => r.text());
  assert.match(metrics, /zebu_volume_rebuild_lease_revokes_total\{volume="lease"\} [1-9]/);

  const secret = readSecretFile(path.join(dataDir, 'secret'));
  const replicas = mustZebuJson(up, ['replica', 'list', '--volume', 'lease']);
  const digests = await Promise.all(replicas.map((r: { address: string }) => replicaDigest(Number(r.address.split(':')[1]), secret, healthy.epoch, SIZE)));
  assert.equal(new Set(digests).size, 1, `replica digests: ${digests.join(' ')}`);
});

test('a region revoked past rebuild-max-region-retries fails the rebuild with the region and the cause; the volume keeps serving', async (t) => {
  const { up, fio } = await volumeUnderFio(t, 0);
  const failed = await waitFor('a rebuild failed on a revoked lease', () => {
    const events = mustZebuJson(up, ['events', '--volume', 'lease']) as { reason: string; message: string }[];
    return events.find((e) => e.reason === 'ReplicaFailed' && /lease was revoked/.test(e.message));
  }, 240_000, 200);
  assert.match(failed.message, /region at offset \d+ \(4194304 bytes\): its lease was revoked 1 times .*gave up after 0 retries/);
  // The engine's counters reach the volume with its stats, a few seconds apart.
  const v = await waitFor('the revokes counted', () => {
    const got = mustZebuJson(up, ['volume', 'get', 'lease']);
    return got.rebuildLeases !== null && got.rebuildLeases.revokes > 0 ? got : undefined;
  }, 30_000, 200);
  assert.notEqual(v.robustness, 'faulted', 'the volume kept serving');
  const result = await fio.exit;
  assert.equal(result.code, 0, result.stderr);
  assert.equal(fioFigures(result.stdout).error, 0, 'fio saw no error');
});
