/**
 * The manager's controllers against a simulated agent (no processes): the volume life cycle,
 * self-healing decisions, placement failures, expansion and deletion, all through the store.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { SqliteStore } from '../../src/store/sqlite-store.ts';
import { Manager } from '../../src/manager/manager.ts';
import { Kind, Objects, type EngineValue, type ReplicaValue } from '../../src/manager/objects.ts';
import type { Store } from '../../src/store/store.ts';

const GiB = 1024 ** 3;

/** Plays the node agent: runs "processes" by writing their status. */
class FakeAgent {
  private readonly objects: Objects;
  private port = 20000;
  private timer: NodeJS.Timeout | null = null;
  /** Engine replica modes the test forces (replica name -> mode). */
  readonly forced = new Map<string, 'RW' | 'WO' | 'ERR'>();
  /** When set, every replica that joins a running engine fails its rebuild. */
  failRebuilds = false;
  /** Replicas that joined a running engine and are "rebuilding" for one more round. */
  private readonly rebuilding = new Set<string>();
  readonly requests: string[] = [];

  constructor(store: Store) {
    this.objects = new Objects(store);
  }

  start(): void {
    this.timer = setInterval(() => void this.step().catch(() => {}), 20);
  }
  stop(): void {
    if (this.timer !== null) clearInterval(this.timer);
  }

  private async step(): Promise<void> {
    for (const r of await this.objects.list(Kind.Replica)) {
      if (r.value.deletionRequestedAt !== null) {
        await this.objects.remove(Kind.Replica, r.name);
        continue;
      }
      const running = r.value.spec.desireState === 'running';
      await this.objects.mutate(Kind.Replica, r.name, (x) => {
        if (running && x.status.state !== 'running') x.status = { ...x.status, state: 'running', address: `127.0.0.1:${this.port++}`, pid: 1 };
        if (!running) x.status = { ...x.status, state: 'stopped', address: null, pid: null };
      });
    }
    for (const e of await this.objects.list(Kind.Engine)) {
      await this.objects.mutate(Kind.Engine, e.name, (x) => {
        if (x.spec.desireState === 'stopped') {
          x.status = { ...x.status, state: 'stopped', replicas: {}, endpoint: null };
          return;
        }
        const fresh = x.status.state !== 'running';
        const replicas: EngineValue['status']['replicas'] = {};
        for (const name of Object.keys(x.spec.replicas)) {
          const known = x.status.replicas[name];
          let mode: 'RW' | 'WO' | 'ERR' = known?.mode ?? (fresh ? 'RW' : 'WO');
          if (known === undefined && !fresh) this.rebuilding.add(name);
          else if (mode === 'WO' && this.rebuilding.has(name)) {
            this.rebuilding.delete(name);
            mode = 'RW';
          }
          mode = this.forced.get(name) ?? mode;
          if (this.failRebuilds && (mode === 'WO' || this.rebuilding.has(name))) mode = 'ERR';
          replicas[name] = { mode, reason: mode === 'ERR' ? 'killed by the test' : null, rebuild: mode === 'WO' ? { copiedBytes: 1, totalBytes: 2 } : null };
        }
        x.status = {
          ...x.status, state: 'running', epoch: x.spec.epoch, sizeBytes: x.spec.sizeBytes, replicas,
          endpoint: x.spec.frontend ? `nbd://127.0.0.1:10809/${e.name}` : null,
        };
      });
    }
  }
}

async function setup(t: { after: (fn: () => unknown) => void }, disks = 3) {
  const store = SqliteStore.open(':memory:');
  const objects = new Objects(store);
  await objects.create(Kind.Node, 'n1', { spec: { allowScheduling: true }, status: { address: '127.0.0.1', nbdAddress: '127.0.0.1:10809', lastHeartbeatAt: null } });
  const lease = await store.grantLease(60_000);
  await objects.create(Kind.NodeLease, 'n1', { startedAt: new Date().toISOString() }, { leaseId: lease.id });
  for (let i = 0; i < disks; i++) {
    await objects.create(Kind.Disk, `n1-d${i}`, {
      spec: { nodeId: 'n1', path: `/disks/d${i}`, allowScheduling: true, storageReservedBytes: 0 },
      status: { diskUuid: `u${i}`, storageMaximumBytes: 100 * GiB, storageAvailableBytes: 90 * GiB, ready: true, message: null },
    });
  }
  const agent = new FakeAgent(store);
  const manager = new Manager({
    store,
    defaultNodeId: 'n1',
    resyncMs: 100,
    agents: { engineRequest: async (_node, volume, method, path) => {
      agent.requests.push(`${volume} ${method} ${path}`);
      return path === '/v1/snapshots' && method === 'GET' ? [] : {};
    } },
  });
  agent.start();
  await manager.start();
  t.after(async () => {
    agent.stop();
    await manager.stop();
    await store.close();
  });
  return { store, objects, manager, service: manager.service, agent };
}

