/**
 * The volume controller: one level-triggered reconcile per volume. It reads the volume (what the
 * user wants), its engine and replicas (what the agents report), and moves the world one step
 * towards the wanted state. Every step is idempotent; a step that must wait returns a delay and
 * is looked at again (watch events on the volume, its engine and replicas also wake it).
 *
 * States: creating -> detached <-> attaching -> attached -> detaching -> detached;
 * any -> deleting. Robustness (attached): healthy (as many RW replicas as wanted), degraded
 * (fewer; a rebuild is under way or scheduled), faulted (none).
 *
 * Self-healing: a replica the engine reports ERR gets `failedAt` and is stopped; a new replica is
 * scheduled, started, and added to the engine, which rebuilds it (WO) and promotes it (RW); once
 * the volume is healthy again the failed replica is deleted (its directory removed).
 */
import crypto from 'node:crypto';
import path from 'node:path';
import type { StoreObject } from '../store/store.ts';
import { Kind, type EngineValue, type Objects, type ReplicaValue, type VolumeValue } from './objects.ts';
import type { Settings } from './settings.ts';
import type { EventRecorder } from './events.ts';
import { scheduleReplicas, type SchedulerDisk, type SchedulerNode, type Placement } from './scheduler.ts';
import type { VolumeRobustness } from './types.ts';

/** Replica directories live under <disk>/replicas/. */
export const REPLICAS_DIR = 'replicas';

const WAIT_MS = 500;
const RESYNC_MS = 5000;
const REPLACEMENT_BACKOFF_MIN_MS = 1000;
const REPLACEMENT_BACKOFF_MAX_MS = 5 * 60_000;

type Obj<T> = StoreObject<T>;

export interface ClusterView {
  nodes: SchedulerNode[];
  disks: SchedulerDisk[];
  diskPaths: Map<string, string>;
}

/** Nodes and disks as the scheduler sees them (readiness, space, what is placed where). */
export async function clusterView(objects: Objects): Promise<ClusterView> {
  const [nodes, leases, disks, replicas] = await Promise.all([
    objects.list(Kind.Node),
    objects.list(Kind.NodeLease),
    objects.list(Kind.Disk),
    objects.list(Kind.Replica),
  ]);
  const up = new Set(leases.map((l) => l.name));
  const scheduledByDisk = new Map<string, number>();
  for (const r of replicas) {
    if (r.value.deletionRequestedAt !== null) continue;
    scheduledByDisk.set(r.value.spec.diskId, (scheduledByDisk.get(r.value.spec.diskId) ?? 0) + r.value.spec.sizeBytes);
  }
  return {
    nodes: nodes.map((n) => ({ name: n.name, ready: up.has(n.name), allowScheduling: n.value.spec.allowScheduling })),
    disks: disks.map((d) => ({
      name: d.name,
      nodeId: d.value.spec.nodeId,
      ready: d.value.status.ready,
      allowScheduling: d.value.spec.allowScheduling,
      storageMaximumBytes: d.value.status.storageMaximumBytes,
      storageAvailableBytes: d.value.status.storageAvailableBytes,
      storageReservedBytes: d.value.spec.storageReservedBytes,
      storageScheduledBytes: scheduledByDisk.get(d.name) ?? 0,
    })),
    diskPaths: new Map(disks.map((d) => [d.name, d.value.spec.path])),
  };
}

export function newReplicaName(volume: string): string {
  return `${volume}-r-${crypto.randomBytes(4).toString('hex')}`;
}

export class VolumeController {
  private readonly objects: Objects;
  private readonly settings: Settings;
  private readonly events: EventRecorder;
  private readonly log: (event: Record<string, unknown>) => void;
  /** Last "cannot place" message per volume, so the event is recorded once, not every pass. */
  private readonly lastPlacementProblem = new Map<string, string>();
  /**
   * Replacements that failed before they ever served (a rebuild that keeps failing: a bad disk,
   * a full one): the next one waits, doubling from REPLACEMENT_BACKOFF_MIN_MS up to the max.
   */
  private readonly replacementBackoff = new Map<string, { failures: number; notBeforeMs: number }>();

  constructor(objects: Objects, settings: Settings, events: EventRecorder, log: (event: Record<string, unknown>) => void = () => {}) {
    this.objects = objects;
    this.settings = settings;
    this.events = events;
    this.log = log;
  }

