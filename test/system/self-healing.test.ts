/**
 * Self-healing under load, through `zebu up`: SIGKILL a replica process of an attached volume
 * while fio writes and verifies; the volume goes degraded, a new replica is scheduled and rebuilt
 * while fio keeps going, the volume is healthy again, the failed replica is removed, fio saw no
 * error, and every replica holds the same bytes.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { replicaDigest } from '../support/volume-cluster.ts';
import { readSecretFile } from '../../src/protocol/auth.ts';
import { fioVerifyArgs, startFio, fioFigures } from '../support/fio.ts';
import { startZebuUp, stopZebuUp, mustZebu, mustZebuJson, zebuDataDir, waitFor, processesUnder } from '../support/zebu-up.ts';
import { spawnSync } from 'node:child_process';

const MiB = 1024 * 1024;
const SIZE = 256 * MiB;

test('SIGKILL a replica under fio verify: degraded, rebuilt onto a new replica, healthy; fio 0 errors; replicas identical', async (t) => {
  const dataDir = zebuDataDir(t);
  const up = await startZebuUp({ dataDir });
  t.after(() => stopZebuUp(up));
  // The new-replica path (a killed replica coming back is rebuilt by delta: test/system/recovery.test.ts).
  mustZebu(up, ['setting', 'set', 'replica-replenishment-wait-seconds', '0']);
  mustZebu(up, ['volume', 'create', 'heal', '--size', String(SIZE), '--replicas', '3']);
  const uri = mustZebu(up, ['volume', 'attach', 'heal']).trim();
  const before = mustZebuJson(up, ['replica', 'list', '--volume', 'heal']);
  assert.equal(before.length, 3);

  const fio = startFio(t, fioVerifyArgs(uri, { sizeMiB: 192 }));
  await new Promise((r) => setTimeout(r, 2000));
  const victim = before[1];
  process.kill(victim.pid, 'SIGKILL');

  await waitFor('degraded', () => mustZebuJson(up, ['volume', 'get', 'heal']).robustness === 'degraded', 30_000, 100);
  const healthy = await waitFor('healthy again with a new replica', () => {
    const v = mustZebuJson(up, ['volume', 'get', 'heal']);
    return v.robustness === 'healthy' && !v.replicas.some((r: { name: string }) => r.name === victim.name) ? v : undefined;
  }, 180_000, 250);
  assert.equal(healthy.replicas.length, 3);
  assert.deepEqual(healthy.replicas.map((r: { mode: string }) => r.mode), ['RW', 'RW', 'RW']);
  assert.ok(!fs.existsSync(victim.dataPath), 'the failed replica directory is removed');

  const result = await fio.exit;
  assert.equal(result.code, 0, result.stderr);
  const figures = fioFigures(result.stdout);
  assert.equal(figures.error, 0, 'fio saw no error');
  assert.ok(figures.readBytes > 0, 'fio verified');

  // Rebuild progress and the replacement show in the events.
  const reasons = mustZebuJson(up, ['events', '--volume', 'heal']).map((e: { reason: string }) => e.reason);
  for (const r of ['ReplicaFailed', 'ReplicaScheduled', 'ReplicaRebuilt', 'ReplicaRemoved', 'Degraded', 'Healthy']) assert.ok(reasons.includes(r), `event ${r}`);

  // Every replica holds the same bytes (read through the replica protocol, same epoch).
  const secret = readSecretFile(path.join(dataDir, 'secret'));
  const replicas = mustZebuJson(up, ['replica', 'list', '--volume', 'heal']);
  const digests = await Promise.all(replicas.map((r: { address: string }) => replicaDigest(Number(r.address.split(':')[1]), secret, healthy.epoch, SIZE)));
  assert.equal(new Set(digests).size, 1, `replica digests: ${digests.join(' ')}`);
});

test('the engine SIGKILLed in the middle of a rebuild: the half-copied replica is never a source; the next engine goes on with its copy; the volume heals', async (t) => {
  const dataDir = zebuDataDir(t);
  const up = await startZebuUp({ dataDir });
  t.after(() => stopZebuUp(up));
  mustZebu(up, ['setting', 'set', 'replica-replenishment-wait-seconds', '0']);
  // The copy must still be under way when the test sees it: 10 s for the volume's data.
  mustZebu(up, ['setting', 'set', 'rebuild-max-mib-per-second', '96']);
  const size = 1024 * MiB;
  mustZebu(up, ['volume', 'create', 'mid', '--size', String(size), '--replicas', '3']);
  const uri = mustZebu(up, ['volume', 'attach', 'mid']).trim();
  // Few client writes, much data: the copy writes outnumber them (the revision trap).
  const fill = spawnSync('qemu-io', ['-f', 'raw', '-c', 'write -P 0x3d 0 960M', '-c', 'flush', uri], { timeout: 120_000 });
  assert.equal(fill.status, 0, String(fill.stderr));
  const before = mustZebuJson(up, ['replica', 'list', '--volume', 'mid']);
  // The engine serves on through the replica's failure: its pid is known before, and the watch
  // below asks the API itself (a CLI process per look took most of a second on a busy machine,
  // long enough for a fast copy to end before the kill).
  const engine = processesUnder(dataDir).find((p) => p.role === 'engine')!;
  const api = async (method: string, pathName: string, body?: unknown): Promise<any> => {
    const response = await fetch(`${up.api}${pathName}`, {
      method, headers: { authorization: `Bearer ${up.token}`, ...(body === undefined ? {} : { 'content-type': 'application/json' }) },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    assert.ok(response.ok, `${method} ${pathName}: ${response.status} ${await response.clone().text()}`);
    return response.json();
  };
  process.kill(before[0].pid, 'SIGKILL');

  const rebuilding = await waitFor('a replacement being rebuilt', async () => {
    const v = await api('GET', '/v1/volumes/mid');
    return v.replicas.find((r: { mode: string; rebuildProgress: number | null }) => r.mode === 'WO' && (r.rebuildProgress ?? 0) > 0);
  }, 60_000, 100); // not faster: the API shares zebu up's event loop with the controllers that start the rebuild
  // From now on a failed replica is waited for: the half-copied one is worth it.
  await api('PUT', '/v1/settings/replica-replenishment-wait-seconds', { value: '120' });
  process.kill(engine.pid, 'SIGKILL');
  await api('PUT', '/v1/settings/rebuild-max-mib-per-second', { value: '0' });
  assert.ok(rebuilding.rebuildProgress < 1, `the copy was under way when the engine was killed (${rebuilding.rebuildProgress})`);

  // The next engine (a new epoch) finds it marked: never a source, its copy goes on as a delta
  // from the maps the others kept, and it serves (no other replacement is made).
  const healthy = await waitFor('healthy again, with the half-copied replica', () => {
    const v = mustZebuJson(up, ['volume', 'get', 'mid']);
    return v.robustness === 'healthy' && v.replicas.every((r: { mode: string }) => r.mode === 'RW') && v.replicas.some((r: { name: string }) => r.name === rebuilding.name) ? v : undefined;
  }, 180_000, 250);
  assert.equal(healthy.replicas.length, 3);
  // Its copy went on as a delta: planned by the next engine's start-up (a Recovery event), or
  // asked for when it came back (ReplicaReturning) — never was it the source.
  const events = mustZebuJson(up, ['events', '--volume', 'mid']) as { reason: string; message: string; object: string }[];
  const resumed = events.filter((e) => (e.reason === 'Recovery' && e.message.includes(`delta rebuild of`) && e.message.includes(rebuilding.name))
    || (e.reason === 'ReplicaReturning' && e.object === rebuilding.name));
  assert.ok(resumed.length > 0, `its copy went on as a delta: ${JSON.stringify(events.map((e) => `${e.reason}: ${e.message}`))}`);
  for (const e of events.filter((x) => x.reason === 'Recovery')) assert.doesNotMatch(e.message, new RegExp(`resynced from ${rebuilding.name}`), 'the half-copied replica is not the source');
  assert.notEqual(healthy.lastRecovery?.source, rebuilding.name);
  const check = spawnSync('qemu-io', ['-f', 'raw', '-c', 'read -P 0x3d 0 960M', uri], { timeout: 120_000 });
  assert.equal(check.status, 0, String(check.stderr));
  assert.doesNotMatch(String(check.stdout), /verification failed/);
  const secret = readSecretFile(path.join(dataDir, 'secret'));
  const replicas = mustZebuJson(up, ['replica', 'list', '--volume', 'mid']);
  const digests = await Promise.all(replicas.map((r: { address: string }) => replicaDigest(Number(r.address.split(':')[1]), secret, healthy.epoch, size)));
  assert.equal(new Set(digests).size, 1, digests.join(' '));
});
