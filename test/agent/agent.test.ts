/**
 * The node agent with the manager, in this process, over a real store, running real replica,
 * engine and frontend processes: volumes come up and serve real clients; an agent that goes away
 * leaves the data path serving and a new one re-adopts it without duplicates.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { SqliteStore } from '../../src/store/sqlite-store.ts';
import { Manager } from '../../src/manager/manager.ts';
import { Agent } from '../../src/agent/agent.ts';
import { Kind } from '../../src/cluster/objects.ts';
import { ZEBU_MAIN } from '../support/replica-process.ts';
import { tempDir } from '../support/tmp.ts';
import { processesUnder, killAllUnder, waitFor } from '../support/zebu-up.ts';

const MiB = 1024 * 1024;

function qemuIo(uri: string, commands: string[]): { status: number | null; out: string } {
  const r = spawnSync('qemu-io', ['-f', 'raw', ...commands.flatMap((c) => ['-c', c]), uri], { timeout: 120_000 });
  return { status: r.status, out: `${r.stdout}${r.stderr}` };
}

function node(t: { after: (fn: () => unknown) => void }, dataDir: string, store: SqliteStore): { agent: Agent; manager: Manager } {
  const secretFile = path.join(dataDir, 'secret');
  if (!fs.existsSync(secretFile)) fs.writeFileSync(secretFile, 'a-test-secret-of-enough-bytes\n', { mode: 0o600 });
  const agent = new Agent({
    store,
    nodeId: 'n1',
    address: '127.0.0.1',
    nbdHost: '127.0.0.1',
    nbdPort: 0,
    disks: [0, 1, 2].map((i) => path.join(dataDir, 'disks', `disk-${i}`)),
    stateDir: dataDir,
    runDir: path.join(dataDir, 'run'),
    secretFile,
    main: ZEBU_MAIN,
    pollMs: 200,
  });
  const manager = new Manager({
    store,
    defaultNodeId: 'n1',
    agents: { engineRequest: (_node, volume, method, p, body) => agent.engineRequest(volume, method, p, body) },
    resyncMs: 1000,
  });
  return { agent, manager };
}

test('agent + manager: create, attach, serve qemu-io, re-adopt after the agent goes away, detach, delete', async (t) => {
  const dataDir = tempDir(t, 'zebu-agent-');
  t.after(() => killAllUnder(dataDir));
  const store = SqliteStore.open(path.join(dataDir, 'store.db'));
  t.after(() => store.close().catch(() => {}));
  let { agent, manager } = node(t, dataDir, store);
  await agent.start();
  await manager.start();
  await agent.frontendReady(30_000);
  const service = manager.service;

  assert.equal((await service.listDisks()).length, 3);
  await service.createVolume({ name: 'a1', sizeBytes: 64 * MiB, numberOfReplicas: 3 });
  await waitFor('detached', async () => (await service.getVolume('a1')).state === 'detached', 30_000);
  await service.attachVolume('a1', {});
  const attached = await waitFor('attached', async () => {
    const v = await service.getVolume('a1');
    return v.state === 'attached' && v.robustness === 'healthy' && v.endpoint !== null ? v : undefined;
  }, 60_000);
  assert.equal(attached.endpoint, `nbd://${agent.nbdAddress}/a1`);
  const uri = attached.endpoint!;
  let r = qemuIo(uri, ['write -P 0x5a 0 4M', 'write -P 0xa5 60M 4M', 'flush']);
  assert.equal(r.status, 0, r.out);
  const before = processesUnder(dataDir);
  assert.equal(before.filter((p) => p.role === 'replica').length, 3);
  assert.equal(before.filter((p) => p.role === 'engine').length, 1);
  assert.equal(before.filter((p) => p.role === 'frontend').length, 1);
  // The engine's write-intent figures reach the metrics (the bound: the write-intent-max-regions default).
  const m = await waitFor('write-intent figures', async () => (await service.metrics()).find((x) => x.name === 'a1' && x.intent !== null), 30_000);
  assert.equal(m.intent!.maxActiveRegions, 256);
  assert.ok(Number.isInteger(m.intent!.activeRegions) && m.intent!.activeRegions >= 0 && m.intent!.activeRegions <= 256, JSON.stringify(m.intent));
  assert.equal(m.superseded, false);
  assert.ok(m.lastRecovery !== null, 'the first start-up recovery');

  // The agent and manager go away without stopping the data path: I/O goes on.
  await manager.stop();
  await agent.stop({ stopProcesses: false });
  r = qemuIo(uri, ['read -P 0x5a 0 4M', 'write -P 0x33 8M 1M']);
  assert.equal(r.status, 0, r.out);

  // A new agent re-adopts the same processes: same pids, none added.
  ({ agent, manager } = node(t, dataDir, store));
  await agent.start();
  await manager.start();
  await agent.frontendReady(30_000);
  await waitFor('attached after re-adoption', async () => {
    const v = await manager.service.getVolume('a1');
    return v.state === 'attached' && v.robustness === 'healthy' ? v : undefined;
  }, 30_000);
  await new Promise((resolve) => setTimeout(resolve, 1500)); // a few reconcile rounds
  const after = processesUnder(dataDir);
  assert.deepEqual(after.map((p) => p.pid).sort(), before.map((p) => p.pid).sort(), 'the same processes, none duplicated');
  r = qemuIo(uri, ['read -P 0x33 8M 1M', 'read -P 0xa5 60M 4M']);
  assert.equal(r.status, 0, r.out);

  // Detach: the engine goes, the replicas stop; attach again: data intact under a new epoch.
  await manager.service.detachVolume('a1');
  await waitFor('detached', async () => (await manager.service.getVolume('a1')).state === 'detached', 30_000);
  assert.equal(processesUnder(dataDir).filter((p) => p.role !== 'frontend').length, 0);
  await manager.service.attachVolume('a1', {});
  const again = await waitFor('attached again', async () => {
    const v = await manager.service.getVolume('a1');
    return v.state === 'attached' && v.endpoint !== null ? v : undefined;
  }, 60_000);
  assert.equal(again.epoch, 2);
  r = qemuIo(again.endpoint!, ['read -P 0x5a 0 4M', 'read -P 0x33 8M 1M', 'read -P 0xa5 60M 4M']);
  assert.equal(r.status, 0, r.out);
  await manager.service.detachVolume('a1');
  await waitFor('detached', async () => (await manager.service.getVolume('a1')).state === 'detached', 30_000);

  const dirs = (await manager.service.listReplicas({ volume: 'a1' })).map((x) => x.dataPath);
  assert.equal(dirs.length, 3);
  for (const d of dirs) assert.ok(fs.existsSync(d), d);
  await manager.service.deleteVolume('a1');
  await waitFor('deleted', async () => (await manager.service.listVolumes()).length === 0, 30_000);
  await waitFor('replica directories removed', async () => dirs.every((d) => !fs.existsSync(d)), 30_000);
  assert.deepEqual((await store.list(Kind.Replica)).items, []);

  await manager.stop();
  await agent.stop({ stopProcesses: true });
  assert.deepEqual(processesUnder(dataDir), [], 'a clean stop leaves no process');
});

test('agent: a crashed frontend or engine is restarted and serves again; exactly one of each remains', async (t) => {
  const dataDir = tempDir(t, 'zebu-agent-');
  t.after(() => killAllUnder(dataDir));
  const store = SqliteStore.open(path.join(dataDir, 'store.db'));
  const { agent, manager } = node(t, dataDir, store);
  t.after(async () => {
    await manager.stop();
    await agent.stop({ stopProcesses: true });
    await store.close();
  });
  await agent.start();
  await manager.start();
  await agent.frontendReady(30_000);
  const service = manager.service;
  await service.createVolume({ name: 'c1', sizeBytes: 32 * MiB, numberOfReplicas: 2 });
  await waitFor('detached', async () => (await service.getVolume('c1')).state === 'detached', 30_000);
  await service.attachVolume('c1', {});
  const v = await waitFor('attached', async () => {
    const x = await service.getVolume('c1');
    return x.state === 'attached' && x.endpoint !== null ? x : undefined;
  }, 60_000);
  let r = qemuIo(v.endpoint!, ['write -P 0x11 0 1M', 'flush']);
  assert.equal(r.status, 0, r.out);

  for (const role of ['frontend', 'engine'] as const) {
    const victim = processesUnder(dataDir).find((p) => p.role === role)!;
    process.kill(victim.pid, 'SIGKILL');
    await waitFor(`${role} restarted`, () => {
      const now = processesUnder(dataDir).filter((p) => p.role === role);
      return now.length === 1 && now[0].pid !== victim.pid;
    }, 30_000);
    const served = await waitFor(`volume served again after the ${role} crash`, async () => {
      const x = await service.getVolume('c1');
      if (x.state !== 'attached' || x.endpoint === null) return undefined;
      const check = qemuIo(x.endpoint, ['read -P 0x11 0 1M']);
      return check.status === 0 ? x : undefined;
    }, 60_000, 500);
    assert.equal(served.state, 'attached');
  }
  // The engine's crash reads once in the event, in the supervisor's words.
  const restarting = (await service.listEvents({ volume: 'c1' })).find((e) => e.reason === 'EngineRestarting');
  assert.match(restarting?.message ?? '', /^the engine process of volume c1 \(epoch 1\) is gone \(crashed: killed by SIGKILL.*\): starting a new one with epoch 2$/s);
  assert.doesNotMatch(restarting!.message, /waiting for a new epoch/);
  r = qemuIo(v.endpoint!, ['write -P 0x22 1M 1M', 'read -P 0x11 0 1M', 'read -P 0x22 1M 1M']);
  assert.equal(r.status, 0, r.out);
  const procs = processesUnder(dataDir);
  assert.equal(procs.filter((p) => p.role === 'replica').length, 2);
  assert.equal(procs.filter((p) => p.role === 'engine').length, 1);
  assert.equal(procs.filter((p) => p.role === 'frontend').length, 1);
});