  async reconcile(name: string): Promise<number | null> {
    const volume = await this.objects.get(Kind.Volume, name);
    const replicas = (await this.objects.list(Kind.Replica)).filter((r) => r.value.spec.volumeName === name);
    const engine = await this.objects.get(Kind.Engine, name);
    if (volume === null) return this.removeOrphans(engine, replicas);
    const v = volume.value;
    if (v.deletionRequestedAt !== null) return this.reconcileDeleting(volume, engine, replicas);
    if (v.status.state === 'creating') return this.reconcileCreating(volume, replicas);
    if (v.spec.nodeId === null) return this.reconcileDetached(volume, engine, replicas);
    return this.reconcileAttached(volume, engine, replicas);
  }

  private async setStatus(name: string, change: (status: VolumeValue['status']) => void): Promise<void> {
    await this.objects.mutate(Kind.Volume, name, (v) => change(v.status));
  }

  private async event(volume: string, type: 'Normal' | 'Warning', reason: string, message: string, kind: string = Kind.Volume, object = volume): Promise<void> {
    await this.events.record({ type, reason, message, kind, object, volume });
  }

  // ---- deletion ------------------------------------------------------------------------------

  private async removeOrphans(engine: Obj<EngineValue> | null, replicas: Obj<ReplicaValue>[]): Promise<number | null> {
    let waiting = false;
    if (engine !== null) waiting = !(await this.stopAndRemoveEngine(engine)) || waiting;
    for (const r of replicas) {
      waiting = true;
      if (r.value.deletionRequestedAt === null) await this.requestReplicaDeletion(r.name);
    }
    return waiting ? WAIT_MS : null;
  }

  /** Asks for the engine to stop; removes its object once stopped. True when gone. */
  private async stopAndRemoveEngine(engine: Obj<EngineValue>): Promise<boolean> {
    if (engine.value.spec.desireState !== 'stopped') {
      await this.objects.mutate(Kind.Engine, engine.name, (e) => {
        e.spec.desireState = 'stopped';
      });
      return false;
    }
    if (engine.value.status.state !== 'stopped') return false;
    await this.objects.remove(Kind.Engine, engine.name);
    return true;
  }

  private async requestReplicaDeletion(name: string): Promise<void> {
    await this.objects.mutate(Kind.Replica, name, (r) => {
      if (r.deletionRequestedAt !== null) return false;
      r.deletionRequestedAt = new Date().toISOString();
      r.spec.desireState = 'stopped';
    });
  }

  private async reconcileDeleting(volume: Obj<VolumeValue>, engine: Obj<EngineValue> | null, replicas: Obj<ReplicaValue>[]): Promise<number | null> {
    await this.setStatus(volume.name, (s) => {
      s.state = 'deleting';
      s.endpoint = null;
    });
    if (engine !== null && !(await this.stopAndRemoveEngine(engine))) return WAIT_MS;
    for (const r of replicas) if (r.value.deletionRequestedAt === null) await this.requestReplicaDeletion(r.name);
    if (replicas.length > 0) return WAIT_MS;
    await this.objects.remove(Kind.Volume, volume.name);
    this.lastPlacementProblem.delete(volume.name);
    await this.event(volume.name, 'Normal', 'Deleted', `volume ${volume.name} deleted`);
    return null;
  }

  // ---- creation and placement ----------------------------------------------------------------

