/**
 * Recovery through `zebu up`, end to end with real processes: a killed replica comes back by a
 * delta rebuild (same replica, no new one); every replica killed at once faults the volume and
 * auto-salvage brings it back; a killed engine comes back under a new epoch; `zebu volume verify`
 * finds the replicas identical after each, and the data reads back.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { startZebuUp, stopZebuUp, mustZebu, mustZebuJson, zebu, zebuDataDir, waitFor, processesUnder } from '../support/zebu-up.ts';

const MiB = 1024 * 1024;

function qemuIo(uri: string, commands: string[]): string {
  const r = spawnSync('qemu-io', ['-f', 'raw', ...commands.flatMap((c) => ['-c', c]), uri], { timeout: 120_000 });
  assert.equal(r.status, 0, `${r.stdout}${r.stderr}`);
  assert.doesNotMatch(String(r.stdout), /verification failed|error/i);
  return String(r.stdout);
}

function verifyClean(up: Parameters<typeof mustZebu>[0], volume: string): void {
  const r = zebu(up, ['volume', 'verify', volume, '--json']);
  assert.equal(r.status, 0, `${r.stdout}${r.stderr}`);
  const report = JSON.parse(r.stdout);
  assert.equal(report.differing.length, 0, r.stdout);
  assert.ok(report.regions >= 16);
}

test('delta rebuild of a killed replica, auto-salvage of a faulted volume, a new epoch for a killed engine; verify finds 0 differences', async (t) => {
  const dataDir = zebuDataDir(t);
  const up = await startZebuUp({ dataDir });
  t.after(() => stopZebuUp(up));
  mustZebu(up, ['volume', 'create', 'rec', '--size', String(64 * MiB), '--replicas', '3']);
  const uri = mustZebu(up, ['volume', 'attach', 'rec']).trim();
  qemuIo(uri, ['write -P 0x11 0 16M', 'write -P 0x22 40M 8M', 'flush']);
  verifyClean(up, 'rec');
  const replicas = mustZebuJson(up, ['replica', 'list', '--volume', 'rec']);
  const names = replicas.map((r: { name: string }) => r.name).sort();

  // One replica killed while writes go on: it comes back by delta, no new replica.
  process.kill(replicas[0].pid, 'SIGKILL');
  qemuIo(uri, ['write -P 0x33 4M 4M', 'flush']);
  // The manager's view lags the engine's (the agent polls it): wait for the rebuild's event first.
  await waitFor('the delta rebuild reported', () => {
    const events = mustZebuJson(up, ['events', '--volume', 'rec']);
    return events.some((e: { reason: string }) => e.reason === 'ReplicaRebuilt') ? true : undefined;
  }, 120_000, 250);
  const back = await waitFor('healthy with the same replicas', () => {
    const v = mustZebuJson(up, ['volume', 'get', 'rec']);
    return v.robustness === 'healthy' && v.replicas.every((r: { mode: string; failedAt: string | null }) => r.mode === 'RW' && r.failedAt === null) ? v : undefined;
  }, 120_000, 250);
  assert.deepEqual(back.replicas.map((r: { name: string }) => r.name).sort(), names, 'the same replicas: no new one');
  const events = mustZebuJson(up, ['events', '--volume', 'rec']);
  assert.ok(events.some((e: { reason: string; message: string }) => e.reason === 'ReplicaRebuilt' && /after a delta rebuild/.test(e.message)), JSON.stringify(events.map((e: { message: string }) => e.message)));
  verifyClean(up, 'rec');

  // Every replica killed at once: faulted; auto-salvage restarts the engine (new epoch) on them.
  const epochBefore = back.epoch;
  for (const r of mustZebuJson(up, ['replica', 'list', '--volume', 'rec'])) process.kill(r.pid, 'SIGKILL');
  const salvaged = await waitFor('healthy after a salvage', () => {
    const v = mustZebuJson(up, ['volume', 'get', 'rec']);
    return v.state === 'attached' && v.robustness === 'healthy' && v.epoch > epochBefore ? v : undefined;
  }, 180_000, 250);
  const reasons = mustZebuJson(up, ['events', '--volume', 'rec']).map((e: { reason: string }) => e.reason);
  assert.ok(reasons.includes('SalvageStarted') || reasons.includes('EngineRestarting'), reasons.join(' '));
  qemuIo(salvaged.endpoint, ['read -P 0x11 0 4M', 'read -P 0x33 4M 4M', 'read -P 0x11 8M 8M', 'read -P 0x22 40M 8M']);
  verifyClean(up, 'rec');

  // The engine killed: a new process under a new epoch; the data is there.
  const engine = processesUnder(dataDir).find((p) => p.role === 'engine')!;
  process.kill(engine.pid, 'SIGKILL');
  const restarted = await waitFor('a new engine with a new epoch', () => {
    const v = mustZebuJson(up, ['volume', 'get', 'rec']);
    return v.state === 'attached' && v.robustness === 'healthy' && v.epoch > salvaged.epoch ? v : undefined;
  }, 120_000, 250);
  qemuIo(restarted.endpoint, ['read -P 0x33 4M 4M', 'read -P 0x22 40M 8M']);
  assert.notEqual(mustZebuJson(up, ['volume', 'get', 'rec']).lastRecovery, null, 'the engine reported its start-up recovery');
  verifyClean(up, 'rec');
  assert.match(mustZebu(up, ['volume', 'get', 'rec']), /^last verify:\s+\S+, \d+ region\(s\) of 3 replica\(s\), identical/m);
});
