/**
 * The manager's controllers against a simulated agent (no processes): the volume life cycle,
 * self-healing decisions, placement failures, expansion and deletion, all through the store.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { SqliteStore } from '../../src/store/sqlite-store.ts';
import { Manager } from '../../src/manager/manager.ts';
import { Kind, Objects, type EngineValue, type ReplicaValue } from '../../src/cluster/objects.ts';
import type { Store, StoreObject } from '../../src/store/store.ts';
import { JobTasks } from '../../src/manager/recurring-job-tasks.ts';
import type { RecurringJobValue } from '../../src/cluster/objects.ts';

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
  /** With failRebuilds: the failed rebuilds got past their snapshots (the engine says they can go on). */
  resumableFailures = false;
  /** When set, the engine refuses a replica that comes back (no delta possible: EINVAL). */
  refuseDelta = false;
  /** Nodes that are down: nothing on them reports any more. */
  readonly down = new Set<string>();
  /** When set, engines asked to stop keep running (a detach stays in 'detaching'). */
  holdStops = false;
  /** Engines whose process is "killed" at the next step (volume names). */
  readonly crash = new Set<string>();
  /** Engines that report every replica ERR and faulted, as long as they run with this epoch or below. */
  readonly faultedUpTo = new Map<string, number>();
  /** Epochs every engine process was started with, in order (volume -> epochs). */
  readonly started = new Map<string, number[]>();
  /** Where each engine has each replica (volume -> name -> address). */
  private readonly engineAt = new Map<string, Map<string, string>>();
  /** Verify answers of the engines (volume -> regions differing). */
  readonly differing = new Map<string, number[]>();
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
      if (this.down.has(r.value.spec.nodeId)) continue;
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
      if (this.down.has(e.value.spec.nodeId)) continue;
      await this.objects.mutate(Kind.Engine, e.name, (x) => {
        if (x.spec.desireState === 'stopped') {
          if (this.holdStops) return false;
          x.status = { ...x.status, state: 'stopped', pid: null, replicas: {}, endpoint: null };
          return;
        }
        if (this.crash.delete(e.name)) {
          // As the agent writes it: the cause apart, and a sentence around it.
          const exitReason = 'crashed: killed by SIGKILL';
          x.status = { ...x.status, state: 'error', pid: null, endpoint: null, exitReason, message: `the engine process of epoch ${x.spec.epoch} is gone (${exitReason}); waiting for a new epoch` };
          return;
        }
        // The agent's rule: a process per epoch, never two with the same one.
        let fresh = false;
        if (x.status.pid === null) {
          if ((x.status.startedEpoch ?? 0) >= x.spec.epoch) return;
          fresh = true;
          x.status.startedEpoch = x.spec.epoch;
          this.started.set(e.name, [...(this.started.get(e.name) ?? []), x.spec.epoch]);
          this.engineAt.set(e.name, new Map());
        }
        const at = this.engineAt.get(e.name) ?? new Map<string, string>();
        this.engineAt.set(e.name, at);
        const faulted = x.spec.epoch <= (this.faultedUpTo.get(e.name) ?? 0);
        const replicas: EngineValue['status']['replicas'] = {};
        const addErrors: NonNullable<EngineValue['status']['addErrors']> = {};
        for (const [name, address] of Object.entries(x.spec.replicas)) {
          const known = at.get(name) === address ? x.status.replicas[name] : undefined;
          const returning = !fresh && at.has(name) && at.get(name) !== address;
          if (returning && this.refuseDelta) {
            addErrors[name] = { address, code: 'ZEBU_ERR_EINVAL', message: 'not empty and no delta possible' };
            at.delete(name);
            continue;
          }
          if (returning) this.forced.delete(name);
          at.set(name, address);
          let mode: 'RW' | 'WO' | 'ERR' = known?.mode ?? (fresh ? 'RW' : 'WO');
          if (known === undefined && !fresh) this.rebuilding.add(name);
          else if (mode === 'WO' && this.rebuilding.has(name)) {
            this.rebuilding.delete(name);
            mode = 'RW';
          }
          mode = this.forced.get(name) ?? mode;
          if (faulted) mode = 'ERR';
          let resumable = false;
          if (this.failRebuilds && (mode === 'WO' || this.rebuilding.has(name))) {
            mode = 'ERR';
            resumable = this.resumableFailures;
          }
          replicas[name] = { address, mode, reason: mode === 'ERR' ? 'killed by the test' : null, rebuild: mode === 'WO' ? { copiedBytes: 1, totalBytes: 2 } : null, ...(resumable ? { resumable } : {}) };
        }
        x.status = {
          ...x.status, state: 'running', pid: 4242, epoch: x.spec.epoch, sizeBytes: x.spec.sizeBytes, replicas, addErrors, exitReason: null,
          activeRegions: 5, maxActiveRegions: 256, superseded: false,
          faulted, faultedReason: faulted ? 'no replica left in service' : null,
          endpoint: x.spec.frontend ? `nbd://127.0.0.1:10809/${e.name}` : null,
          recovery: fresh ? {
            at: new Date().toISOString(), clean: false, source: Object.keys(x.spec.replicas)[0] ?? null, checkedRegions: 4, regions: 3, bytes: 3 * 4 * 2 ** 20, durationMs: 7,
            deltaReplicas: [], erredReplicas: [],
          } : x.status.recovery,
        };
      });
    }
  }

  /** The replica process dies and its agent restarts it on a new port. */
  async restartReplica(name: string): Promise<void> {
    await this.objects.mutate(Kind.Replica, name, (x) => {
      x.status = { ...x.status, state: 'running', address: `127.0.0.1:${this.port++}`, pid: 2 };
    });
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
    scrubPollMs: 50,
    agents: { engineRequest: async (_node, volume, method, path, body) => {
      agent.requests.push(`${volume} ${method} ${path}${body !== undefined ? ` ${JSON.stringify(body)}` : ''}`);
      if (path === '/v1/verify') {
        const engine = await objects.must(Kind.Engine, volume);
        const [first, second] = Object.entries(engine.value.spec.replicas);
        return {
          regions: 256, repaired: (body as { repair: boolean }).repair ? (agent.differing.get(volume) ?? []).length : 0, durationMs: 5,
          differing: (agent.differing.get(volume) ?? []).map((region) => ({
            region, offset: region * 4 * 2 ** 20, length: 4 * 2 ** 20, hashes: { [`${first[0]}=${first[1]}`]: 'aa', [second[1]]: 'bb' },
          })),
        };
      }
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

/** Node `name`, up (its lease held for a minute), with these disks; returns its lease. */
async function addNode(objects: Objects, store: Store, name: string, disks: string[], allowScheduling = true): Promise<{ id: string }> {
  await objects.create(Kind.Node, name, { spec: { allowScheduling }, status: { address: '127.0.0.2', nbdAddress: '127.0.0.2:10809', lastHeartbeatAt: null } });
  const lease = await store.grantLease(60_000);
  await objects.create(Kind.NodeLease, name, { startedAt: new Date().toISOString() }, { leaseId: lease.id });
  for (const d of disks) {
    await objects.create(Kind.Disk, d, {
      spec: { nodeId: name, path: `/disks/${d}`, allowScheduling: true, storageReservedBytes: 0 },
      status: { diskUuid: d, storageMaximumBytes: 100 * GiB, storageAvailableBytes: 90 * GiB, ready: true, message: null },
    });
  }
  return lease;
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

test('an attach while the volume is still detaching waits for the detach, then attaches with a new epoch; a detach withdraws it', async (t) => {
  const { service, agent } = await setup(t);
  await attachedHealthy(service, 'v', 2);

  agent.holdStops = true;
  await service.detachVolume('v');
  await until('detaching', async () => (await service.getVolume('v')).state === 'detaching');
  const waiting = await service.attachVolume('v', {});
  assert.equal(waiting.pendingAttach?.nodeId, 'n1');
  assert.ok((await service.listEvents({ volume: 'v' })).some((e) => e.reason === 'AttachWaiting' && /finish detaching/.test(e.message)));
  // Asked again the same way: the same waiting attach; another node or mode: a clear refusal.
  assert.equal((await service.attachVolume('v', {})).pendingAttach?.requestedAt, waiting.pendingAttach?.requestedAt);
  await assert.rejects(service.attachVolume('v', { maintenance: true }), /already waits for the volume to finish detaching/);
  agent.holdStops = false;
  const attached = await until('attached', async () => {
    const v = await service.getVolume('v');
    return v.state === 'attached' && v.endpoint !== null ? v : undefined;
  });
  assert.equal(attached.epoch, 2);
  assert.equal(attached.pendingAttach, null);

  // A detach while the attach waits withdraws it: the volume ends detached.
  agent.holdStops = true;
  await service.detachVolume('v');
  await until('detaching', async () => (await service.getVolume('v')).state === 'detaching');
  assert.notEqual((await service.attachVolume('v', {})).pendingAttach, null);
  assert.equal((await service.detachVolume('v')).pendingAttach, null);
  agent.holdStops = false;
  await until('detached', async () => (await service.getVolume('v')).state === 'detached');
  await new Promise((r) => setTimeout(r, 300));
  const after = await service.getVolume('v');
  assert.equal(after.state, 'detached');
  assert.equal(after.nodeId, null);
});

test('a replica ERR is replaced: failed, new one scheduled, added to the engine, rebuilt, failed one deleted', async (t) => {
  const { service, objects, agent } = await setup(t, 4);
  await service.setSetting('replica-replenishment-wait-seconds', '0');
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
  await service.setSetting('replica-replenishment-wait-seconds', '0');
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
  await service.setSetting('replica-replenishment-wait-seconds', '0');
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

async function attachedHealthy(service: Awaited<ReturnType<typeof setup>>['service'], name: string, replicas = 3): Promise<void> {
  await service.createVolume({ name, sizeBytes: GiB, numberOfReplicas: replicas });
  await until('detached', async () => (await service.getVolume(name)).state === 'detached');
  await service.attachVolume(name, {});
  await until('healthy', async () => (await service.getVolume(name)).robustness === 'healthy');
}

test('epochs: a crashed engine process comes back with a new epoch; so does one gone with its node; never one epoch twice', async (t) => {
  const { service, objects, agent } = await setup(t);
  await attachedHealthy(service, 'ep');
  assert.deepEqual(agent.started.get('ep'), [1]);
  agent.crash.add('ep');
  const back = await until('running again under epoch 2', async () => {
    const e = await objects.must(Kind.Engine, 'ep');
    const v = await service.getVolume('ep');
    return e.value.status.state === 'running' && e.value.status.epoch === 2 && v.state === 'attached' ? v : undefined;
  });
  assert.equal(back.epoch, 2);
  // The node stopped cleanly (zebu up SIGTERM): the agent recorded the engine stopped; the next process gets epoch 3.
  await objects.mutate(Kind.Engine, 'ep', (x) => {
    x.status = { ...x.status, state: 'stopped', pid: null, replicas: {}, endpoint: null };
  });
  await until('epoch 3', async () => (await objects.must(Kind.Engine, 'ep')).value.status.epoch === 3);
  assert.deepEqual(agent.started.get('ep'), [1, 2, 3], 'one process per epoch');
  assert.equal((await service.getVolume('ep')).epoch, 3);
  const events = (await service.listEvents({ volume: 'ep' })).filter((e) => e.reason === 'EngineRestarting');
  assert.equal(events.length, 2);
  assert.match(events.at(-1)!.message, /^the engine process of volume ep \(epoch 1\) is gone \(crashed: killed by SIGKILL\): starting a new one with epoch 2$/);
  assert.match(events.at(0)!.message, /\(epoch 2\) is gone: starting a new one with epoch 3$/, 'a clean stop has no cause');
  // The engine's start-up recovery shows in the volume, with an event (it resynced regions).
  const v = await service.getVolume('ep');
  assert.equal(v.lastRecovery?.regions, 3);
  // ... and in the metrics, with the engine's write-intent figures.
  const m = (await service.metrics()).find((x) => x.name === 'ep')!;
  assert.deepEqual(m.lastRecovery, { regions: 3, bytes: 3 * 4 * 2 ** 20, durationSeconds: 0.007 });
  assert.deepEqual(m.intent, { activeRegions: 5, maxActiveRegions: 256 });
  assert.equal(m.superseded, false);
  assert.equal(m.lastVerify, null);
  assert.ok((await service.listEvents({ volume: 'ep' })).some((e) => e.reason === 'Recovery' && /3 region\(s\) .* resynced from ep-r-/.test(e.message)));
});

test('delta reuse: a failed replica whose process comes back within the wait is added again, no new replica', async (t) => {
  const { service, objects, agent } = await setup(t, 4);
  await attachedHealthy(service, 'dr');
  const original = (await objects.list(Kind.Replica)).map((r) => r.name).sort();
  const victim = original[1];
  agent.forced.set(victim, 'ERR');
  await until('failed and kept running', async () => {
    const r = await objects.must(Kind.Replica, victim);
    return r.value.spec.failedAt !== null && r.value.spec.desireState === 'running';
  });
  const waiting = await until('degraded, waiting for it', async () => {
    const v = await service.getVolume('dr');
    return v.robustness === 'degraded' && v.message !== null && /to come back for a delta rebuild/.test(v.message) ? v : undefined;
  });
  assert.deepEqual(waiting.replicas.map((r) => r.name).sort(), original, 'no new replica while it may come back');
  await agent.restartReplica(victim);
  const healed = await until('healthy with the same replicas', async () => {
    const v = await service.getVolume('dr');
    return v.robustness === 'healthy' ? v : undefined;
  });
  assert.deepEqual(healed.replicas.map((r) => r.name).sort(), original);
  assert.equal((await objects.must(Kind.Replica, victim)).value.spec.failedAt, null);
  const engine = await objects.must(Kind.Engine, 'dr');
  assert.equal(engine.value.spec.replicas[victim], (await objects.must(Kind.Replica, victim)).value.status.address, 'the engine has it at its new address');
  const events = await service.listEvents({ volume: 'dr' });
  assert.ok(events.some((e) => e.reason === 'ReplicaReturning' && e.message.includes(`delta rebuild of ${victim}`)));
  assert.ok(events.some((e) => e.reason === 'ReplicaRebuilt' && e.message.includes(`${victim} is back in service (RW) after a delta rebuild`)));
  assert.ok(!events.some((e) => e.reason === 'ReplicaScheduled' && e.object !== victim && !original.includes(e.object)), 'no new replica scheduled');
});

test('delta reuse: refused by the engine, or not back within the wait -> a new replica replaces it', async (t) => {
  const { service, objects, agent } = await setup(t, 5);
  await attachedHealthy(service, 'rf');
  const original = (await objects.list(Kind.Replica)).map((r) => r.name);
  agent.refuseDelta = true;
  const refused = original[0];
  agent.forced.set(refused, 'ERR');
  await until('failed', async () => (await objects.must(Kind.Replica, refused)).value.spec.failedAt !== null);
  await agent.restartReplica(refused);
  await until('replaced and removed', async () => {
    const v = await service.getVolume('rf');
    return v.robustness === 'healthy' && !v.replicas.some((r) => r.name === refused);
  });
  const events = await service.listEvents({ volume: 'rf' });
  assert.ok(events.some((e) => e.reason === 'DeltaRefused' && e.message.includes(`cannot rebuild replica ${refused} by delta (not empty and no delta possible): a new replica replaces it`)));

  // The wait ends before the replica is back.
  await service.setSetting('replica-replenishment-wait-seconds', '1');
  const late = original[1];
  agent.forced.set(late, 'ERR');
  const started = Date.now();
  await until('replaced after the wait', async () => {
    const v = await service.getVolume('rf');
    return v.robustness === 'healthy' && !v.replicas.some((r) => r.name === late);
  });
  assert.ok(Date.now() - started >= 900, 'not before the wait');
  assert.ok((await service.listEvents({ volume: 'rf' })).some((e) => e.reason === 'ReplicaReplacing' && e.message.includes(`${late} did not come back within 1 s: a new replica replaces it`)));
});

test('salvage: 409 unless faulted, 400 for unknown replicas; the chosen replicas come back under a new engine and epoch; the others are replaced', async (t) => {
  const { service, objects, agent } = await setup(t, 4);
  await service.setSetting('auto-salvage', 'false');
  await attachedHealthy(service, 'sv');
  const names = (await objects.list(Kind.Replica)).map((r) => r.name).sort();
  await assert.rejects(service.salvageVolume('sv', {}), (err: { code: string; message: string }) => err.code === 'ZEBU_ERR_BUSY' && /not faulted/.test(err.message));
  await assert.rejects(service.salvageVolume('nope', {}), /volume nope not found/);
  agent.faultedUpTo.set('sv', 1);
  const faulted = await until('faulted', async () => {
    const v = await service.getVolume('sv');
    return v.robustness === 'faulted' ? v : undefined;
  });
  assert.match(faulted.message!, /auto-salvage is off/);
  await new Promise((r) => setTimeout(r, 300));
  assert.deepEqual(agent.started.get('sv'), [1], 'no automatic salvage when the setting is off');
  await assert.rejects(service.salvageVolume('sv', { replicas: [names[0], 'sv-r-nothere'] }), (err: { field?: string; message: string }) => err.field === 'replicas' && /sv-r-nothere/.test(err.message));
  await service.salvageVolume('sv', { replicas: [names[0], names[1]] });
  const back = await until('healthy again', async () => {
    const v = await service.getVolume('sv');
    return v.robustness === 'healthy' && v.state === 'attached' ? v : undefined;
  });
  assert.equal(back.epoch, 2);
  assert.deepEqual(agent.started.get('sv'), [1, 2]);
  assert.ok(!back.replicas.some((r) => r.name === names[2]), 'the one left out was replaced');
  assert.ok(back.replicas.some((r) => r.name === names[0]) && back.replicas.some((r) => r.name === names[1]));
  const events = await service.listEvents({ volume: 'sv' });
  assert.ok(events.some((e) => e.reason === 'SalvageStarted' && e.message.includes(`from replica(s) ${names[0]}, ${names[1]}`)));
  assert.ok(events.some((e) => e.reason === 'Salvaged' && /brought it back: 2 of 3 replica\(s\) in service/.test(e.message)), JSON.stringify(events.map((e) => e.message)));
});

test('auto-salvage: a faulted volume is salvaged by itself; one that stays faulted is retried with a growing wait', async (t) => {
  const { service, agent } = await setup(t);
  await attachedHealthy(service, 'as');
  agent.faultedUpTo.set('as', 2); // the first salvage does not help, the second does
  const back = await until('healthy after two salvages', async () => {
    const v = await service.getVolume('as');
    return v.robustness === 'healthy' && v.epoch === 3 ? v : undefined;
  }, 20_000);
  assert.equal(back.state, 'attached');
  assert.deepEqual(agent.started.get('as'), [1, 2, 3]);
  const events = await service.listEvents({ volume: 'as' });
  assert.equal(events.filter((e) => e.reason === 'SalvageStarted' && /automatic/.test(e.message)).length, 2);
  assert.ok(events.some((e) => e.reason === 'SalvageFailed' && /still faulted/.test(e.message)));
  assert.ok(events.some((e) => e.reason === 'Salvaged'));
});

test('verify: the engine report in replica names, kept as lastVerify with an event; scrub-schedule runs it; a bad schedule is refused', async (t) => {
  const { service, objects, agent } = await setup(t);
  await service.createVolume({ name: 'vf', sizeBytes: GiB, numberOfReplicas: 2 });
  await until('detached', async () => (await service.getVolume('vf')).state === 'detached');
  await assert.rejects(service.verifyVolume('vf', {}), /verify needs volume vf attached/);
  await service.attachVolume('vf', {});
  await until('healthy', async () => (await service.getVolume('vf')).robustness === 'healthy');
  const clean = await service.verifyVolume('vf', {});
  assert.deepEqual([clean.regions, clean.differing.length, clean.repaired, clean.repair], [256, 0, 0, false]);
  agent.differing.set('vf', [7]);
  const found = await service.verifyVolume('vf', { repair: false });
  const names = Object.keys((await objects.must(Kind.Engine, 'vf')).value.spec.replicas).sort();
  assert.deepEqual(Object.keys(found.differing[0].hashes).sort(), names, 'keys and addresses become replica names');
  assert.equal(found.differing[0].offset, 7 * 4 * 2 ** 20);
  assert.deepEqual((await service.getVolume('vf')).lastVerify, found);
  const warning = (await service.listEvents({ volume: 'vf' })).find((e) => e.reason === 'VerifyDone');
  assert.equal(warning?.type, 'Warning');
  assert.match(warning!.message, /1 of 256 region\(s\) differ \(7\), not repaired/);
  const repaired = await service.verifyVolume('vf', { repair: true });
  assert.equal(repaired.repaired, 1);
  assert.ok(agent.requests.includes('vf POST /v1/verify {"repair":true}'));
  await assert.rejects(service.verifyVolume('vf', { repair: 'yes' as unknown as boolean }), (err: { field?: string }) => err.field === 'repair');

  await assert.rejects(service.setSetting('scrub-schedule', 'every day'), (err: { field?: string; message: string }) => err.field === 'value' && /not a cron expression/.test(err.message));
  agent.requests.length = 0;
  await service.setSetting('scrub-schedule', '* * * * * *');
  await until('two scheduled verifies', async () => agent.requests.filter((r) => r === 'vf POST /v1/verify {"repair":false}').length >= 2, 5000);
  await service.setSetting('scrub-schedule', '');
  await new Promise((r) => setTimeout(r, 1200));
  const count = agent.requests.length;
  await new Promise((r) => setTimeout(r, 1500));
  assert.equal(agent.requests.length, count, 'off: no more scheduled verifies');
});

test('engine link: a hung engine, a lost one, a frontend restart are events; the link shows in the volume and its metrics', async (t) => {
  const { service, objects } = await setup(t);
  await attachedHealthy(service, 'lk');
  const setLink = (link: NonNullable<EngineValue['status']['frontendLink']>): Promise<unknown> => objects.mutate(Kind.Engine, 'lk', (x) => {
    x.status = { ...x.status, frontendLink: link };
  });
  const base = { stateSince: '2024-01-01T00:00:00.000Z', reopens: 0, reissued: 0, hangs: 0, longestHoldMs: 0, held: 0, lastClose: null };
  await setLink({ ...base, state: 'OPEN' });
  await until('the link in the volume', async () => (await service.getVolume('lk')).engineLink?.state === 'OPEN');
  // The engine hangs: the frontend holds 5 requests.
  const hung = { at: '2024-01-01T00:01:00.000Z', kind: 'engine-hung' as const, cause: 'engine hung (no answer to a heartbeat in 10003 ms); process 77 killed', outstanding: 5 };
  await setLink({ ...base, state: 'CLOSE', hangs: 1, held: 5, lastClose: hung });
  await until('EngineHung', async () => (await service.listEvents({ volume: 'lk' })).some((e) => e.reason === 'EngineHung' && /no answer to a heartbeat .* 5 client request\(s\) held/.test(e.message)));
  // A new engine took them.
  await setLink({ ...base, state: 'OPEN', reopens: 1, reissued: 5, hangs: 1, longestHoldMs: 11_500, lastClose: hung });
  const reopened = await until('EngineLinkReopened', async () => (await service.listEvents({ volume: 'lk' })).find((e) => e.reason === 'EngineLinkReopened'));
  assert.match(reopened.message, /5 held request\(s\) re-issued to it; longest hold so far 11500 ms \(reopens: 1, engines found hung: 1\)/);
  // A crash and reopening seen in one pass: both events; the count is the new requests only.
  await setLink({ ...base, state: 'OPEN', reopens: 2, reissued: 8, hangs: 1, longestHoldMs: 11_500, lastClose: { at: '2024-01-01T00:02:00.000Z', kind: 'engine-lost', cause: 'engine disconnected: connection closed', outstanding: 3 } });
  await until('the second reopening', async () => (await service.listEvents({ volume: 'lk' })).filter((e) => e.reason === 'EngineLinkReopened').length === 2);
  const events = await service.listEvents({ volume: 'lk' });
  assert.ok(events.some((e) => e.reason === 'EngineLinkClosed' && /connection closed/.test(e.message)));
  assert.match(events.find((e) => e.reason === 'EngineLinkReopened')!.message, /: 3 held request\(s\) re-issued/);
  // The frontend restarted (its counters start again): one event of its own, no reopening.
  await setLink({ ...base, state: 'OPEN', reopens: 1, lastClose: { at: '2024-01-01T00:03:00.000Z', kind: 'frontend-restarted', cause: 'the frontend restarted', outstanding: 0 } });
  await until('FrontendRestarted', async () => (await service.listEvents({ volume: 'lk' })).some((e) => e.reason === 'FrontendRestarted'));
  assert.equal((await service.listEvents({ volume: 'lk' })).filter((e) => e.reason === 'EngineLinkReopened').length, 2);
  const m = (await service.metrics()).find((x) => x.name === 'lk')!;
  assert.equal(m.engineLink?.lastClose?.kind, 'frontend-restarted');
});

test('a recurring job\'s attachment: no replica added while it holds the volume; a workload attach waits and is applied after the job detaches it', async (t) => {
  const { service, objects, agent } = await setup(t, 4);
  await service.setSetting('replica-replenishment-wait-seconds', '0');
  await service.createVolume({ name: 'j', sizeBytes: GiB, numberOfReplicas: 3 });
  await until('detached', async () => (await service.getVolume('j')).state === 'detached');
  await service.attachVolume('j', {});
  await until('healthy', async () => (await service.getVolume('j')).robustness === 'healthy');
  const original = (await objects.list(Kind.Replica)).map((r) => r.name).sort();
  await service.detachVolume('j');
  await until('detached', async () => (await service.getVolume('j')).state === 'detached');

  // What the job does: attach without export, marked as the job's.
  await objects.mutate(Kind.Volume, 'j', (v) => {
    v.spec.nodeId = 'n1';
    v.spec.maintenance = true;
    v.spec.jobAttachment = { job: 'bk', task: 'backup', node: 'n1', startedAt: new Date().toISOString() };
  });
  await until('attached for the job', async () => (await service.getVolume('j')).state === 'attached');
  agent.forced.set(original[0], 'ERR');
  const degraded = await until('degraded, not healed', async () => {
    const v = await service.getVolume('j');
    return v.robustness === 'degraded' && v.message !== null && /recurring job bk holds the volume/.test(v.message) ? v : undefined;
  });
  assert.equal(degraded.heldByJob?.job, 'bk');
  assert.equal(degraded.endpoint, null);
  await new Promise((r) => setTimeout(r, 300));
  assert.deepEqual((await objects.list(Kind.Replica)).map((r) => r.name).filter((n) => !original.includes(n)), [], 'no replica added while the job holds it');

  // A workload attach waits (recorded, visible); a second one elsewhere is refused.
  const waiting = await service.attachVolume('j', {});
  assert.equal(waiting.pendingAttach?.nodeId, 'n1');
  assert.match(waiting.message!, /waits for recurring job bk \(backup\) to finish/);
  await assert.rejects(service.attachVolume('j', { maintenance: true }), /already waits for its recurring job/);
  assert.ok((await service.listEvents({ volume: 'j' })).some((e) => e.reason === 'AttachWaiting'));

  // The job is done: detached, then attached as the workload asked (with an export), and healed.
  agent.forced.delete(original[0]);
  await objects.mutate(Kind.Volume, 'j', (v) => {
    v.spec.jobAttachment = null;
    v.spec.nodeId = null;
    v.spec.maintenance = false;
  });
  const attached = await until('attached for the workload', async () => {
    const v = await service.getVolume('j');
    return v.state === 'attached' && v.endpoint !== null && v.pendingAttach === null ? v : undefined;
  });
  assert.equal(attached.frontend, true);
  assert.equal(attached.heldByJob, null);
  assert.ok((await service.listEvents({ volume: 'j' })).some((e) => e.reason === 'AttachResumed'));

  // A detach withdraws a waiting attach (the CLI does it when its --timeout passes).
  await service.detachVolume('j');
  await until('detached', async () => (await service.getVolume('j')).state === 'detached');
  await objects.mutate(Kind.Volume, 'j', (v) => {
    v.spec.nodeId = 'n1';
    v.spec.maintenance = true;
    v.spec.jobAttachment = { job: 'bk', task: 'backup', node: 'n1', startedAt: new Date().toISOString() };
  });
  await service.attachVolume('j', {});
  const withdrawn = await service.detachVolume('j');
  assert.equal(withdrawn.pendingAttach, null);
  assert.equal(withdrawn.heldByJob?.job, 'bk', 'the job keeps its attachment');
});

/** Replicas of a volume not being deleted, with the engine's mode of each. */
async function liveReplicas(objects: Objects, volume: string): Promise<{ name: string; diskId: string; mode: string | null }[]> {
  const engine = await objects.get(Kind.Engine, volume);
  return (await objects.list(Kind.Replica))
    .filter((r) => r.value.spec.volumeName === volume && r.value.deletionRequestedAt === null)
    .map((r) => ({ name: r.name, diskId: r.value.spec.diskId, mode: engine?.value.status.replicas[r.name]?.mode ?? null }));
}

test('replica move: a new replica on the asked disk is rebuilt while the old one serves, then the old one goes; never fewer in service', async (t) => {
  const { service, objects } = await setup(t, 4);
  await service.createVolume({ name: 'm', sizeBytes: GiB, numberOfReplicas: 2 });
  await until('detached', async () => (await service.getVolume('m')).state === 'detached');
  await service.attachVolume('m', {});
  await until('healthy', async () => (await service.getVolume('m')).robustness === 'healthy');
  const before = await liveReplicas(objects, 'm');
  const mover = before[0];
  const used = new Set(before.map((r) => r.diskId));
  const target = ['n1-d0', 'n1-d1', 'n1-d2', 'n1-d3'].find((d) => !used.has(d))!;

  // Bad requests change nothing.
  const code = (c: string) => (err: { code?: string }) => err.code === c;
  await assert.rejects(service.moveReplica(mover.name, { diskId: mover.diskId }), /is on disk .* already/);
  await assert.rejects(service.moveReplica(mover.name, { diskId: before[1].diskId }), /already holds replica/);
  await assert.rejects(service.moveReplica(mover.name, { diskId: 'nope' }), code('ZEBU_ERR_NOT_FOUND'));
  await assert.rejects(service.moveReplica(mover.name, { nodeId: 'nope' }), code('ZEBU_ERR_NOT_FOUND'));
  await assert.rejects(service.moveReplica(mover.name, { diskId: target, nodeId: 'n1' }), /not both/);
  await assert.rejects(service.moveReplica('no-such-replica', {}), code('ZEBU_ERR_NOT_FOUND'));
  assert.equal((await service.getReplica(mover.name)).leaving, null);

  const moving = await service.moveReplica(mover.name, { diskId: target });
  assert.deepEqual({ ...moving.leaving, requestedAt: null }, { reason: 'moved by a user', diskId: target, nodeId: null, requestedAt: null });
  let fewest = Infinity;
  const moved = await until('moved', async () => {
    const live = await liveReplicas(objects, 'm');
    fewest = Math.min(fewest, live.filter((r) => r.mode === 'RW').length);
    return !live.some((r) => r.name === mover.name) && live.some((r) => r.diskId === target && r.mode === 'RW') ? live : undefined;
  });
  assert.ok(fewest >= 2, `never fewer than 2 replicas in service (saw ${fewest})`);
  assert.equal(moved.length, 2);
  assert.ok(moved.some((r) => r.name === before[1].name), 'the other replica stayed');
  await until('healthy', async () => (await service.getVolume('m')).robustness === 'healthy');
  const reasons = (await service.listEvents({ volume: 'm' })).map((e) => e.reason);
  for (const r of ['ReplicaMoveRequested', 'ReplicaMoving', 'ReplicaMoved']) assert.ok(reasons.includes(r), r);
});

test('a new replica whose rebuild can go on where it stopped is waited for and taken back, not replaced', async (t) => {
  const { service, objects, agent } = await setup(t, 4);
  await service.createVolume({ name: 'g', sizeBytes: GiB, numberOfReplicas: 2 });
  await until('detached', async () => (await service.getVolume('g')).state === 'detached');
  await service.attachVolume('g', {});
  await until('healthy', async () => (await service.getVolume('g')).robustness === 'healthy');
  const before = await liveReplicas(objects, 'g');
  const used = new Set(before.map((r) => r.diskId));
  const disk = ['n1-d0', 'n1-d1', 'n1-d2', 'n1-d3'].find((d) => !used.has(d))!;
  // The move's new replica dies mid-rebuild, past the point where its rebuild can go on.
  agent.failRebuilds = true;
  agent.resumableFailures = true;
  await service.moveReplica(before[0].name, { diskId: disk });
  const newcomer = await until('the new replica failed and kept', async () => {
    const r = (await objects.list(Kind.Replica)).find((x) => x.value.spec.volumeName === 'g' && x.value.spec.diskId === disk);
    return r !== undefined && r.value.spec.failedAt !== null ? r : undefined;
  });
  assert.equal(newcomer.value.spec.healthyAt, null, 'it never served');
  const failed = (await service.listEvents({ volume: 'g' })).find((e) => e.reason === 'ReplicaFailed' && e.object === newcomer.name);
  assert.match(failed?.message ?? '', /its rebuild goes on where it stopped/);
  // Not removed at once as a replacement that failed before it served would be.
  await new Promise((r) => setTimeout(r, 300));
  assert.equal((await objects.must(Kind.Replica, newcomer.name)).value.deletionRequestedAt, null);
  assert.equal((await objects.must(Kind.Replica, newcomer.name)).value.spec.desireState, 'running');
  // Its process comes back: the engine is asked to take it again, and the move ends with it.
  agent.failRebuilds = false;
  await agent.restartReplica(newcomer.name);
  const moved = await until('moved onto the same new replica', async () => {
    const live = await liveReplicas(objects, 'g');
    return !live.some((r) => r.name === before[0].name) && live.some((r) => r.name === newcomer.name && r.mode === 'RW') ? live : undefined;
  }, 20_000);
  assert.deepEqual(moved.map((r) => r.name).sort(), [before[1].name, newcomer.name].sort(), 'no other replica was made');
  const events = await service.listEvents({ volume: 'g' });
  assert.ok(events.some((e) => e.reason === 'ReplicaReturning' && e.object === newcomer.name));
  assert.ok(!events.some((e) => e.reason === 'ReplicaRemoved' && e.object === newcomer.name));
});

test('disk eviction: every replica leaves the disk, which then says it is empty and takes no new one; detached volumes are attached for it, then detached', async (t) => {
  const { service, objects } = await setup(t, 4);
  await service.createVolume({ name: 'e', sizeBytes: GiB, numberOfReplicas: 3 });
  await service.createVolume({ name: 'idle', sizeBytes: GiB, numberOfReplicas: 3 });
  await service.createVolume({ name: 'used', sizeBytes: GiB, numberOfReplicas: 3 });
  await until('detached', async () => (await Promise.all(['e', 'idle', 'used'].map((n) => service.getVolume(n)))).every((v) => v.state === 'detached'));
  // 'used' held data once: attached, healthy, detached.
  await service.attachVolume('used', {});
  await until('used healthy', async () => (await service.getVolume('used')).robustness === 'healthy');
  await service.detachVolume('used');
  await until('used detached', async () => (await service.getVolume('used')).state === 'detached');
  await service.attachVolume('e', {});
  await until('healthy', async () => (await service.getVolume('e')).robustness === 'healthy');
  // 4 disks, 3 replicas each: a disk that holds a replica of all three volumes.
  const onDisk = async (d: string) => (await Promise.all(['e', 'idle', 'used'].map((n) => liveReplicas(objects, n)))).every((rs) => rs.some((r) => r.diskId === d));
  let evicted: string | null = null;
  for (const d of (await liveReplicas(objects, 'e')).map((r) => r.diskId)) if (evicted === null && await onDisk(d)) evicted = d;
  assert.ok(evicted !== null, 'a disk with a replica of every volume');
  const usedBefore = (await liveReplicas(objects, 'used')).find((r) => r.diskId === evicted)!;
  await assert.rejects(service.updateDisk(evicted, { evict: 'yes' as unknown as boolean }), /evict must be true or false/);
  const disk = await service.updateDisk(evicted, { evict: true });
  assert.equal(disk.evict, true);
  await until('e left the disk', async () => !(await liveReplicas(objects, 'e')).some((r) => r.diskId === evicted));
  await until('healthy', async () => (await service.getVolume('e')).robustness === 'healthy');
  // Never attached: an empty replica takes the place at once, with no attach.
  await until('idle left the disk', async () => !(await liveReplicas(objects, 'idle')).some((r) => r.diskId === evicted));
  assert.equal((await liveReplicas(objects, 'idle')).length, 3);
  assert.equal((await objects.must(Kind.Volume, 'idle')).value.status.epoch, 0, 'idle was never attached');
  // Held data: attached without an NBD export, its replica rebuilt elsewhere, detached again.
  await until('used left the disk', async () => !(await liveReplicas(objects, 'used')).some((r) => r.diskId === evicted));
  const used = await until('used detached again', async () => {
    const v = await service.getVolume('used');
    return v.state === 'detached' && (await objects.must(Kind.Volume, 'used')).value.spec.moveAttachment == null ? v : undefined;
  });
  assert.equal(used.replicas.length, 3);
  assert.ok(!used.replicas.some((r) => r.name === usedBefore.name));
  const usedEvents = (await service.listEvents({ volume: 'used' })).map((e) => `${e.reason}: ${e.message}`);
  assert.ok(usedEvents.some((e) => /^MoveAttached: .*without an NBD export to move replica/.test(e)), usedEvents.join('\n'));
  assert.ok(usedEvents.some((e) => /^ReplicaMoved: /.test(e)), usedEvents.join('\n'));
  assert.ok(usedEvents.some((e) => /^MoveDetached: the replicas have moved/.test(e)), usedEvents.join('\n'));
  assert.equal((await objects.must(Kind.Volume, 'used')).value.spec.maintenance, false);
  const empty = await until('the disk is empty', async () => {
    const d = await service.getDisk(evicted!);
    return d.replicaCount === 0 ? d : undefined;
  });
  assert.equal(empty.evict, true);
  // Nothing new lands on an evicted disk.
  await assert.rejects(service.createVolume({ name: 'big', sizeBytes: GiB, numberOfReplicas: 4 }), /being evicted/);
  const reasons = (await service.listEvents({})).map((e) => e.reason);
  assert.ok(reasons.includes('DiskEvicting'));
});

test('a detached volume attached for a replica move gives way to a workload attach at once; the move goes on under it', async (t) => {
  const { service, objects } = await setup(t, 3);
  await service.createVolume({ name: 'w', sizeBytes: GiB, numberOfReplicas: 2 });
  await until('detached', async () => (await service.getVolume('w')).state === 'detached');
  await service.attachVolume('w', {});
  await until('healthy', async () => (await service.getVolume('w')).robustness === 'healthy');
  await service.detachVolume('w');
  await until('detached', async () => (await service.getVolume('w')).state === 'detached');
  const before = await liveReplicas(objects, 'w');
  const free = ['n1-d0', 'n1-d1', 'n1-d2'].find((d) => !before.some((r) => r.diskId === d))!;
  // The disk asked for takes nothing for now: the move cannot end while the manager holds the volume.
  await service.updateDisk(free, { allowScheduling: false });
  await service.moveReplica(before[0].name, { diskId: free });
  const held = await until('attached for the move', async () => {
    const v = await service.getVolume('w');
    return v.state === 'attached' && (await objects.must(Kind.Volume, 'w')).value.spec.moveAttachment != null ? v : undefined;
  });
  assert.equal(held.frontend, false, 'no NBD export');
  assert.match(held.message ?? '', /attached by the manager without an NBD export to move replica/);
  await until('the move says why it waits', async () => /cannot move/.test((await service.getVolume('w')).message ?? ''));
  // A detach by the user while the manager holds it changes nothing (the manager detaches it itself).
  await service.detachVolume('w');
  assert.ok((await objects.must(Kind.Volume, 'w')).value.spec.moveAttachment != null);
  // A workload attach: recorded, then the manager lets go and the attach follows, with an export.
  const asked = await service.attachVolume('w', {});
  assert.ok(asked.state === 'attached' || asked.state === 'detaching' || asked.state === 'detached' || asked.state === 'attaching');
  const epochHeld = held.epoch;
  const attached = await until('attached for the workload', async () => {
    const v = await service.getVolume('w');
    return v.state === 'attached' && v.frontend && v.epoch > epochHeld && v.endpoint !== null ? v : undefined;
  });
  assert.equal((await objects.must(Kind.Volume, 'w')).value.spec.moveAttachment ?? null, null);
  await service.updateDisk(free, { allowScheduling: true });
  // The move goes on under the workload's attachment, which stays when it is done.
  await until('moved', async () => {
    const live = await liveReplicas(objects, 'w');
    return live.length === 2 && live.some((r) => r.diskId === free) && !live.some((r) => r.name === before[0].name) && (await service.getVolume('w')).robustness === 'healthy';
  });
  const after = await service.getVolume('w');
  assert.equal(after.state, 'attached');
  assert.equal(after.epoch, attached.epoch);
  const reasons = (await service.listEvents({ volume: 'w' })).map((e) => `${e.reason}: ${e.message}`);
  assert.ok(reasons.some((e) => /^AttachWaiting: .*attached for replica moves/.test(e)), reasons.join('\n'));
  assert.ok(reasons.some((e) => /^MoveDetached: a workload asked to attach the volume/.test(e)), reasons.join('\n'));
});

test('replica-auto-balance least-effort: replicas sharing a node spread to a new node once it joins, of attached and of detached volumes; a bad value is refused', async (t) => {
  const { service, objects, store } = await setup(t, 2);
  await service.createVolume({ name: 'b', sizeBytes: GiB, numberOfReplicas: 2 });
  // 'd' held data once and is detached.
  await service.createVolume({ name: 'd', sizeBytes: GiB, numberOfReplicas: 2 });
  await until('d detached', async () => (await service.getVolume('d')).state === 'detached');
  await service.attachVolume('d', {});
  await until('d healthy', async () => (await service.getVolume('d')).robustness === 'healthy');
  await service.detachVolume('d');
  await until('d detached again', async () => (await service.getVolume('d')).state === 'detached');
  await until('detached', async () => (await service.getVolume('b')).state === 'detached');
  await service.attachVolume('b', {});
  await until('healthy', async () => (await service.getVolume('b')).robustness === 'healthy');
  assert.deepEqual(new Set((await service.listReplicas({ volume: 'b' })).map((r) => r.nodeId)), new Set(['n1']));
  await assert.rejects(service.setSetting('replica-auto-balance', 'always'), /must be "disabled", "least-effort" or "best-effort"/);

  // A second node joins; nothing moves while the setting is disabled.
  await objects.create(Kind.Node, 'n2', { spec: { allowScheduling: true }, status: { address: '127.0.0.2', nbdAddress: null, lastHeartbeatAt: null } });
  const lease = await store.grantLease(60_000);
  await objects.create(Kind.NodeLease, 'n2', { startedAt: new Date().toISOString() }, { leaseId: lease.id });
  await objects.create(Kind.Disk, 'n2-d0', {
    spec: { nodeId: 'n2', path: '/disks/n2d0', allowScheduling: true, storageReservedBytes: 0 },
    status: { diskUuid: 'v0', storageMaximumBytes: 100 * GiB, storageAvailableBytes: 90 * GiB, ready: true, message: null },
  });
  await new Promise((r) => setTimeout(r, 500));
  assert.ok((await liveReplicas(objects, 'b')).every((r) => r.diskId.startsWith('n1-')));

  await service.setSetting('replica-auto-balance', 'least-effort');
  const spread = await until('a replica on n2', async () => {
    const live = await liveReplicas(objects, 'b');
    return live.length === 2 && live.some((r) => r.diskId === 'n2-d0' && r.mode === 'RW') && live.some((r) => r.diskId.startsWith('n1-')) ? live : undefined;
  });
  assert.equal(spread.length, 2);
  await until('healthy', async () => (await service.getVolume('b')).robustness === 'healthy');
  const reasons = (await service.listEvents({ volume: 'b' })).map((e) => e.reason);
  for (const r of ['ReplicaAutoBalance', 'ReplicaMoving', 'ReplicaMoved']) assert.ok(reasons.includes(r), r);
  // Balanced now: no more moves.
  await new Promise((r) => setTimeout(r, 500));
  assert.ok((await service.listReplicas({ volume: 'b' })).every((r) => r.leaving === null));
  // The detached volume too: attached without an export for the move, then detached again.
  await until('d spread over n1 and n2, detached again', async () => {
    const live = await liveReplicas(objects, 'd');
    const v = await objects.must(Kind.Volume, 'd');
    return live.length === 2 && live.some((r) => r.diskId === 'n2-d0') && live.some((r) => r.diskId.startsWith('n1-')) && v.value.status.state === 'detached' && v.value.spec.moveAttachment == null ? live : undefined;
  });
  const dEvents = (await service.listEvents({ volume: 'd' })).map((e) => `${e.reason}: ${e.message}`);
  for (const r of [/^ReplicaAutoBalance: /, /^MoveAttached: /, /^ReplicaMoved: /, /^MoveDetached: /]) assert.ok(dEvents.some((e) => r.test(e)), `${r}\n${dEvents.join('\n')}`);
});

test('node eviction: the node is flagged, its replicas leave for other nodes, it ends empty; bad values refused', async (t) => {
  const { service, objects, store } = await setup(t, 2);
  await addNode(objects, store, 'n2', ['n2-d0', 'n2-d1']);
  await service.createVolume({ name: 'n', sizeBytes: GiB, numberOfReplicas: 2 });
  await until('detached', async () => (await service.getVolume('n')).state === 'detached');
  await service.attachVolume('n', {});
  await until('healthy', async () => (await service.getVolume('n')).robustness === 'healthy');
  await assert.rejects(service.updateNode('n2', { evict: 1 as unknown as boolean }), /evict must be true or false/);
  const flagged = await service.updateNode('n1', { evict: true });
  assert.equal(flagged.evict, true);
  const empty = await until('n1 empty', async () => {
    const n = await service.getNode('n1');
    return n.replicaCount === 0 ? n : undefined;
  });
  assert.equal(empty.evict, true);
  await until('healthy on n2', async () => {
    const v = await service.getVolume('n');
    return v.robustness === 'healthy' && v.replicas.length === 2 && v.replicas.every((r) => r.nodeId === 'n2');
  });
  const reasons = (await service.listEvents({})).map((e) => e.reason);
  assert.ok(reasons.includes('NodeEvicting'));
});

test('a recurring job finds a volume attached for replica moves: it takes the attachment over, the moves wait, then attach it again and end', async (t) => {
  const { service, objects, manager } = await setup(t, 3);
  await service.createVolume({ name: 'jm', sizeBytes: GiB, numberOfReplicas: 2 });
  await until('detached', async () => (await service.getVolume('jm')).state === 'detached');
  await service.attachVolume('jm', {});
  await until('healthy', async () => (await service.getVolume('jm')).robustness === 'healthy');
  await service.detachVolume('jm');
  await until('detached', async () => (await service.getVolume('jm')).state === 'detached');
  const before = await liveReplicas(objects, 'jm');
  const free = ['n1-d0', 'n1-d1', 'n1-d2'].find((d) => !before.some((r) => r.diskId === d))!;
  await service.updateDisk(free, { allowScheduling: false });
  await service.moveReplica(before[0].name, { diskId: free });
  await until('attached for the move', async () => (await objects.must(Kind.Volume, 'jm')).value.spec.moveAttachment != null && (await service.getVolume('jm')).state === 'attached');

  const tasks = new JobTasks({
    objects, settings: manager.settings, events: manager.events, volumes: service,
    backups: { createJobBackup: () => Promise.reject(new Error('no backups here')), deleteBackup: () => Promise.reject(new Error('no backups here')), getBackup: () => Promise.reject(new Error('no backups here')) } as unknown as ConstructorParameters<typeof JobTasks>[0]['backups'],
    checkTarget: async () => {}, defaultNodeId: 'n1', log: () => {},
  });
  const job = { name: 'snaps', revision: 1, value: { spec: { task: 'snapshot', cron: '* * * * *', timezone: 'UTC', retain: 3, concurrency: 1, groups: [], labels: {} }, status: { volumes: {} } } } as unknown as StoreObject<RecurringJobValue>;
  const outcome = await tasks.run(job, 'jm', new AbortController().signal);
  assert.notEqual(outcome.message, 'volume jm was detached before the job could run', JSON.stringify(outcome));
  const events = (await service.listEvents({ volume: 'jm' })).map((e) => `${e.reason}: ${e.message}`);
  assert.ok(events.some((e) => /^JobAttached: .*took over the attachment of volume jm .* made for replica moves/.test(e)), events.join('\n'));
  assert.ok(events.some((e) => /^JobDetached: /.test(e)), events.join('\n'));

  // The moves attach it again, and end once the disk takes replicas.
  await until('attached again for the move', async () => (await objects.must(Kind.Volume, 'jm')).value.spec.moveAttachment != null);
  await service.updateDisk(free, { allowScheduling: true });
  await until('moved and detached', async () => {
    const v = await objects.must(Kind.Volume, 'jm');
    const live = await liveReplicas(objects, 'jm');
    return v.value.spec.moveAttachment == null && v.value.spec.jobAttachment == null && v.value.status.state === 'detached' && live.some((r) => r.diskId === free) && !live.some((r) => r.name === before[0].name);
  });
});

test('node down: the volume attached there says so and moves when attached on another node (a new epoch fences the old engine); replicas there are replaced; deletion does not wait for it; back up: events, leftovers deleted', async (t) => {
  const { service, objects, store, agent } = await setup(t, 2);
  const lease = await addNode(objects, store, 'n2', ['n2-d0', 'n2-d1']);
  await service.setSetting('replica-replenishment-wait-seconds', '1');
  await service.createVolume({ name: 'far', sizeBytes: GiB, numberOfReplicas: 2 });
  await service.createVolume({ name: 'gone', sizeBytes: GiB, numberOfReplicas: 2 });
  await until('detached', async () => (await service.getVolume('far')).state === 'detached' && (await service.getVolume('gone')).state === 'detached');
  assert.deepEqual((await service.listReplicas({ volume: 'far' })).map((r) => r.nodeId).sort(), ['n1', 'n2'], 'one replica per node');
  await service.attachVolume('far', { nodeId: 'n2' });
  await until('healthy on n2', async () => {
    const v = await service.getVolume('far');
    return v.state === 'attached' && v.robustness === 'healthy' && v.epoch === 1;
  });
  const onN2 = (await service.listReplicas({ volume: 'far' })).find((r) => r.nodeId === 'n2')!.name;

  // n2 dies: nothing there reports; its lease ends.
  agent.down.add('n2');
  await store.revokeLease(lease.id);
  const unknown = await until('unknown', async () => {
    const v = await service.getVolume('far');
    return v.robustness === 'unknown' ? v : undefined;
  });
  assert.match(unknown.message ?? '', /^node n2 is down: its engine \(epoch 1\) cannot be reached; .* zebu volume attach far --node NODE$/);
  await assert.rejects(service.attachVolume('far', { nodeId: 'n2', maintenance: true }), /already attached to node n2/, 'the same node: no move');
  // Its workload moved to n1: so does the volume, under a new epoch, without the replica on n2.
  await service.attachVolume('far', { nodeId: 'n1' });
  const moved = await until('attached on n1', async () => {
    const v = await service.getVolume('far');
    return v.state === 'attached' && v.epoch === 2 && v.nodeId === 'n1' ? v : undefined;
  });
  const engine = await objects.must(Kind.Engine, 'far');
  assert.equal(engine.value.spec.nodeId, 'n1');
  assert.equal(engine.value.spec.epoch, 2);
  assert.ok(!(onN2 in engine.value.spec.replicas), 'the replica on the down node is not waited for');
  assert.ok(moved.robustness === 'degraded' || moved.robustness === 'healthy');
  // After the replenishment wait it is replaced on a node that is up (n1's other disk: soft anti-affinity).
  await until('healthy again on n1', async () => {
    const v = await service.getVolume('far');
    const live = (await service.listReplicas({ volume: 'far' })).filter((r) => r.failedAt === null);
    return v.robustness === 'healthy' && live.length === 2 && live.every((r) => r.nodeId === 'n1' && r.mode === 'RW');
  });
  const reasons = (await service.listEvents({ volume: 'far' })).map((e) => e.reason);
  for (const r of ['AttachedNodeDown', 'AttachMoved', 'EngineAbandoned', 'ReplicaFailed']) assert.ok(reasons.includes(r), `${r} in ${reasons.join(', ')}`);
  const nodeEvents = (await service.listEvents({})).filter((e) => e.object === 'n2').map((e) => e.reason);
  assert.ok(nodeEvents.includes('NodeDown'), nodeEvents.join(', '));

  // Deleting a volume with a replica on the down node does not wait for the node.
  await service.deleteVolume('gone');
  await until('gone', async () => (await objects.get(Kind.Volume, 'gone')) === null);
  const leftover = (await objects.list(Kind.Replica)).filter((r) => r.value.spec.volumeName === 'gone');
  assert.equal(leftover.length, 1, 'the replica on n2 stays, marked, until its node is back');
  assert.notEqual(leftover[0].value.deletionRequestedAt, null);
  assert.equal(leftover[0].value.spec.nodeId, 'n2');

  // n2 is back: its agent takes a lease again and deletes what is marked (the old replica of far too).
  agent.down.delete('n2');
  const again = await store.grantLease(60_000);
  await objects.create(Kind.NodeLease, 'n2', { startedAt: new Date().toISOString() }, { leaseId: again.id });
  await until('n2 leftovers deleted', async () => (await objects.list(Kind.Replica)).every((r) => r.value.spec.nodeId !== 'n2'));
  assert.ok((await service.listEvents({})).some((e) => e.object === 'n2' && e.reason === 'NodeUp'));
  assert.equal((await service.getVolume('far')).robustness, 'healthy');
});

test('data locality best-effort: attached on a node without a replica, one moves there (built first, then the remote one goes); disabled, or a node that cannot take one: nothing moves; bad values refused', async (t) => {
  const { service, objects, store } = await setup(t, 2);
  await addNode(objects, store, 'n2', ['n2-d0']);
  await assert.rejects(service.createVolume({ name: 'bad', sizeBytes: GiB, numberOfReplicas: 1, dataLocality: 'strict' as never }), /dataLocality must be "disabled" or "best-effort", got "strict"/);
  await assert.rejects(service.setSetting('default-data-locality', 'always'), /must be "disabled" or "best-effort"/);
  // Both volumes' replicas on n1 (n2 takes none while they are placed).
  await service.updateNode('n2', { allowScheduling: false });
  await service.createVolume({ name: 'loc', sizeBytes: GiB, numberOfReplicas: 1, dataLocality: 'best-effort' });
  await service.createVolume({ name: 'off', sizeBytes: GiB, numberOfReplicas: 1 });
  await until('detached', async () => (await service.getVolume('loc')).state === 'detached' && (await service.getVolume('off')).state === 'detached');
  assert.equal((await service.getVolume('loc')).dataLocality, 'best-effort');
  assert.equal((await service.getVolume('off')).dataLocality, 'disabled', 'the setting\'s default');

  // n2 cannot take a replica yet: attached there, loc says why and keeps its replica.
  await service.attachVolume('loc', { nodeId: 'n2' });
  await until('loc healthy on n2', async () => (await service.getVolume('loc')).robustness === 'healthy');
  await until('the reason given', async () => (await service.listEvents({ volume: 'loc' })).some((e) => /^data locality: node n2 cannot take a replica of volume loc \(.*scheduling.*\)/.test(e.message)));
  assert.ok((await liveReplicas(objects, 'loc')).every((r) => r.diskId.startsWith('n1-')));

  // It can now: the replica moves to n2, never leaving the volume without one in service.
  await service.updateNode('n2', { allowScheduling: true });
  const moved = await until('loc\'s replica on n2', async () => {
    const live = await liveReplicas(objects, 'loc');
    return live.length === 1 && live[0].diskId === 'n2-d0' && live[0].mode === 'RW' ? live : undefined;
  });
  assert.equal(moved.length, 1);
  const events = (await service.listEvents({ volume: 'loc' })).map((e) => `${e.reason}: ${e.message}`);
  assert.ok(events.some((e) => /^DataLocality: replica loc-r-\w+ moves from node n1 to node n2 \(data locality best-effort: /.test(e)), events.join('\n'));
  assert.ok(events.some((e) => /^ReplicaMoved: /.test(e)), events.join('\n'));

  // Disabled: attached on n2, its replica stays on n1. Turned on later: it moves.
  await service.attachVolume('off', { nodeId: 'n2' });
  await until('off healthy', async () => (await service.getVolume('off')).robustness === 'healthy');
  await new Promise((r) => setTimeout(r, 500));
  assert.ok((await liveReplicas(objects, 'off')).every((r) => r.diskId.startsWith('n1-')));
  await assert.rejects(service.updateVolume('off', {}), /nothing to change/);
  assert.equal((await service.updateVolume('off', { dataLocality: 'best-effort' })).dataLocality, 'best-effort');
  await until('off\'s replica on n2', async () => {
    const live = await liveReplicas(objects, 'off');
    return live.length === 1 && live[0].diskId === 'n2-d0' && live[0].mode === 'RW';
  });
});

test('node and disk tags: a volume\'s selectors allow only nodes and disks with every tag, at create and for replacements; clear refusals', async (t) => {
  const { service, objects, store } = await setup(t, 2);
  await addNode(objects, store, 'n2', ['n2-d0', 'n2-d1']);
  await assert.rejects(service.createVolume({ name: 'fast', sizeBytes: GiB, numberOfReplicas: 2, nodeSelector: ['ssd'] }), /only 0 of 2 replicas can be placed: .*node n1 lacks tag\(s\) ssd of the volume's node selector/);
  await assert.rejects(service.createVolume({ name: 'fast', sizeBytes: GiB, numberOfReplicas: 2, nodeSelector: ['bad tag'] }), /nodeSelector must be a list of up to 32 tags/);
  await assert.rejects(service.updateNode('n2', { tags: ['ok', ''] }), /tags must be a list of up to 32 tags/);
  assert.deepEqual((await service.updateNode('n2', { tags: ['ssd', 'rack-b', 'ssd'] })).tags, ['rack-b', 'ssd']);
  assert.deepEqual((await service.updateDisk('n2-d1', { tags: ['nvme'] })).tags, ['nvme']);
  // Only n2 has ssd: both replicas there (soft anti-affinity), one per disk.
  await service.createVolume({ name: 'fast', sizeBytes: GiB, numberOfReplicas: 2, nodeSelector: ['ssd'] });
  await until('placed', async () => (await service.getVolume('fast')).state === 'detached');
  assert.deepEqual((await service.listReplicas({ volume: 'fast' })).map((r) => r.diskId).sort(), ['n2-d0', 'n2-d1']);
  // A disk selector too: only n2-d1 has nvme.
  await service.createVolume({ name: 'nv', sizeBytes: GiB, numberOfReplicas: 1, nodeSelector: ['ssd'], diskSelector: ['nvme'] });
  await until('nv placed', async () => (await service.getVolume('nv')).state === 'detached');
  assert.deepEqual((await service.listReplicas({ volume: 'nv' })).map((r) => r.diskId), ['n2-d1']);
  const nv = await service.getVolume('nv');
  assert.deepEqual([nv.nodeSelector, nv.diskSelector], [['ssd'], ['nvme']]);
  // A replacement honours the selectors: with no other nvme disk it cannot be placed, and says why.
  await service.setSetting('replica-replenishment-wait-seconds', '0');
  await service.createVolume({ name: 'two', sizeBytes: GiB, numberOfReplicas: 2, diskSelector: ['nvme'] }).then(() => assert.fail('one nvme disk cannot take two'), (err: Error) => assert.match(err.message, /only 1 of 2 replicas can be placed: .*lacks tag\(s\) nvme of the volume's disk selector/));
  await service.updateDisk('n1-d0', { tags: ['nvme'] });
  await service.createVolume({ name: 'two', sizeBytes: GiB, numberOfReplicas: 2, diskSelector: ['nvme'] });
  await until('two placed', async () => (await service.getVolume('two')).state === 'detached');
  assert.deepEqual((await service.listReplicas({ volume: 'two' })).map((r) => r.diskId).sort(), ['n1-d0', 'n2-d1']);
  // Changed later: new replicas follow, those in place stay; an event says so.
  const updated = await service.updateVolume('two', { diskSelector: [], nodeSelector: ['rack-b'] });
  assert.deepEqual([updated.nodeSelector, updated.diskSelector], [['rack-b'], []]);
  assert.ok((await service.listEvents({ volume: 'two' })).some((e) => e.reason === 'VolumeUpdated' && /node selector \[\] -> \[rack-b\]; disk selector \[nvme\] -> \[\]/.test(e.message)));
});

test('data locality never acts on a recurring job\'s attachment: attached for the job on a node without a replica, no replica is built there', async (t) => {
  const { service, objects, store } = await setup(t, 2);
  await addNode(objects, store, 'n2', ['n2-d0'], false);
  await service.createVolume({ name: 'jl', sizeBytes: GiB, numberOfReplicas: 1, dataLocality: 'best-effort' });
  await until('detached', async () => (await service.getVolume('jl')).state === 'detached');
  await service.updateNode('n2', { allowScheduling: true });
  // What a job does: attach without export, marked as the job's — here on n2, which holds no replica.
  await objects.mutate(Kind.Volume, 'jl', (v) => {
    v.spec.nodeId = 'n2';
    v.spec.maintenance = true;
    v.spec.jobAttachment = { job: 'bk', task: 'backup', node: 'n2', startedAt: new Date().toISOString() };
  });
  await until('attached for the job', async () => (await service.getVolume('jl')).robustness === 'healthy');
  await new Promise((r) => setTimeout(r, 500));
  assert.ok((await liveReplicas(objects, 'jl')).every((r) => r.diskId.startsWith('n1-')), 'no replica moved for the job');
  assert.ok(!(await service.listEvents({ volume: 'jl' })).some((e) => e.reason === 'DataLocality'));
});