  /**
   * Schedules and creates up to `count` new replica objects. Returns how many were created; when
   * fewer than asked, records why (once per distinct reason) in the volume's message and events.
   */
  private async addReplicas(volume: Obj<VolumeValue>, active: Obj<ReplicaValue>[], count: number, sizeBytes: number, desireState: 'running' | 'stopped'): Promise<number> {
    const view = await clusterView(this.objects);
    const existing: Placement[] = active.map((r) => ({ nodeId: r.value.spec.nodeId, diskId: r.value.spec.diskId }));
    const result = scheduleReplicas(count, {
      sizeBytes,
      existing,
      nodes: view.nodes,
      disks: view.disks,
      policy: {
        softAntiAffinity: await this.settings.bool('replica-soft-anti-affinity'),
        overProvisioningPercentage: await this.settings.int('storage-over-provisioning-percentage'),
        minimalAvailablePercentage: await this.settings.int('storage-minimal-available-percentage'),
      },
    });
    for (const p of result.placements) {
      const name = newReplicaName(volume.name);
      const diskPath = view.diskPaths.get(p.diskId)!;
      await this.objects.create(Kind.Replica, name, {
        spec: {
          volumeName: volume.name,
          nodeId: p.nodeId,
          diskId: p.diskId,
          dataPath: path.join(diskPath, REPLICAS_DIR, name),
          sizeBytes,
          desireState,
          healthyAt: null,
          failedAt: null,
        },
        status: { state: 'stopped', address: null, pid: null, restarts: 0, message: null },
        deletionRequestedAt: null,
      });
      await this.event(volume.name, 'Normal', 'ReplicaScheduled', `replica ${name} placed on disk ${p.diskId} of node ${p.nodeId}`, Kind.Replica, name);
    }
    const missing = count - result.placements.length;
    if (missing > 0) {
      const message = `cannot place ${missing} replica(s): ${result.reasons.join('; ')}`;
      if (this.lastPlacementProblem.get(volume.name) !== message) {
        this.lastPlacementProblem.set(volume.name, message);
        await this.event(volume.name, 'Warning', 'ReplicaUnschedulable', message);
      }
      await this.setStatus(volume.name, (s) => {
        s.message = message;
      });
    } else {
      this.lastPlacementProblem.delete(volume.name);
    }
    return result.placements.length;
  }

  private async reconcileCreating(volume: Obj<VolumeValue>, replicas: Obj<ReplicaValue>[]): Promise<number | null> {
    const active = replicas.filter((r) => r.value.deletionRequestedAt === null && r.value.spec.failedAt === null);
    const missing = volume.value.spec.numberOfReplicas - active.length;
    if (missing > 0) {
      const added = await this.addReplicas(volume, active, missing, volume.value.spec.sizeBytes, 'stopped');
      if (added < missing) return 2000;
    }
    await this.setStatus(volume.name, (s) => {
      s.state = 'detached';
      s.message = null;
    });
    await this.event(volume.name, 'Normal', 'Created', `volume ${volume.name} created with ${volume.value.spec.numberOfReplicas} replica(s)`);
    return 0;
  }

  // ---- detached -------------------------------------------------------------------------------

  private async reconcileDetached(volume: Obj<VolumeValue>, engine: Obj<EngineValue> | null, replicas: Obj<ReplicaValue>[]): Promise<number | null> {
    const v = volume.value;
    if (engine !== null || replicas.some((r) => r.value.status.state === 'running' || r.value.status.state === 'starting')) {
      if (v.status.state !== 'detaching') await this.event(volume.name, 'Normal', 'Detaching', `detaching volume ${volume.name}`);
      await this.setStatus(volume.name, (s) => {
        s.state = 'detaching';
        s.endpoint = null;
      });
      if (engine !== null && !(await this.stopAndRemoveEngine(engine))) return WAIT_MS;
      for (const r of replicas) {
        if (r.value.spec.desireState !== 'stopped') {
          await this.objects.mutate(Kind.Replica, r.name, (x) => {
            x.spec.desireState = 'stopped';
          });
        }
      }
      return WAIT_MS;
    }
    // Expansion while detached: replicas grow when they next start.
    for (const r of replicas) {
      if (r.value.spec.sizeBytes < v.spec.sizeBytes) {
        await this.objects.mutate(Kind.Replica, r.name, (x) => {
          x.spec.sizeBytes = Math.max(x.spec.sizeBytes, v.spec.sizeBytes);
        });
      }
    }
    if (v.status.state !== 'detached') {
      await this.setStatus(volume.name, (s) => {
        s.state = 'detached';
        s.currentNodeId = null;
        s.attachStartedAt = null;
        s.endpoint = null;
        s.robustness = 'unknown';
        s.message = null;
      });
      await this.event(volume.name, 'Normal', 'Detached', `volume ${volume.name} detached`);
    }
    return null;
  }

  // ---- attached -------------------------------------------------------------------------------

