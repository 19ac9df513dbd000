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
  // Writes go on for a while (2 GiB over 224 MiB): every replacement's copy below meets them.
  const fio = startFio(t, [...fioVerifyArgs(uri, { sizeMiB: 224, iodepth: 16, blockSizes: '4k-16k' }), '--io_size=2G']);
  await new Promise((r) => setTimeout(r, 1500));
  // The replacement is a full rebuild under fio.
  process.kill(before[1].pid, 'SIGKILL');
  await waitFor('the killed replica out', () => mustZebuJson(up, ['volume', 'get', 'lease']).robustness !== 'healthy', 30_000, 50);
  return { up, dataDir, fio, victim: before[1].name as string, keep: before[0].name as string };
}

/**
 * Whether a lease is revoked depends on timing: a copy that gives its lease back within the
 * recall timeout (1 ms) is not revoked, and on a quiet machine a whole rebuild may go by without
 * one. So until `done` says what the test looks for, each time the volume is healthy again the
 * replacement is SIGKILLed and rebuilt once more (at most 6 rounds), fio writing all along.
 */
async function untilSeen<T>(up: Parameters<typeof mustZebu>[0], keep: string, what: string, done: () => T | undefined): Promise<{ found: T; rounds: number }> {
  for (let round = 1; ; round++) {
    const outcome = await waitFor(what, () => {
      const found = done();
      if (found !== undefined) return { found };
      const v = mustZebuJson(up, ['volume', 'get', 'lease']);
      return v.robustness === 'healthy' && !v.rebuilding && v.replicas.length === 2 ? { found: undefined } : undefined;
    }, 240_000, 200);
    // The engine's counters reach the volume with its stats, a few seconds apart: a last look.
    if (outcome.found === undefined) await new Promise((r) => setTimeout(r, 3000));
    const found = outcome.found ?? done();
    if (found !== undefined) return { found, rounds: round };
    assert.ok(round < 6, `${what}: not seen after ${round} rebuilds`);
    const again = mustZebuJson<{ name: string; pid: number }[]>(up, ['replica', 'list', '--volume', 'lease']).find((r) => r.name !== keep)!;
    process.kill(again.pid, 'SIGKILL');
    await waitFor('the replacement out', () => mustZebuJson(up, ['volume', 'get', 'lease']).robustness !== 'healthy', 30_000, 50);
  }
}

test('revoked leases are replayed: the rebuild completes under fio verify; fio 0 errors; replicas identical; counters show revokes', async (t) => {
  const { up, dataDir, fio, victim, keep } = await volumeUnderFio(t, 1000);
  const { found: leases } = await untilSeen(up, keep, 'recalls, revokes and replays counted', () => {
    const got = mustZebuJson(up, ['volume', 'get', 'lease']).rebuildLeases;
    return got !== null && got.recalls > 0 && got.revokes > 0 && got.replays > 0 ? got : undefined;
  });
  const healthy = await waitFor('healthy with a new replica', () => {
    const v = mustZebuJson(up, ['volume', 'get', 'lease']);
    return v.robustness === 'healthy' && !v.replicas.some((r: { name: string }) => r.name === victim) ? v : undefined;
  }, 240_000, 200);
  const result = await fio.exit;
  assert.equal(result.code, 0, result.stderr);
  const figures = fioFigures(result.stdout);
  assert.equal(figures.error, 0, 'fio saw no error');
  assert.ok(figures.readBytes > 0, 'fio verified');

  assert.ok(leases.grants > 0, JSON.stringify(leases));
  // A recalled lease had a client write waiting for it: counted, with the longest wait.
  const waited = mustZebuJson(up, ['volume', 'get', 'lease']).rebuildLeases;
  assert.ok(waited.writesWaited > 0 && waited.longestWaitMs > 0, JSON.stringify(waited));
  assert.match(mustZebu(up, ['volume', 'get', 'lease']), /rebuild leases:?\s+.*; \d+ client write\(s\) waited, longest \d+\.\d ms/);
  const metrics = await fetch(`${up.api}/metrics`, { headers: { authorization: `Bearer ${up.token}` } }).then((r) => r.text());
  assert.match(metrics, /zebu_volume_rebuild_lease_revokes_total\{volume="lease"\} [1-9]/);
  assert.match(metrics, /zebu_volume_claim_waits_total\{volume="lease"\} [1-9]/);
  assert.match(metrics, /zebu_volume_claim_wait_longest_seconds\{volume="lease"\} 0\.\d*[1-9]/);

  const secret = readSecretFile(path.join(dataDir, 'secret'));
  const replicas = mustZebuJson(up, ['replica', 'list', '--volume', 'lease']);
  const digests = await Promise.all(replicas.map((r: { address: string }) => replicaDigest(Number(r.address.split(':')[1]), secret, healthy.epoch, SIZE)));
  assert.equal(new Set(digests).size, 1, `replica digests: ${digests.join(' ')}`);
});

test('a region revoked past rebuild-max-region-retries fails the rebuild with the region and the cause; the volume keeps serving', async (t) => {
  const { up, fio, keep } = await volumeUnderFio(t, 0);
  const { found: failed } = await untilSeen(up, keep, 'a rebuild failed on a revoked lease', () => {
    const events = mustZebuJson(up, ['events', '--volume', 'lease']) as { reason: string; message: string }[];
    return events.find((e) => e.reason === 'ReplicaFailed' && /lease was revoked/.test(e.message));
  });
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