async function until<T>(what: string, fn: () => Promise<T | undefined | false>, timeoutMs = 10_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await fn();
    if (v !== undefined && v !== false) return v as T;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

test('create -> detached -> attach (epoch 1) -> attached healthy -> detach -> attach (epoch 2)', async (t) => {
  const { service, objects } = await setup(t);
  const created = await service.createVolume({ name: 'v', sizeBytes: GiB, numberOfReplicas: 3 });
  assert.equal(created.state, 'creating');
  const detached = await until('detached', async () => {
    const v = await service.getVolume('v');
    return v.state === 'detached' ? v : undefined;
  });
  assert.equal(detached.replicas.length, 3);
  assert.equal(new Set(detached.replicas.map((r) => r.diskId)).size, 3);

  await service.attachVolume('v', {});
  const attached = await until('attached', async () => {
    const v = await service.getVolume('v');
    return v.state === 'attached' && v.robustness === 'healthy' ? v : undefined;
  });
  assert.equal(attached.epoch, 1);
  assert.equal(attached.endpoint, 'nbd://127.0.0.1:10809/v');
  const engine = await objects.must(Kind.Engine, 'v');
  assert.equal(Object.keys(engine.value.spec.replicas).length, 3);
  // Every replica that served is marked healthy.
  for (const r of await objects.list(Kind.Replica)) assert.notEqual(r.value.spec.healthyAt, null);

  await service.detachVolume('v');
  await until('detached again', async () => (await service.getVolume('v')).state === 'detached');
  assert.equal(await objects.get(Kind.Engine, 'v'), null);
  for (const r of await objects.list(Kind.Replica)) assert.equal(r.value.spec.desireState, 'stopped');

  await service.attachVolume('v', {});
  const again = await until('attached again', async () => {
    const v = await service.getVolume('v');
    return v.state === 'attached' ? v : undefined;
  });
  assert.equal(again.epoch, 2);
});

test('a replica ERR is replaced: failed, new one scheduled, added to the engine, rebuilt, failed one deleted', async (t) => {
  const { service, objects, agent } = await setup(t, 4);
  await service.createVolume({ name: 'h', sizeBytes: GiB, numberOfReplicas: 3 });
  await until('detached', async () => (await service.getVolume('h')).state === 'detached');
  await service.attachVolume('h', {});
  await until('healthy', async () => (await service.getVolume('h')).robustness === 'healthy');
  const original = (await objects.list(Kind.Replica)).map((r) => r.name);
  const victim = original[0];
  agent.forced.set(victim, 'ERR');

  await until('degraded', async () => (await service.getVolume('h')).robustness === 'degraded');
  const healed = await until('healthy with a new replica', async () => {
    const v = await service.getVolume('h');
    return v.robustness === 'healthy' && !v.replicas.some((r) => r.name === victim) ? v : undefined;
  });
  assert.equal(healed.replicas.length, 3);
  const names = healed.replicas.map((r) => r.name);
  const added = names.filter((n) => !original.includes(n));
  assert.equal(added.length, 1);
  // The replacement avoids the disks of the two survivors.
  const survivorsDisks = healed.replicas.filter((r) => r.name !== added[0]).map((r) => r.diskId);
  assert.ok(!survivorsDisks.includes(healed.replicas.find((r) => r.name === added[0])!.diskId));
  await until('the failed replica is gone', async () => (await objects.get(Kind.Replica, victim)) === null);
  const engine = await objects.must(Kind.Engine, 'h');
  assert.ok(!(victim in engine.value.spec.replicas));
  const reasons = (await service.listEvents({ volume: 'h' })).map((e) => e.reason);
  for (const r of ['ReplicaFailed', 'ReplicaScheduled', 'Degraded', 'Healthy', 'ReplicaRemoved']) assert.ok(reasons.includes(r), r);
});

test('no room for a replacement: stays degraded with a clear message; room later heals it', async (t) => {
  const { service, objects, agent } = await setup(t, 3);
  await service.createVolume({ name: 'd', sizeBytes: GiB, numberOfReplicas: 3 });
  await until('detached', async () => (await service.getVolume('d')).state === 'detached');
  await service.attachVolume('d', {});
  await until('healthy', async () => (await service.getVolume('d')).robustness === 'healthy');
  // The only disk left for a replacement is the failed replica's own one: take it out of scheduling.
  const victimReplica = (await objects.list(Kind.Replica))[0];
  const victim = victimReplica.name;
  await service.updateDisk(victimReplica.value.spec.diskId, { allowScheduling: false });
  agent.forced.set(victim, 'ERR');
  const degraded = await until('a placement message', async () => {
    const v = await service.getVolume('d');
    return v.robustness === 'degraded' && v.message !== null ? v : undefined;
  });
  assert.match(degraded.message!, /cannot place 1 replica/);
  // Its disk is allowed again: the replacement goes there (a new directory), the volume heals.
  await service.updateDisk(victimReplica.value.spec.diskId, { allowScheduling: true });
  await until('healthy', async () => (await service.getVolume('d')).robustness === 'healthy');
});

test('placement is checked at create; delete removes replicas then the volume', async (t) => {
  const { service, objects } = await setup(t, 2);
  await assert.rejects(service.createVolume({ name: 'x', sizeBytes: GiB, numberOfReplicas: 3 }), (err: { field?: string; message: string }) => {
    assert.equal(err.field, 'numberOfReplicas');
    assert.match(err.message, /only 2 of 3/);
    return true;
  });
  await assert.rejects(service.createVolume({ name: 'x', sizeBytes: 4097, numberOfReplicas: 1 }), /multiple of 4096/);
  await assert.rejects(service.createVolume({ name: 'x', sizeBytes: 2 ** 45, numberOfReplicas: 1 }), /16 TiB/);
  assert.deepEqual(await service.listVolumes(), []);

  await service.createVolume({ name: 'x', sizeBytes: GiB, numberOfReplicas: 2 });
  await assert.rejects(service.createVolume({ name: 'x', sizeBytes: GiB, numberOfReplicas: 2 }), /already exists/);
  await until('detached', async () => (await service.getVolume('x')).state === 'detached');
  await service.attachVolume('x', {});
  await assert.rejects(service.deleteVolume('x'), /detach it first/);
  await until('attached', async () => (await service.getVolume('x')).state === 'attached');
  await service.detachVolume('x');
  await until('detached', async () => (await service.getVolume('x')).state === 'detached');
  await service.deleteVolume('x');
  await until('gone', async () => (await service.listVolumes()).length === 0);
  assert.deepEqual(await objects.list(Kind.Replica), []);
});

test('expansion: offline grows the replicas; online updates the engine', async (t) => {
  const { service, objects } = await setup(t);
  await service.createVolume({ name: 'e', sizeBytes: GiB, numberOfReplicas: 2 });
  await until('detached', async () => (await service.getVolume('e')).state === 'detached');
  await assert.rejects(service.expandVolume('e', GiB / 2), /cannot shrink/);
  await service.expandVolume('e', 2 * GiB);
  await until('replicas grown', async () => (await objects.list(Kind.Replica)).every((r: { value: ReplicaValue }) => r.value.spec.sizeBytes === 2 * GiB));
  await service.attachVolume('e', {});
  await until('attached', async () => (await service.getVolume('e')).state === 'attached');
  await service.expandVolume('e', 3 * GiB);
  await until('engine grown', async () => (await objects.must(Kind.Engine, 'e')).value.status.sizeBytes === 3 * GiB);
  await until('replicas grown', async () => (await objects.list(Kind.Replica)).every((r: { value: ReplicaValue }) => r.value.spec.sizeBytes === 3 * GiB));
});

test('snapshots need an attached volume; revert needs maintenance mode', async (t) => {
  const { service, agent } = await setup(t);
  await service.createVolume({ name: 's', sizeBytes: GiB, numberOfReplicas: 1 });
  await until('detached', async () => (await service.getVolume('s')).state === 'detached');
  await assert.rejects(service.createSnapshot('s', 'a'), /attached/);
  await service.attachVolume('s', {});
  await until('attached', async () => (await service.getVolume('s')).state === 'attached');
  await assert.rejects(service.createSnapshot('s', 'bad name'), /snapshot name/);
  await assert.rejects(service.revertSnapshot('s', 'a'), /maintenance/);
  await assert.rejects(service.attachVolume('s', { maintenance: true }), /already attached/);
  await service.deleteSnapshot('s', 'a');
  assert.ok(agent.requests.includes('s DELETE /v1/snapshots/a'));
});

test('replacements that keep failing before they serve are removed at once, with growing waits; bounded', async (t) => {
  const { service, objects, agent } = await setup(t, 4);
  await service.createVolume({ name: 'b', sizeBytes: GiB, numberOfReplicas: 3 });
  await until('detached', async () => (await service.getVolume('b')).state === 'detached');
  await service.attachVolume('b', {});
  await until('healthy', async () => (await service.getVolume('b')).robustness === 'healthy');
  agent.failRebuilds = true;
  const victim = (await objects.list(Kind.Replica))[0].name;
  agent.forced.set(victim, 'ERR');
  const waiting = await until('a wait before the next replacement', async () => {
    const v = await service.getVolume('b');
    return v.message !== null && /replacement replica\(s\) failed before serving/.test(v.message) ? v : undefined;
  });
  assert.equal(waiting.robustness, 'degraded');
  // Over a few seconds: few attempts (1 s, 2 s, ...), and the failed ones do not pile up.
  let most = 0;
  for (let i = 0; i < 40; i++) {
    most = Math.max(most, (await objects.list(Kind.Replica)).length);
    await new Promise((r) => setTimeout(r, 100));
  }
  assert.ok(most <= 5, `at most the 3 original + 1 replacement + 1 being removed, saw ${most}`);
  const removed = (await service.listEvents({ volume: 'b' })).filter((e) => /failed before it served/.test(e.message));
  assert.ok(removed.length >= 1 && removed.length <= 4, `attempts with backoff: ${removed.length}`);
  agent.failRebuilds = false;
  await until('healthy once rebuilds work again', async () => (await service.getVolume('b')).robustness === 'healthy', 30_000);
});