  private async reconcileAttached(volume: Obj<VolumeValue>, engine: Obj<EngineValue> | null, replicas: Obj<ReplicaValue>[]): Promise<number | null> {
    const v = volume.value;
    const nodeId = v.spec.nodeId!;

    if (v.status.currentNodeId !== nodeId) {
      // A new attachment. An engine left from an earlier one must stop first.
      if (engine !== null) return (await this.stopAndRemoveEngine(engine)) ? 0 : WAIT_MS;
      const epoch = v.status.epoch + 1;
      await this.setStatus(volume.name, (s) => {
        s.state = 'attaching';
        s.currentNodeId = nodeId;
        s.attachStartedAt = new Date().toISOString();
        s.epoch = epoch;
        s.endpoint = null;
        s.message = null;
      });
      await this.event(volume.name, 'Normal', 'Attaching', `attaching volume ${volume.name} to node ${nodeId} (epoch ${epoch})${v.spec.maintenance ? ' in maintenance mode' : ''}`);
      return 0;
    }

    if (engine === null) return this.startEngine(volume, replicas);

    const e = engine.value;
    if (e.spec.epoch !== v.status.epoch || e.spec.nodeId !== nodeId) {
      return (await this.stopAndRemoveEngine(engine)) ? 0 : WAIT_MS;
    }
    if (e.status.state !== 'running' || e.status.epoch !== e.spec.epoch) {
      await this.refreshReplicaAddresses(engine, replicas);
      await this.setStatus(volume.name, (s) => {
        s.state = 'attaching';
        s.message = e.status.state === 'error' ? `engine: ${e.status.message}` : null;
      });
      return WAIT_MS;
    }
    return this.reconcileRunning(volume, engine, replicas);
  }

  /**
   * While the engine process is down (after a clean stop of the node, say), its replicas may come
   * back on new ports: the engine must be started with where they are now.
   */
  private async refreshReplicaAddresses(engine: Obj<EngineValue>, replicas: Obj<ReplicaValue>[]): Promise<void> {
    const moved: Record<string, string> = {};
    for (const [name, address] of Object.entries(engine.value.spec.replicas)) {
      const r = replicas.find((x) => x.name === name);
      const now = r !== undefined && r.value.status.state === 'running' ? r.value.status.address : null;
      if (now !== null && now !== address) moved[name] = now;
    }
    if (Object.keys(moved).length === 0) return;
    await this.objects.mutate(Kind.Engine, engine.name, (x) => {
      if (x.status.state === 'running') return false; // it came up meanwhile: its own view stands
      for (const [name, address] of Object.entries(moved)) if (name in x.spec.replicas) x.spec.replicas[name] = address;
    });
  }

  /** Starts the replicas that may serve, then creates the engine over them. */
  private async startEngine(volume: Obj<VolumeValue>, replicas: Obj<ReplicaValue>[]): Promise<number | null> {
    const v = volume.value;
    const usable = replicas.filter((r) => r.value.deletionRequestedAt === null && r.value.spec.failedAt === null);
    // A replica that never served holds nothing: it may start only with others like it (a new
    // volume). Next to replicas that have served it must be rebuilt, which needs a running engine.
    const everHealthy = usable.some((r) => r.value.spec.healthyAt !== null);
    const startSet = everHealthy ? usable.filter((r) => r.value.spec.healthyAt !== null) : usable;
    if (startSet.length === 0) {
      await this.setStatus(volume.name, (s) => {
        s.state = 'attaching';
        s.robustness = 'faulted';
        s.message = 'no healthy replica to attach from';
      });
      return 5000;
    }
    for (const r of startSet) {
      if (r.value.spec.desireState !== 'running' || r.value.spec.sizeBytes < v.spec.sizeBytes) {
        await this.objects.mutate(Kind.Replica, r.name, (x) => {
          x.spec.desireState = 'running';
          x.spec.sizeBytes = Math.max(x.spec.sizeBytes, v.spec.sizeBytes);
        });
      }
    }
    const isReady = (r: Obj<ReplicaValue>): boolean => r.value.status.state === 'running' && r.value.status.address !== null && r.value.spec.desireState === 'running';
    const ready = startSet.filter(isReady);
    const notReady = startSet.filter((r) => !isReady(r));
    if (notReady.length > 0) {
      const waitedMs = Date.now() - Date.parse(v.status.attachStartedAt ?? new Date().toISOString());
      if (waitedMs < (await this.settings.int('replica-start-timeout-ms'))) return WAIT_MS;
      if (ready.length === 0) {
        await this.setStatus(volume.name, (s) => {
          s.robustness = 'faulted';
          s.message = `no replica could be started: ${notReady.map((r) => `${r.name}: ${r.value.status.message ?? r.value.status.state}`).join('; ')}`;
        });
        return 2000;
      }
      for (const r of notReady) await this.failReplica(volume.name, r, `did not start in time: ${r.value.status.message ?? r.value.status.state}`);
    }
    const replicaAddresses: Record<string, string> = {};
    for (const r of ready) replicaAddresses[r.name] = r.value.status.address!;
    await this.objects.create(Kind.Engine, volume.name, {
      spec: {
        volumeName: volume.name,
        nodeId: v.spec.nodeId!,
        epoch: v.status.epoch,
        sizeBytes: v.spec.sizeBytes,
        replicas: replicaAddresses,
        desireState: 'running',
        frontend: !v.spec.maintenance,
      },
      status: {
        state: 'stopped', pid: null, epoch: 0, sizeBytes: 0, endpoint: null, faulted: false, faultedReason: null,
        replicas: {}, rebuilding: false, stats: null, restarts: 0, message: null,
      },
    });
    return WAIT_MS;
  }

