/**
 * A rebuild that stops midway goes on where it stopped, through real processes (`zebu up`):
 * a replica moves, and its new replica's process is SIGKILLed while its copy is under way (fio
 * writing and verifying the first part of the volume meanwhile). The agent restarts the process,
 * the manager waits for it rather than making another replica, the engine takes it back by a
 * delta of what was left (not the whole volume), and the move ends with that same replica; fio
 * sees no error and the replicas hold the same bytes. The same when the kill lands while the
 * volume's snapshots are copied: the new replica is taken back over the snapshots it completed
 * (each checked by hash against the source's), and every snapshot ends the same everywhere.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { spawnSync } from 'node:child_process';
import { replicaDigest } from '../support/volume-cluster.ts';
import { readSecretFile } from '../../src/protocol/auth.ts';
import { controlRequest } from '../../src/protocol/control-channel.ts';
import { fioVerifyArgs, startFio, fioFigures } from '../support/fio.ts';
import { startZebuUp, stopZebuUp, mustZebu, mustZebuJson, zebuDataDir, waitFor } from '../support/zebu-up.ts';

const MiB = 1024 * 1024;
const SIZE = 512 * MiB;
/** fio writes here only: the rest of the volume is copied once and stays out of the maps. */
const FIO_MIB = 64;

interface ReplicaRow {
  name: string;
  diskId: string;
  mode: string | null;
  pid: number;
  address: string;
  rebuild: { copiedBytes: number; totalBytes: number; delta: boolean } | null;
}

test('a moved replica\'s new replica SIGKILLed mid-rebuild: waited for, taken back by a delta of what was left; fio 0 errors; replicas identical', async (t) => {
  const dataDir = zebuDataDir(t);
  const up = await startZebuUp({ dataDir });
  t.after(() => stopZebuUp(up));
  mustZebu(up, ['volume', 'create', 'rs', '--size', String(SIZE), '--replicas', '2']);
  const uri = mustZebu(up, ['volume', 'attach', 'rs']).trim();
  const fill = spawnSync('qemu-io', ['-f', 'raw', '-c', `write -P 0x3c 0 ${SIZE / MiB}M`, '-c', 'flush', uri], { timeout: 120_000 });
  assert.equal(fill.status, 0, String(fill.stderr));
  const disks = mustZebuJson(up, ['disk', 'list']).map((d: { name: string }) => d.name) as string[];
  const before = mustZebuJson<ReplicaRow[]>(up, ['replica', 'list', '--volume', 'rs']);
  const free = disks.find((d) => !before.some((r) => r.diskId === d))!;
  // The fill's regions leave the write-intent logs once the volume is idle a moment.
  await new Promise((r) => setTimeout(r, 4000));

  const fio = startFio(t, [...fioVerifyArgs(uri, { sizeMiB: FIO_MIB, blockSizes: '4k-16k' }), '--io_size=384M']);
  await new Promise((r) => setTimeout(r, 500));
  // Slow enough that the copy is seen midway (each look is a CLI process): 8 s for the volume.
  mustZebu(up, ['setting', 'set', 'rebuild-max-mib-per-second', '64']);
  mustZebu(up, ['replica', 'move', before[0].name, '--disk', free]);
  const newcomer = await waitFor('the new replica a quarter copied', () => {
    const row = mustZebuJson<ReplicaRow[]>(up, ['replica', 'list', '--volume', 'rs']).find((r) => r.diskId === free);
    return row !== undefined && row.mode === 'WO' && row.rebuild !== null && row.rebuild.copiedBytes >= SIZE / 4 ? row : undefined;
  }, 180_000, 50);
  process.kill(newcomer.pid, 'SIGKILL');
  const copiedAtKill = newcomer.rebuild!.copiedBytes;

  // Back (restarted by the agent), and taken back: its rebuild has less than the volume to copy.
  let resumedTotal = 0;
  let fullAgain: string | null = null;
  const rows = await waitFor('the move done with the same new replica', () => {
    const now = mustZebuJson<ReplicaRow[]>(up, ['replica', 'list', '--volume', 'rs']);
    const again = now.find((r) => r.name === newcomer.name);
    if (again?.mode === 'WO' && again.rebuild !== null && again.pid !== newcomer.pid) {
      if (!again.rebuild.delta) fullAgain = JSON.stringify(again);
      resumedTotal = Math.max(resumedTotal, again.rebuild.totalBytes);
    }
    return !now.some((r) => r.name === before[0].name) && again?.mode === 'RW' ? now : undefined;
  }, 240_000, 100);
  assert.deepEqual(rows.map((r) => r.name).sort(), [before[1].name, newcomer.name].sort(), 'no other replica was made');
  const events = mustZebuJson(up, ['events', '--volume', 'rs']) as { reason: string; object: string; message: string }[];
  const failed = events.find((e) => e.reason === 'ReplicaFailed' && e.object === newcomer.name);
  assert.match(failed?.message ?? '', /its rebuild goes on where it stopped/);
  assert.ok(events.some((e) => e.reason === 'ReplicaReturning' && e.object === newcomer.name), 'the engine was asked to take it back');
  // What was copied before the kill is not copied again — but for the regions fio keeps writing,
  // the regions under way and those not yet flushed on the target.
  assert.ok(resumedTotal > 0, 'the resumed rebuild was seen');
  assert.equal(fullAgain, null, 'the new process is rebuilt by a delta, not again in full');
  assert.ok(resumedTotal <= SIZE - copiedAtKill + (FIO_MIB + 64) * MiB, `resumed with ${resumedTotal / MiB} MiB to copy after ${copiedAtKill / MiB} MiB were copied`);

  const result = await fio.exit;
  assert.equal(result.code, 0, result.stderr);
  const figures = fioFigures(result.stdout);
  assert.equal(figures.error, 0, 'fio saw no error');
  assert.ok(figures.readBytes > 0, 'fio verified');
  const healthy = await waitFor('healthy', () => {
    const v = mustZebuJson(up, ['volume', 'get', 'rs']);
    return v.robustness === 'healthy' ? v : undefined;
  }, 60_000, 200);
  const secret = readSecretFile(path.join(dataDir, 'secret'));
  const replicas = mustZebuJson<ReplicaRow[]>(up, ['replica', 'list', '--volume', 'rs']);
  const digests = await Promise.all(replicas.map((r) => replicaDigest(Number(r.address.split(':')[1]), secret, healthy.epoch, SIZE)));
  assert.equal(new Set(digests).size, 1, `replica digests: ${digests.join(' ')}`);
});

