/**
 * The data path does not depend on the manager: SIGKILL `zebu up` while volumes are attached and
 * in use; client I/O goes on; a new `zebu up` on the same data directory finds its state, re-adopts
 * the running processes (same pids, no duplicates) and manages them again. A clean stop (SIGTERM)
 * stops every process; the next start brings the attached volumes back with their data.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { run } from '../support/volume-cluster.ts';
import { startZebuUp, stopZebuUp, mustZebu, mustZebuJson, zebuDataDir, waitFor, processesUnder, type ProcessInfo } from '../support/zebu-up.ts';
import { startFio, fioVerifyArgs, fioFigures } from '../support/fio.ts';

function byRole(procs: ProcessInfo[]): Record<string, number[]> {
  const out: Record<string, number[]> = {};
  for (const p of procs) (out[p.role] ??= []).push(p.pid);
  for (const list of Object.values(out)) list.sort((a, b) => a - b);
  return out;
}

function qemuIo(uri: string, ...commands: string[]): void {
  const r = run('qemu-io', ['-f', 'raw', ...commands.flatMap((c) => ['-c', c]), uri], { timeoutMs: 120_000 });
  assert.equal(r.status, 0, r.stdout + r.stderr);
  assert.doesNotMatch(r.stdout + r.stderr, /verification failed|error/i);
}

test('SIGKILL zebu up with attached volumes: I/O goes on; a restart re-adopts every process, none duplicated', async (t) => {
  const dataDir = zebuDataDir(t);
  const up = await startZebuUp({ dataDir });
  mustZebu(up, ['volume', 'create', 'a', '--size', '256MiB', '--replicas', '3']);
  mustZebu(up, ['volume', 'create', 'b', '--size', '64MiB', '--replicas', '2']);
  const uriA = mustZebu(up, ['volume', 'attach', 'a']).trim();
  const uriB = mustZebu(up, ['volume', 'attach', 'b']).trim();
  qemuIo(uriB, 'write -P 0x5a 0 1M', 'flush');

  const before = byRole(processesUnder(dataDir));
  assert.equal(before.up.length, 1);
  assert.equal(before.frontend.length, 1);
  assert.equal(before.engine.length, 2);
  assert.equal(before.replica.length, 5);

  const fio = startFio(t, fioVerifyArgs(uriA, { sizeMiB: 160 }));
  await new Promise((r) => setTimeout(r, 1500));
  up.child.kill('SIGKILL');
  await up.exited;

  // The manager is gone; the data path is not.
  qemuIo(uriB, 'read -P 0x5a 0 1M', 'write -P 0x6b 1M 1M', 'read -P 0x6b 1M 1M');
  const without = byRole(processesUnder(dataDir));
  assert.equal(without.up, undefined);
  assert.deepEqual({ ...without, up: before.up }, before, 'every data-path process still runs');

  const again = await startZebuUp({ dataDir });
  t.after(() => stopZebuUp(again));
  assert.equal(again.nbd, up.nbd, 'the same NBD listener');
  const volumes = await waitFor('both volumes attached and healthy', () => {
    const list = mustZebuJson(again, ['volume', 'list']);
    return list.every((v: { state: string; robustness: string }) => v.state === 'attached' && v.robustness === 'healthy') && list.length === 2 ? list : undefined;
  }, 60_000);
  assert.deepEqual(volumes.map((v: { endpoint: string }) => v.endpoint), [uriA, uriB]);
  // Give the agent a few reconcile rounds to (wrongly) start anything twice.
  await new Promise((r) => setTimeout(r, 3000));
  const after = byRole(processesUnder(dataDir));
  assert.equal(after.up.length, 1);
  assert.deepEqual({ ...after, up: before.up }, before, 're-adopted: the same processes, no new ones');

  const result = await fio.exit;
  assert.equal(result.code, 0, result.stderr);
  assert.equal(fioFigures(result.stdout).error, 0);
  qemuIo(uriB, 'read -P 0x5a 0 1M', 'read -P 0x6b 1M 1M');

  // Managed again: detach works on adopted processes.
  mustZebu(again, ['volume', 'detach', 'b']);
  const detached = byRole(processesUnder(dataDir));
  assert.equal(detached.engine.length, 1);
  assert.equal(detached.replica.length, 3);
  mustZebu(again, ['volume', 'attach', 'b']);

  // A clean stop stops everything; the next start brings the attached volumes back.
  assert.equal(await stopZebuUp(again), 0);
  await waitFor('no process left', () => processesUnder(dataDir).length === 0, 30_000);
  const third = await startZebuUp({ dataDir });
  t.after(() => stopZebuUp(third));
  await waitFor('attached again', () => mustZebuJson(third, ['volume', 'list']).every((v: { state: string; robustness: string }) => v.state === 'attached' && v.robustness === 'healthy'), 60_000);
  const uriB3 = mustZebuJson(third, ['volume', 'get', 'b']).endpoint;
  qemuIo(uriB3, 'read -P 0x5a 0 1M', 'read -P 0x6b 1M 1M');
});