  private async failReplica(volume: string, r: Obj<ReplicaValue>, reason: string): Promise<void> {
    await this.objects.mutate(Kind.Replica, r.name, (x) => {
      if (x.spec.failedAt !== null) return false;
      x.spec.failedAt = new Date().toISOString();
      x.spec.desireState = 'stopped';
    });
    await this.event(volume, 'Warning', 'ReplicaFailed', `replica ${r.name} failed: ${reason}`, Kind.Replica, r.name);
  }

  private async reconcileRunning(volume: Obj<VolumeValue>, engine: Obj<EngineValue>, replicas: Obj<ReplicaValue>[]): Promise<number | null> {
    const v = volume.value;
    const e = engine.value;
    const wanted = v.spec.numberOfReplicas;

    // What the engine says of each replica it has.
    const anyInService = Object.entries(e.status.replicas).some(([name, said]) => name in e.spec.replicas && said.mode === 'RW');
    for (const r of replicas) {
      if (!(r.name in e.spec.replicas)) continue;
      const said = e.status.replicas[r.name];
      if (said === undefined) continue;
      if (said.mode === 'RW' && r.value.spec.healthyAt === null) {
        await this.objects.mutate(Kind.Replica, r.name, (x) => {
          x.spec.healthyAt ??= new Date().toISOString();
        });
        if (r.value.spec.healthyAt === null && Object.keys(e.spec.replicas).length > 0 && replicas.some((o) => o.value.spec.healthyAt !== null)) {
          await this.event(volume.name, 'Normal', 'ReplicaRebuilt', `replica ${r.name} rebuilt and in service (RW)`, Kind.Replica, r.name);
        }
      } else if (said.mode === 'ERR' && r.value.spec.failedAt === null && anyInService) {
        // Only next to a replica still in service: when every replica is ERR the volume is
        // faulted and they are kept as they are, for a restart or salvage to bring them back.
        await this.failReplica(volume.name, r, said.reason ?? 'engine reported ERR');
      }
    }
    const fresh = (await this.objects.list(Kind.Replica)).filter((r) => r.value.spec.volumeName === volume.name);
    const failed = fresh.filter((r) => r.value.spec.failedAt !== null && r.value.deletionRequestedAt === null);
    const active = fresh.filter((r) => r.value.spec.failedAt === null && r.value.deletionRequestedAt === null);

    // The engine's replica set: the active replicas that are running. Failed ones leave it.
    const desired: Record<string, string> = {};
    for (const r of active) {
      const current = e.spec.replicas[r.name];
      if (current !== undefined) desired[r.name] = current;
      else if (r.value.status.state === 'running' && r.value.status.address !== null && r.value.spec.desireState === 'running') desired[r.name] = r.value.status.address;
    }
    let sizeBytes = e.spec.sizeBytes;
    if (v.spec.sizeBytes > e.spec.sizeBytes) sizeBytes = v.spec.sizeBytes;
    if (JSON.stringify(desired) !== JSON.stringify(e.spec.replicas) || sizeBytes !== e.spec.sizeBytes) {
      await this.objects.mutate(Kind.Engine, engine.name, (x) => {
        x.spec.replicas = desired;
        x.spec.sizeBytes = sizeBytes;
      });
    }
    if (sizeBytes > e.status.sizeBytes) {
      for (const r of active) {
        if (r.value.spec.sizeBytes < sizeBytes) {
          await this.objects.mutate(Kind.Replica, r.name, (x) => {
            x.spec.sizeBytes = Math.max(x.spec.sizeBytes, sizeBytes);
          });
        }
      }
    }

    const modes = Object.entries(e.status.replicas).filter(([name]) => name in desired);
    const rw = modes.filter(([, s]) => s.mode === 'RW').length;
    const rebuilding = modes.some(([, s]) => s.mode === 'WO');
    const robustness: VolumeRobustness = e.status.faulted || rw === 0 ? 'faulted' : rw >= wanted ? 'healthy' : 'degraded';

    // Replenish: new replicas for the missing ones (not while faulted: nothing to copy from, nor
    // while an expansion is under way: a new replica must have the size the engine serves).
    let message: string | null = null;
    const backoff = this.replacementBackoff.get(volume.name);
    const waitMs = backoff === undefined ? 0 : backoff.notBeforeMs - Date.now();
    if (robustness !== 'faulted' && active.length < wanted && e.status.sizeBytes === e.spec.sizeBytes && sizeBytes === e.spec.sizeBytes) {
      if (waitMs > 0) {
        message = `${backoff!.failures} replacement replica(s) failed before serving; the next one in ${Math.ceil(waitMs / 1000)} s`;
      } else {
        const added = await this.addReplicas(volume, active, wanted - active.length, e.status.sizeBytes, 'running');
        if (added < wanted - active.length) message = this.lastPlacementProblem.get(volume.name) ?? null;
      }
    }
    for (const r of active) {
      if (r.value.spec.desireState !== 'running') {
        await this.objects.mutate(Kind.Replica, r.name, (x) => {
          x.spec.desireState = 'running';
        });
      }
      if (r.value.status.state === 'error' && !(r.name in desired)) message = `replica ${r.name}: ${r.value.status.message}`;
    }
    // A failed replica that never served holds nothing worth keeping (a partial copy): it goes
    // now, so that failing rebuilds do not pile up; its failure delays the next replacement.
    for (const r of failed) {
      if (r.value.spec.healthyAt !== null) continue;
      await this.requestReplicaDeletion(r.name);
      const prev = this.replacementBackoff.get(volume.name)?.failures ?? 0;
      const delayMs = Math.min(REPLACEMENT_BACKOFF_MAX_MS, REPLACEMENT_BACKOFF_MIN_MS * 2 ** Math.min(prev, 16));
      this.replacementBackoff.set(volume.name, { failures: prev + 1, notBeforeMs: Date.now() + delayMs });
      await this.event(volume.name, 'Warning', 'ReplicaRemoved', `replica ${r.name} failed before it served and was removed; the next replacement in ${Math.round(delayMs / 1000)} s`, Kind.Replica, r.name);
    }
    if (robustness === 'healthy') this.replacementBackoff.delete(volume.name);
    // The failed replicas go once the volume is whole again.
    if (robustness === 'healthy') {
      for (const r of failed) {
        if (r.value.spec.healthyAt === null) continue; // removed above
        await this.requestReplicaDeletion(r.name);
        await this.event(volume.name, 'Normal', 'ReplicaRemoved', `failed replica ${r.name} removed`, Kind.Replica, r.name);
      }
    }
    if (e.status.faulted) message = `faulted: ${e.status.faultedReason}`;

    const wasState = v.status.state;
    const wasRobustness = v.status.robustness;
    await this.setStatus(volume.name, (s) => {
      s.state = 'attached';
      s.robustness = robustness;
      s.endpoint = e.spec.frontend ? e.status.endpoint : null;
      s.message = message;
    });
    if (wasState !== 'attached') {
      await this.event(volume.name, 'Normal', 'Attached', `volume ${volume.name} attached on node ${e.spec.nodeId}${e.status.endpoint !== null && e.spec.frontend ? ` at ${e.status.endpoint}` : ''}`);
    }
    if (wasRobustness !== robustness && wasState === 'attached') {
      await this.event(volume.name, robustness === 'healthy' ? 'Normal' : 'Warning', robustness === 'healthy' ? 'Healthy' : robustness === 'degraded' ? 'Degraded' : 'Faulted',
        `volume ${volume.name} is ${robustness} (${rw} of ${wanted} replicas in service${rebuilding ? ', rebuilding' : ''})`);
    }
    if (e.spec.frontend && e.status.endpoint === null) return WAIT_MS;
    return robustness === 'healthy' ? RESYNC_MS : 1000;
  }
}