test('a moved replica\'s new replica SIGKILLed while the snapshots are copied: taken back over the snapshots it completed (checked by hash), not replaced; snapshots identical', async (t) => {
  const dataDir = zebuDataDir(t);
  const up = await startZebuUp({ dataDir });
  t.after(() => stopZebuUp(up));
  const size = 128 * MiB;
  mustZebu(up, ['volume', 'create', 'ss', '--size', String(size), '--replicas', '2']);
  const uri = mustZebu(up, ['volume', 'attach', 'ss']).trim();
  const names = ['s1', 's2', 's3', 's4'];
  for (const [i, name] of names.entries()) {
    const fill = spawnSync('qemu-io', ['-f', 'raw', '-c', `write -P ${0x41 + i} 0 ${size / MiB}M`, '-c', 'flush', uri], { timeout: 120_000 });
    assert.equal(fill.status, 0, String(fill.stderr));
    mustZebu(up, ['snapshot', 'create', 'ss', name]);
  }
  const disks = mustZebuJson(up, ['disk', 'list']).map((d: { name: string }) => d.name) as string[];
  const before = mustZebuJson<ReplicaRow[]>(up, ['replica', 'list', '--volume', 'ss']);
  const free = disks.find((d) => !before.some((r) => r.diskId === d))!;
  // The kill must land while the snapshots are copied: 2.25 s at least to the moment below.
  mustZebu(up, ['setting', 'set', 'rebuild-max-mib-per-second', '128']);
  mustZebu(up, ['replica', 'move', before[0].name, '--disk', free]);
  const newcomer = await waitFor('the new replica started', () => {
    const row = mustZebuJson<ReplicaRow[]>(up, ['replica', 'list', '--volume', 'ss']).find((r) => r.diskId === free);
    return row !== undefined && row.pid !== null && row.address !== null ? row : undefined;
  }, 60_000, 50);
  // Four snapshots and the live volume: the third snapshot is under way past 2.25 volumes. The
  // engine is asked itself, often: the manager's view lags by an INFO poll, and a fast copy can be
  // past the snapshots by then.
  const engineControl = path.join(dataDir, 'run', 'engines', 'ss.ctl');
  const copiedAtKill = await waitFor('two snapshots copied', async () => {
    const info = (await controlRequest(engineControl, 'GET', '/v1/info')) as { replicas: { address: string; mode: string; rebuild: { copiedBytes: number } | null }[] };
    const row = info.replicas.find((r) => r.address === newcomer.address);
    if (row === undefined || row.mode !== 'WO' || row.rebuild === null || row.rebuild.copiedBytes < 2.25 * size) return undefined;
    process.kill(newcomer.pid, 'SIGKILL');
    return row.rebuild.copiedBytes;
  }, 180_000, 5);
  assert.ok(copiedAtKill < 4 * size, `killed before the snapshots were all copied (${copiedAtKill / MiB} MiB copied)`);
  mustZebu(up, ['setting', 'set', 'rebuild-max-mib-per-second', '0']);

  const rows = await waitFor('the move done with the same new replica', () => {
    const now = mustZebuJson<ReplicaRow[]>(up, ['replica', 'list', '--volume', 'ss']);
    return !now.some((r) => r.name === before[0].name) && now.find((r) => r.name === newcomer.name)?.mode === 'RW' ? now : undefined;
  }, 240_000, 200);
  assert.deepEqual(rows.map((r) => r.name).sort(), [before[1].name, newcomer.name].sort(), 'no other replica was made');
  const events = mustZebuJson(up, ['events', '--volume', 'ss']) as { reason: string; object: string; message: string }[];
  assert.match(events.find((e) => e.reason === 'ReplicaFailed' && e.object === newcomer.name)?.message ?? '', /its rebuild goes on where it stopped/);
  // The engine's log names the snapshots found whole on it and not copied again.
  const engineLog = fs.readFileSync(path.join(dataDir, 'logs', 'e.ss.log'), 'utf8').split('\n').filter((l) => l.includes('"rebuild-snapshots-kept"')).map((l) => JSON.parse(l) as { kept: string[] });
  assert.ok(engineLog.some((e) => ['s1', 's2'].every((n) => e.kept.includes(n))), `kept: ${JSON.stringify(engineLog)}`);

  const healthy = await waitFor('healthy', () => {
    const v = mustZebuJson(up, ['volume', 'get', 'ss']);
    return v.robustness === 'healthy' ? v : undefined;
  }, 60_000, 200);
  const secret = readSecretFile(path.join(dataDir, 'secret'));
  const replicas = mustZebuJson<ReplicaRow[]>(up, ['replica', 'list', '--volume', 'ss']);
  for (const snapshot of [...names, undefined]) {
    const digests = await Promise.all(replicas.map((r) => replicaDigest(Number(r.address.split(':')[1]), secret, healthy.epoch, size, snapshot)));
    assert.equal(new Set(digests).size, 1, `${snapshot ?? 'the live volume'}: ${digests.join(' ')}`);
  }
});
