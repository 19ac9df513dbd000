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
 * Self-healing: a replica the engine reports ERR gets `failedAt`. For up to
 * `replica-replenishment-wait-seconds` it is kept: when its process comes back (the agent restarts
 * it, on a new port) the engine is asked to add it again, which it does by a delta rebuild (only
 * the regions written while it was out) or refuses (EINVAL: no delta possible). On refusal, or
 * after the wait, a new replica is scheduled, started, and added to the engine, which rebuilds it
 * (WO) and promotes it (RW); once the volume is healthy again the failed replica is deleted.
 *
 * Epochs: every attach, and every new engine process, gets a new epoch. The agent never starts a
 * second process with an epoch already used (Engine status `startedEpoch`); when an engine process
 * is gone (crash, node restart) this controller bumps the epoch and the agent starts the new one.
 * A replica fences writes of lower epochs, and the engine's start-up picks its source by the epoch
 * replicas last wrote in — so a newer engine is always told apart from an older one.
 *
 * Salvage: when every replica is out (faulted), a salvage (API, or the `auto-salvage` setting)
 * clears `failedAt` on the chosen replicas and starts a new engine (new epoch) on them; its
 * start-up rule picks the source, and the replicas it puts out are replaced as usual.
 */
import crypto from 'node:crypto';
import path from 'node:path';
import { ErrorCode } from '../errors.ts';
import type { StoreObject } from '../store/store.ts';
import { Kind, REPLICAS_DIR, imageFilePath, type EngineValue, type Objects, type ReplicaValue, type SalvageRequest, type VolumeValue } from '../cluster/objects.ts';
import type { Settings } from '../cluster/settings.ts';
import type { EventRecorder } from './events.ts';
import { balanceMove, scheduleReplicas, type AutoBalance, type TagSelector, type ImageRules, type SchedulerDisk, type SchedulerNode, type SchedulerPolicy, type Placement } from './scheduler.ts';
import { imagePlacement } from './backing-images.ts';
import { nodeWithHealthyReplica } from './attach-node.ts';
import type { RecoveryView, VolumeRobustness } from './types.ts';


const WAIT_MS = 500;
/** How often a volume waiting only on nodes that are down looks again. */
const DOWN_NODE_WAIT_MS = 10_000;
const RESYNC_MS = 5000;
const REPLACEMENT_BACKOFF_MIN_MS = 1000;
const REPLACEMENT_BACKOFF_MAX_MS = 5 * 60_000;
/** Automatic salvages of one volume that do not bring it back wait 5 s, doubling up to 5 min. */
const AUTO_SALVAGE_BACKOFF_MIN_MS = 5000;
const AUTO_SALVAGE_BACKOFF_MAX_MS = 5 * 60_000;
/** Delta re-adds of one failed replica before it is given up for a new one. */
const MAX_DELTA_ATTEMPTS = 3;

type Obj<T> = StoreObject<T>;

interface DeltaDecision {
  /** It holds its place in the volume: no new replica for it yet. */
  holds: boolean;
  /** Where the engine should have it (null: not in the engine's set). */
  engineAt: string | null;
  /** This pass asks the engine to add it again (a delta rebuild attempt). */
  attempt: boolean;
  /** When its wait ends (look again then). */
  wakeInMs: number | null;
  /** Given up now, and why. */
  gaveUp: string | null;
}

/** Why a replica is to leave its disk, and where its replacement may go (null: anywhere allowed). */
interface Leaving {
  why: string;
  only: { diskId: string | null; nodeId: string | null } | null;
}

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
    nodes: nodes.map((n) => ({ name: n.name, ready: up.has(n.name), allowScheduling: n.value.spec.allowScheduling, evicting: n.value.spec.evict === true, tags: n.value.spec.tags ?? [] })),
    disks: disks.map((d) => ({
      name: d.name,
      nodeId: d.value.spec.nodeId,
      ready: d.value.status.ready,
      allowScheduling: d.value.spec.allowScheduling,
      storageMaximumBytes: d.value.status.storageMaximumBytes,
      storageAvailableBytes: d.value.status.storageAvailableBytes,
      storageReservedBytes: d.value.spec.storageReservedBytes,
      storageScheduledBytes: scheduledByDisk.get(d.name) ?? 0,
      evicting: d.value.spec.evict === true,
      tags: d.value.spec.tags ?? [],
    })),
    diskPaths: new Map(disks.map((d) => [d.name, d.value.spec.path])),
  };
}

/** A replica whose node is down, as the controller sees it (a copy; the stored object is unchanged). */
function onDownNode(r: Obj<ReplicaValue>): Obj<ReplicaValue> {
  const seen = { ...r, value: { ...r.value, status: { ...r.value.status, state: 'error' as const, address: null, pid: null, message: `node ${r.value.spec.nodeId} is down` } } };
  seenOnDownNode.add(seen);
  return seen;
}

const seenOnDownNode = new WeakSet<Obj<ReplicaValue>>();

/** Whether `r` is on a node that is down (as read by `replicasOf`). */
function isOnDownNode(r: Obj<ReplicaValue>): boolean {
  return seenOnDownNode.has(r);
}

/** The tags a volume's replicas need on their node and disk. */
export function selectorOf(v: VolumeValue): TagSelector {
  return { node: v.spec.nodeSelector ?? [], disk: v.spec.diskSelector ?? [] };
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
  /** Automatic salvages per volume, so that a volume that cannot come back is not restarted in a loop. */
  private readonly salvageBackoff = new Map<string, { failures: number; notBeforeMs: number }>();
  /**
   * Failed replicas being brought back by delta: the address the engine was last asked to add
   * them at, attempts so far, and whether the engine refused (then a new replica replaces it).
   * In memory: after a manager restart a returning replica simply gets its attempts afresh.
   */
  private readonly deltaState = new Map<string, { address: string | null; attempts: number; refused: boolean; givenUp: boolean; resumable: boolean }>();

  constructor(objects: Objects, settings: Settings, events: EventRecorder, log: (event: Record<string, unknown>) => void = () => {}) {
    this.objects = objects;
    this.settings = settings;
    this.events = events;
    this.log = log;
  }

  async reconcile(name: string): Promise<number | null> {
    const volume = await this.objects.get(Kind.Volume, name);
    const replicas = await this.replicasOf(name);
    const engine = await this.objects.get(Kind.Engine, name);
    if (volume === null) return this.removeOrphans(engine, replicas);
    const v = volume.value;
    if (v.deletionRequestedAt !== null) return this.reconcileDeleting(volume, engine, replicas);
    if (v.spec.backingImage != null) await this.failReplicasOnFailedImage(name, v.spec.backingImage.name, replicas);
    if (v.status.state === 'creating') return this.reconcileCreating(volume, replicas);
    if (v.spec.nodeId === null) return this.reconcileDetached(volume, engine, replicas);
    return this.reconcileAttached(volume, engine, replicas);
  }

  /**
   * The volume's replicas as this controller may trust them: the status of a replica whose node
   * is down (its lease expired) is whatever its agent wrote last, so it reads as an error saying
   * so — never as a running process at an address (an engine would be started on it, or a detach
   * would wait for it to stop).
   */
  private async replicasOf(volume: string): Promise<Obj<ReplicaValue>[]> {
    const [all, leases] = await Promise.all([this.objects.list(Kind.Replica), this.objects.list(Kind.NodeLease)]);
    const up = new Set(leases.map((l) => l.name));
    return all.filter((r) => r.value.spec.volumeName === volume).map((r) => up.has(r.value.spec.nodeId) ? r : onDownNode(r));
  }

  /** The settings every placement follows. */
  private async placementPolicy(): Promise<SchedulerPolicy> {
    return {
      softAntiAffinity: await this.settings.bool('replica-soft-anti-affinity'),
      overProvisioningPercentage: await this.settings.int('storage-over-provisioning-percentage'),
      minimalAvailablePercentage: await this.settings.int('storage-minimal-available-percentage'),
    };
  }

  /** Whether the node's agent holds its lease (it reports what runs there). */
  private async nodeUp(nodeId: string): Promise<boolean> {
    return (await this.objects.get(Kind.NodeLease, nodeId)) !== null;
  }

  /**
   * A replica reads its disk's file of the volume's backing image as its base: when that file
   * fails its check (changed on disk), the replica's data is wrong and it is replaced (the
   * backing-image controller removes the file only once no replica uses it, then copies it again).
   */
  private async failReplicasOnFailedImage(volume: string, image: string, replicas: Obj<ReplicaValue>[]): Promise<void> {
    const obj = await this.objects.get(Kind.BackingImage, image);
    if (obj === null) return;
    for (const r of replicas) {
      if (r.value.deletionRequestedAt !== null || r.value.spec.failedAt !== null) continue;
      const file = obj.value.status.files[r.value.spec.diskId];
      if (file?.state !== 'failed') continue;
      await this.failReplica(volume, r, `the file of backing image ${image} on its disk ${r.value.spec.diskId} failed (${file.message ?? 'no reason given'})`, false);
    }
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
    // Replicas left only on nodes that are down: their agents delete them when back (a node's
    // lease coming back wakes this anyway).
    if (waiting && replicas.every(isOnDownNode) && engine === null) return DOWN_NODE_WAIT_MS;
    return waiting ? WAIT_MS : null;
  }

  /**
   * Asks for the engine to stop; removes its object once stopped. True when gone. An engine on a
   * node that is down cannot be asked: its object goes at once. Should that engine still run (the
   * node cut off, not dead), it is fenced: every attachment after it writes with a higher epoch,
   * which the replicas hold it to, and its agent stops it once it sees the object gone.
   */
  private async stopAndRemoveEngine(engine: Obj<EngineValue>): Promise<boolean> {
    if (engine.value.status.state !== 'stopped' && !(await this.nodeUp(engine.value.spec.nodeId))) {
      await this.objects.remove(Kind.Engine, engine.name);
      await this.event(engine.value.spec.volumeName, 'Warning', 'EngineAbandoned',
        `the engine of volume ${engine.value.spec.volumeName} (epoch ${engine.value.spec.epoch}) is on node ${engine.value.spec.nodeId}, which is down: let go without its answer; the next attachment fences it with a higher epoch`,
        Kind.Engine, engine.name);
      return true;
    }
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
    // A replica on a node that is down is deleted by its agent when the node is back (its object
    // stays, marked for deletion): the volume does not wait for that.
    const elsewhere = replicas.filter(isOnDownNode);
    if (replicas.length > elsewhere.length) return WAIT_MS;
    await this.objects.remove(Kind.Volume, volume.name);
    this.lastPlacementProblem.delete(volume.name);
    const later = elsewhere.length === 0 ? '' : `; replica(s) ${elsewhere.map((r) => `${r.name} (node ${r.value.spec.nodeId})`).join(', ')} on node(s) that are down are removed when their node is back`;
    await this.event(volume.name, 'Normal', 'Deleted', `volume ${volume.name} deleted${later}`);
    return null;
  }

  // ---- creation and placement ----------------------------------------------------------------

  /**
   * Schedules and creates up to `count` new replica objects. Returns how many were created; when
   * fewer than asked, records why (once per distinct reason) in the volume's message and events.
   */
  private async addReplicas(volume: Obj<VolumeValue>, active: Obj<ReplicaValue>[], count: number, sizeBytes: number, desireState: 'running' | 'stopped', only?: { diskId: string | null; nodeId: string | null }): Promise<number> {
    const view = await clusterView(this.objects);
    const existing: Placement[] = active.map((r) => ({ nodeId: r.value.spec.nodeId, diskId: r.value.spec.diskId }));
    const imageName = volume.value.spec.backingImage?.name ?? null;
    let image: ImageRules | undefined;
    if (imageName !== null) {
      const obj = await this.objects.get(Kind.BackingImage, imageName);
      // Every replica must read the same image: one that is gone (deleting it is refused while a
      // volume uses it) or that changed leaves the volume with the replicas it has.
      const why = obj === null ? `its backing image ${imageName} is gone`
        : obj.value.status.checksum !== volume.value.spec.backingImage!.checksum ? `its backing image ${imageName} has another checksum now`
          : null;
      if (why !== null) {
        await this.placementProblem(volume.name, `cannot place ${count} replica(s): ${why}`);
        return 0;
      }
      image = imagePlacement(imageName, obj!.value.spec, Object.values(obj!.value.status.files));
    }
    const result = scheduleReplicas(count, {
      sizeBytes,
      existing,
      nodes: view.nodes,
      disks: view.disks,
      image,
      only,
      selector: selectorOf(volume.value),
      policy: await this.placementPolicy(),
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
          backingImage: imageName === null ? null : { name: imageName, path: imageFilePath(diskPath, imageName) },
        },
        status: { state: 'stopped', address: null, pid: null, restarts: 0, message: null },
        deletionRequestedAt: null,
      });
      await this.event(volume.name, 'Normal', 'ReplicaScheduled', `replica ${name} placed on disk ${p.diskId} of node ${p.nodeId}`, Kind.Replica, name);
    }
    const missing = count - result.placements.length;
    if (missing > 0) await this.placementProblem(volume.name, `cannot place ${missing} replica(s): ${result.reasons.join('; ')}`);
    else this.lastPlacementProblem.delete(volume.name);
    return result.placements.length;
  }

  /** Says why replicas cannot be placed: in the volume's message, and once per distinct reason as an event. */
  private async placementProblem(volume: string, message: string): Promise<void> {
    if (this.lastPlacementProblem.get(volume) !== message) {
      this.lastPlacementProblem.set(volume, message);
      await this.event(volume, 'Warning', 'ReplicaUnschedulable', message);
    }
    await this.setStatus(volume, (s) => {
      s.message = message;
    });
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
    const pending = v.spec.pendingAttach ?? null;
    if (pending !== null && (v.spec.jobAttachment ?? null) === null && (v.spec.moveAttachment ?? null) === null && v.deletionRequestedAt === null) {
      // A workload attach waited for a recurring job (or replica moves): the volume is detached,
      // now it attaches — as a new attachment (a new epoch), even on the same node.
      await this.setStatus(volume.name, (s) => {
        s.state = 'detached';
        s.currentNodeId = null;
        s.attachStartedAt = null;
        s.endpoint = null;
      });
      await this.objects.mutate(Kind.Volume, volume.name, (x) => {
        if (x.spec.nodeId !== null || (x.spec.jobAttachment ?? null) !== null || (x.spec.moveAttachment ?? null) !== null || (x.spec.pendingAttach ?? null) === null) return false;
        x.spec.nodeId = x.spec.pendingAttach!.nodeId;
        x.spec.maintenance = x.spec.pendingAttach!.maintenance;
        x.spec.lastWorkloadNodeId = x.spec.nodeId;
        x.spec.pendingAttach = null;
      });
      await this.event(volume.name, 'Normal', 'AttachResumed', `attaching volume ${volume.name} to node ${pending.nodeId} as asked at ${pending.requestedAt}`);
      return 0;
    }
    const inPlace = replicas.filter((r) => r.value.deletionRequestedAt === null && r.value.spec.failedAt === null);
    const leaving = await this.leavingReplicas(inPlace);
    let waitingMove: string | null = null;
    if (leaving.size > 0 && v.deletionRequestedAt === null) {
      waitingMove = await this.moveWhileDetached(volume, inPlace, leaving);
      if (waitingMove === null) return 0;
    } else if (v.deletionRequestedAt === null && v.status.state === 'detached' && inPlace.length === v.spec.numberOfReplicas && replicas.every((r) => r.value.spec.failedAt === null)) {
      // replica-auto-balance covers detached volumes too: a move it asks for is made as any
      // other move of a detached volume (attached without an export, then detached).
      await this.autoBalance(volume, inPlace, v.spec.sizeBytes);
    }
    if (v.status.state !== 'detached' || v.status.message !== waitingMove) {
      const was = v.status.state;
      await this.setStatus(volume.name, (s) => {
        s.state = 'detached';
        s.currentNodeId = null;
        s.attachStartedAt = null;
        s.endpoint = null;
        s.robustness = 'unknown';
        s.message = waitingMove;
      });
      if (was !== 'detached') await this.event(volume.name, 'Normal', 'Detached', `volume ${volume.name} detached`);
    }
    return null;
  }

  // ---- attached -------------------------------------------------------------------------------

  private async reconcileAttached(volume: Obj<VolumeValue>, engine: Obj<EngineValue> | null, replicas: Obj<ReplicaValue>[]): Promise<number | null> {
    const v = volume.value;
    const nodeId = v.spec.nodeId!;
    if ((v.spec.moveAttachment ?? null) !== null && (v.spec.pendingAttach ?? null) !== null) {
      // A workload wants the volume: it comes first; the moves go on under its attachment.
      await this.releaseMoveAttachment(volume.name, 'a workload asked to attach the volume; the replica moves go on once it is attached');
      return 0;
    }

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

    const salvage = v.spec.salvage ?? null;
    if (salvage !== null) return this.beginSalvage(volume, engine, replicas, salvage);

    if (engine === null) return this.startEngine(volume, replicas);
    if (engine.value.spec.nodeId === nodeId && !(await this.nodeUp(nodeId))) return this.attachedOnDownNode(volume, engine);
    await this.noteEngineLink(volume, engine);

    const e = engine.value;
    if (e.spec.epoch !== v.status.epoch || e.spec.nodeId !== nodeId) {
      return (await this.stopAndRemoveEngine(engine)) ? 0 : WAIT_MS;
    }
    if (e.spec.desireState === 'running' && e.status.state !== 'running' && e.status.pid === null && (e.status.startedEpoch ?? 0) >= e.spec.epoch) {
      return this.newEngineEpoch(volume, engine);
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
   * The node the volume is attached on is down: nothing is known of its engine (it may be dead,
   * or serving on, cut off from the store). Its clients are on that node and wait for it; the
   * volume is served elsewhere only when a user (or an orchestrator) attaches it on another node.
   */
  private async attachedOnDownNode(volume: Obj<VolumeValue>, engine: Obj<EngineValue>): Promise<number> {
    const nodeId = engine.value.spec.nodeId;
    const message = `node ${nodeId} is down: its engine (epoch ${engine.value.spec.epoch}) cannot be reached; clients there wait for the node. To serve the volume from another node: zebu volume attach ${volume.name} --node NODE`;
    if (volume.value.status.robustness !== 'unknown' || volume.value.status.message !== message) {
      await this.setStatus(volume.name, (s) => {
        s.robustness = 'unknown';
        s.message = message;
      });
      await this.event(volume.name, 'Warning', 'AttachedNodeDown', message);
    }
    return DOWN_NODE_WAIT_MS;
  }

  /**
   * The engine's process is gone (it crashed, or the node stopped) and a process already ran
   * with its epoch: the next one gets a new epoch, so that replicas tell its writes apart from
   * those of the one before (and fence the old one, should it still be alive somewhere).
   */
  private async newEngineEpoch(volume: Obj<VolumeValue>, engine: Obj<EngineValue>): Promise<number> {
    const before = engine.value.spec.epoch;
    const epoch = volume.value.status.epoch + 1;
    await this.setStatus(volume.name, (s) => {
      s.epoch = Math.max(s.epoch, epoch);
      s.state = 'attaching';
    });
    await this.objects.mutate(Kind.Engine, engine.name, (x) => {
      x.spec.epoch = Math.max(x.spec.epoch, epoch);
    });
    // The bare cause (the agent's `message` is a sentence around it, for the volume's status).
    const cause = engine.value.status.exitReason ?? null;
    const why = cause !== null ? ` (${cause})` : '';
    await this.event(volume.name, 'Normal', 'EngineRestarting', `the engine process of volume ${volume.name} (epoch ${before}) is gone${why}: starting a new one with epoch ${epoch}`, Kind.Engine, engine.name);
    return 0;
  }

  // ---- salvage --------------------------------------------------------------------------------

  /**
   * Starts a salvage: the faulted engine goes, the chosen replicas are taken out of failure (the
   * others are failed: they get replaced), and a new engine with a new epoch starts on the chosen
   * ones. The engine's start-up rule picks the source among them.
   */
  private async beginSalvage(volume: Obj<VolumeValue>, engine: Obj<EngineValue> | null, replicas: Obj<ReplicaValue>[], request: SalvageRequest): Promise<number | null> {
    if (engine !== null && !(await this.stopAndRemoveEngine(engine))) {
      await this.setStatus(volume.name, (s) => {
        s.message = 'salvage: stopping the faulted engine';
      });
      return WAIT_MS;
    }
    const candidates = replicas.filter((r) => r.value.deletionRequestedAt === null);
    const wanted = request.replicas;
    const chosen = wanted === null ? candidates : candidates.filter((r) => wanted.includes(r.name));
    const how = request.auto ? ' (automatic: setting auto-salvage)' : '';
    if (chosen.length === 0) {
      await this.objects.mutate(Kind.Volume, volume.name, (x) => {
        x.spec.salvage = null;
        x.status.message = 'salvage: no replica left to salvage from';
      });
      await this.event(volume.name, 'Warning', 'SalvageFailed', `salvage of volume ${volume.name}${how}: no replica left to salvage from`);
      return 2000;
    }
    for (const r of chosen) {
      this.deltaState.delete(r.name);
      await this.objects.mutate(Kind.Replica, r.name, (x) => {
        x.spec.failedAt = null;
        x.spec.desireState = 'running';
      });
    }
    for (const r of candidates) {
      if (!chosen.includes(r)) await this.failReplica(volume.name, r, `left out of the salvage of volume ${volume.name}`, false);
    }
    const epoch = volume.value.status.epoch + 1;
    const names = chosen.map((r) => r.name);
    await this.objects.mutate(Kind.Volume, volume.name, (x) => {
      x.spec.salvage = null;
      x.status.epoch = Math.max(x.status.epoch, epoch);
      x.status.state = 'attaching';
      x.status.attachStartedAt = new Date().toISOString();
      x.status.endpoint = null;
      x.status.message = `salvaging from ${names.join(', ')}`;
      x.status.salvage = { startedAt: new Date().toISOString(), epoch: x.status.epoch, replicas: names, auto: request.auto };
    });
    await this.event(volume.name, 'Warning', 'SalvageStarted',
      `salvaging volume ${volume.name}${how} from replica(s) ${names.join(', ')}: a new engine (epoch ${epoch}) starts on them and picks the source`);
    return 0;
  }

  /** Asks for a salvage when the setting allows and the last one is not too recent. */
  private async autoSalvage(volume: Obj<VolumeValue>): Promise<{ started: boolean; message: string | null }> {
    if (!(await this.settings.bool('auto-salvage'))) return { started: false, message: 'auto-salvage is off: `zebu volume salvage` brings the volume back' };
    const backoff = this.salvageBackoff.get(volume.name);
    const waitMs = backoff === undefined ? 0 : backoff.notBeforeMs - Date.now();
    if (waitMs > 0) return { started: false, message: `automatic salvage #${backoff!.failures + 1} in ${Math.ceil(waitMs / 1000)} s` };
    const failures = backoff?.failures ?? 0;
    const delayMs = Math.min(AUTO_SALVAGE_BACKOFF_MAX_MS, AUTO_SALVAGE_BACKOFF_MIN_MS * 2 ** Math.min(failures, 16));
    this.salvageBackoff.set(volume.name, { failures: failures + 1, notBeforeMs: Date.now() + delayMs });
    await this.objects.mutate(Kind.Volume, volume.name, (x) => {
      if ((x.spec.salvage ?? null) !== null) return false;
      x.spec.salvage = { requestedAt: new Date().toISOString(), replicas: null, auto: true };
    });
    return { started: true, message: null };
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
    let startSet = everHealthy ? usable.filter((r) => r.value.spec.healthyAt !== null) : usable;
    // Replicas on nodes that are down stay out of the engine while others can serve (every
    // replica in service took every write, so any of them will do); they may come back by delta.
    const unreachable = startSet.filter(isOnDownNode);
    if (unreachable.length > 0 && unreachable.length < startSet.length) {
      for (const r of unreachable) await this.failReplica(volume.name, r, `its node ${r.value.spec.nodeId} is down at attach`, true);
      startSet = startSet.filter((r) => !isOnDownNode(r));
    }
    if (startSet.length === 0) {
      const auto = await this.autoSalvage(volume);
      await this.setStatus(volume.name, (s) => {
        s.state = 'attaching';
        s.robustness = 'faulted';
        s.message = `no healthy replica to attach from${auto.message !== null ? `; ${auto.message}` : ''}`;
      });
      return auto.started ? 0 : 5000;
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
        const why = `no replica could be started: ${notReady.map((r) => `${r.name}: ${r.value.status.message ?? r.value.status.state}`).join('; ')}`;
        // A salvage under way failed to start anything: say so once; a new one waits its backoff.
        if ((v.status.salvage ?? null) !== null) await this.endSalvage(volume, `still faulted: ${why}`, true);
        const auto = await this.autoSalvage(volume);
        await this.setStatus(volume.name, (s) => {
          s.robustness = 'faulted';
          s.message = `${why}${auto.message !== null ? `; ${auto.message}` : ''}`;
        });
        return auto.started ? 0 : 2000;
      }
      for (const r of notReady) await this.failReplica(volume.name, r, `did not start in time: ${r.value.status.message ?? r.value.status.state}`, false);
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

  /**
   * Marks a replica failed. With `mayReturn` (it served before, and the replenishment wait is not
   * 0) its process keeps running — restarted by its agent when it died — so that it can come back
   * by a delta rebuild; else it stops and will be replaced.
   */
  private async failReplica(volume: string, r: Obj<ReplicaValue>, reason: string, mayReturn: boolean, resumable = false): Promise<void> {
    const waitS = mayReturn && (r.value.spec.healthyAt !== null || resumable) ? await this.settings.int('replica-replenishment-wait-seconds') : 0;
    let marked = false;
    await this.objects.mutate(Kind.Replica, r.name, (x) => {
      if (x.spec.failedAt !== null) return false;
      x.spec.failedAt = new Date().toISOString();
      if (waitS === 0) x.spec.desireState = 'stopped';
      marked = true;
    });
    if (!marked) return;
    if (waitS === 0) this.deltaState.set(r.name, { address: null, attempts: 0, refused: false, givenUp: true, resumable });
    else this.deltaState.set(r.name, { address: null, attempts: 0, refused: false, givenUp: false, resumable });
    const next = waitS === 0 ? 'a new replica replaces it'
      : `waiting up to ${waitS} s for it to come back (${resumable && r.value.spec.healthyAt === null ? 'its rebuild goes on where it stopped' : 'delta rebuild'}), else a new replica replaces it`;
    await this.event(volume, 'Warning', 'ReplicaFailed', `replica ${r.name} failed: ${reason}; ${next}`, Kind.Replica, r.name);
  }

  /** Ends the salvage under way with an event saying how it went. */
  private async endSalvage(volume: Obj<VolumeValue>, outcome: string, failed: boolean): Promise<void> {
    const salvage = volume.value.status.salvage ?? null;
    await this.setStatus(volume.name, (s) => {
      s.salvage = null;
    });
    if (salvage === null) return;
    await this.event(volume.name, failed ? 'Warning' : 'Normal', failed ? 'SalvageFailed' : 'Salvaged', `salvage of volume ${volume.name} (epoch ${salvage.epoch}) ${outcome}`);
  }

  private async reconcileRunning(volume: Obj<VolumeValue>, engine: Obj<EngineValue>, replicas: Obj<ReplicaValue>[]): Promise<number | null> {
    const v = volume.value;
    const e = engine.value;
    const wanted = v.spec.numberOfReplicas;
    const now = Date.now();

    // What the engine says of each replica it has.
    const anyInService = Object.entries(e.status.replicas).some(([name, said]) => name in e.spec.replicas && said.mode === 'RW');
    for (const r of replicas) {
      if (!(r.name in e.spec.replicas)) continue;
      const said = e.status.replicas[r.name];
      if (said === undefined) continue;
      // The engine's view of this replica at the address it has now (an older entry may linger for a pass).
      const current = said.address === undefined || said.address === e.spec.replicas[r.name];
      if (said.mode === 'RW' && r.value.spec.failedAt !== null && current) {
        // A failed replica the engine took back (delta rebuild done, or its start-up recovery): in service again.
        await this.objects.mutate(Kind.Replica, r.name, (x) => {
          x.spec.failedAt = null;
          x.spec.desireState = 'running';
          x.spec.healthyAt ??= new Date().toISOString();
        });
        const attempts = this.deltaState.get(r.name)?.attempts ?? 0;
        this.deltaState.delete(r.name);
        await this.event(volume.name, 'Normal', 'ReplicaRebuilt', `replica ${r.name} is back in service (RW)${attempts > 0 ? ' after a delta rebuild' : ''}`, Kind.Replica, r.name);
      } else if (said.mode === 'RW' && r.value.spec.healthyAt === null) {
        await this.objects.mutate(Kind.Replica, r.name, (x) => {
          x.spec.healthyAt ??= new Date().toISOString();
        });
        if (Object.keys(e.spec.replicas).length > 0 && replicas.some((o) => o.value.spec.healthyAt !== null)) {
          await this.event(volume.name, 'Normal', 'ReplicaRebuilt', `replica ${r.name} rebuilt and in service (RW)`, Kind.Replica, r.name);
        }
      } else if (said.mode === 'ERR' && r.value.spec.failedAt === null && anyInService) {
        // Only next to a replica still in service: when every replica is ERR the volume is
        // faulted and they are kept as they are, for a restart or salvage to bring them back.
        await this.failReplica(volume.name, r, said.reason ?? 'engine reported ERR', true, said.resumable === true);
      }
    }
    // The engine refused to take a returning replica back (no delta possible): a new one replaces it.
    for (const [name, err] of Object.entries(e.status.addErrors ?? {})) {
      const st = this.deltaState.get(name);
      if (st === undefined || st.refused || st.address !== err.address || err.code !== ErrorCode.EINVAL) continue;
      st.refused = true;
      await this.event(volume.name, 'Warning', 'DeltaRefused', `the engine cannot rebuild replica ${name} by delta (${err.message}): a new replica replaces it`, Kind.Replica, name);
    }

    let fresh = await this.replicasOf(volume.name);
    // A replica not yet in the engine whose node went down (placed there just before its lease
    // ran out, say) would never start: it is failed now, so that one is placed elsewhere.
    let strandedNow = false;
    for (const r of fresh) {
      if (r.value.spec.failedAt !== null || r.value.deletionRequestedAt !== null || !isOnDownNode(r) || r.name in e.spec.replicas) continue;
      await this.failReplica(volume.name, r, `its node ${r.value.spec.nodeId} is down before it joined the engine`, true);
      strandedNow = true;
    }
    if (strandedNow) fresh = await this.replicasOf(volume.name);
    const failed = fresh.filter((r) => r.value.spec.failedAt !== null && r.value.deletionRequestedAt === null);
    const active = fresh.filter((r) => r.value.spec.failedAt === null && r.value.deletionRequestedAt === null);

    // The engine's replica set: the active replicas that are running, and the failed ones that
    // may still come back by delta. Failed ones past hope leave it.
    const desired: Record<string, string> = {};
    for (const r of active) {
      const current = e.spec.replicas[r.name];
      // The engine was told a newer address at its start (the replica restarted meanwhile): it stands.
      const said = e.status.replicas[r.name];
      const moved = current !== undefined && said?.address !== undefined && said.address !== current && said.mode !== 'ERR' && said.address === r.value.status.address;
      if (moved) desired[r.name] = said.address!;
      else if (current !== undefined) desired[r.name] = current;
      else if (r.value.status.state === 'running' && r.value.status.address !== null && r.value.spec.desireState === 'running') desired[r.name] = r.value.status.address;
    }
    const waitMs = (await this.settings.int('replica-replenishment-wait-seconds')) * 1000;
    let againMs: number | null = null;
    const returning: Obj<ReplicaValue>[] = [];
    for (const r of failed) {
      const decision = this.deltaDecision(r, e, waitMs, now);
      if (decision.holds) {
        if (decision.engineAt !== null) desired[r.name] = decision.engineAt;
        returning.push(r);
        if (decision.wakeInMs !== null) againMs = Math.min(againMs ?? decision.wakeInMs, decision.wakeInMs);
        if (decision.attempt) {
          await this.event(volume.name, 'Normal', 'ReplicaReturning', `replica ${r.name} is back at ${decision.engineAt}: asking the engine for a delta rebuild of ${r.name} (attempt ${this.deltaState.get(r.name)!.attempts} of ${MAX_DELTA_ATTEMPTS})`, Kind.Replica, r.name);
        }
      } else {
        // Out for good: its process stops (it is deleted once the volume is whole again).
        if (r.value.spec.desireState !== 'stopped') {
          await this.objects.mutate(Kind.Replica, r.name, (x) => {
            x.spec.desireState = 'stopped';
          });
        }
        if (decision.gaveUp !== null) await this.event(volume.name, 'Warning', 'ReplicaReplacing', `replica ${r.name} ${decision.gaveUp}: a new replica replaces it`, Kind.Replica, r.name);
      }
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

    const leaving = await this.leavingReplicas(active);
    const modes = Object.entries(e.status.replicas).filter(([name]) => name in desired);
    const rw = modes.filter(([, s]) => s.mode === 'RW').length;
    const rebuilding = modes.some(([, s]) => s.mode === 'WO');
    const robustness: VolumeRobustness = e.status.faulted || rw === 0 ? 'faulted' : rw >= wanted ? 'healthy' : 'degraded';

    // Replenish: new replicas for the missing ones (not while faulted: nothing to copy from, nor
    // while an expansion is under way: a new replica must have the size the engine serves).
    // A failed replica that may still come back by delta holds its place until it is given up.
    let message: string | null = null;
    const backoff = this.replacementBackoff.get(volume.name);
    const backoffMs = backoff === undefined ? 0 : backoff.notBeforeMs - Date.now();
    const missing = wanted - active.length - returning.length;
    const heldByJob = v.spec.jobAttachment ?? null;
    if (heldByJob !== null && missing > 0) {
      // A job's short attachment of a detached volume must not start a rebuild: the replicas are
      // replaced at the volume's next attach by a user.
      message = `recurring job ${heldByJob.job} holds the volume: ${missing} missing replica(s) are not replaced until a workload attaches it`;
    } else if (robustness !== 'faulted' && missing > 0 && e.status.sizeBytes === e.spec.sizeBytes && sizeBytes === e.spec.sizeBytes) {
      if (backoffMs > 0) {
        message = `${backoff!.failures} replacement replica(s) failed before serving; the next one in ${Math.ceil(backoffMs / 1000)} s`;
      } else {
        const added = await this.addReplicas(volume, active, missing, e.status.sizeBytes, 'running');
        if (added < missing) message = this.lastPlacementProblem.get(volume.name) ?? null;
      }
    }
    if (message === null && leaving.size > 0 && robustness !== 'faulted') {
      message = await this.moveReplicas(volume, active, leaving, new Set(modes.filter(([, x]) => x.mode === 'RW').map(([name]) => name)), {
        sizeBytes: e.status.sizeBytes, returning: returning.map((r) => r.name), mayAdd: missing <= 0 && !rebuilding && returning.length === 0 && heldByJob === null && backoffMs <= 0 && e.status.sizeBytes === e.spec.sizeBytes,
      });
    }
    if (message === null && leaving.size === 0 && robustness === 'healthy' && !rebuilding && missing <= 0 && heldByJob === null && active.length === wanted) {
      if (!(await this.keepLocal(volume, active, e.status.sizeBytes))) await this.autoBalance(volume, active, e.status.sizeBytes);
    }
    if (message === null && returning.length > 0 && robustness !== 'healthy') {
      message = `waiting for failed replica(s) ${returning.map((r) => r.name).join(', ')} to come back for a delta rebuild`;
    }
    for (const r of active) {
      if (r.value.spec.desireState !== 'running') {
        await this.objects.mutate(Kind.Replica, r.name, (x) => {
          x.spec.desireState = 'running';
        });
      }
      if (r.value.status.state === 'error' && !(r.name in desired)) message = `replica ${r.name}: ${r.value.status.message}`;
    }
    // A failed replica that never served holds nothing worth keeping (a partial copy it cannot
    // go on with): it goes now, so that failing rebuilds do not pile up; its failure delays the
    // next replacement. (One whose rebuild can go on where it stopped is waited for, above.)
    const removedNow = new Set<string>();
    for (const r of failed) {
      if (r.value.spec.healthyAt !== null || returning.includes(r)) continue;
      removedNow.add(r.name);
      await this.requestReplicaDeletion(r.name);
      this.deltaState.delete(r.name);
      const prev = this.replacementBackoff.get(volume.name)?.failures ?? 0;
      const delayMs = Math.min(REPLACEMENT_BACKOFF_MAX_MS, REPLACEMENT_BACKOFF_MIN_MS * 2 ** Math.min(prev, 16));
      this.replacementBackoff.set(volume.name, { failures: prev + 1, notBeforeMs: Date.now() + delayMs });
      await this.event(volume.name, 'Warning', 'ReplicaRemoved', `replica ${r.name} failed before it served and was removed; the next replacement in ${Math.round(delayMs / 1000)} s`, Kind.Replica, r.name);
    }
    if (robustness === 'healthy') this.replacementBackoff.delete(volume.name);
    if (robustness !== 'faulted') this.salvageBackoff.delete(volume.name);
    // The failed replicas go once the volume is whole again.
    if (robustness === 'healthy') {
      for (const r of failed) {
        if (removedNow.has(r.name)) continue;
        // A move waits for the new replica it is bringing back (its rebuild goes on): kept.
        if (leaving.size > 0 && returning.includes(r)) continue;
        await this.requestReplicaDeletion(r.name);
        this.deltaState.delete(r.name);
        await this.event(volume.name, 'Normal', 'ReplicaRemoved', `failed replica ${r.name} removed`, Kind.Replica, r.name);
      }
    }

    // What the engine found and did at start-up, and a salvage it completes.
    await this.noteEngineReports(volume, engine);
    if ((v.status.salvage ?? null) !== null && v.status.salvage!.epoch === e.spec.epoch) {
      if (robustness === 'faulted') {
        await this.endSalvage(volume, `did not bring it back: still faulted${e.status.faultedReason !== null ? ` (${e.status.faultedReason})` : ''}`, true);
      } else {
        await this.endSalvage(volume, `brought it back: ${salvageOutcome(e, rw, wanted)}`, false);
      }
    }
    let salvageStarted = false;
    if (robustness === 'faulted') {
      message = `faulted: ${e.status.faultedReason ?? 'no replica in service'}`;
      if (e.status.faulted || Object.keys(e.status.replicas).length > 0) {
        const auto = await this.autoSalvage(volume);
        salvageStarted = auto.started;
        if (auto.message !== null) message = `${message}; ${auto.message}`;
      }
    }

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
    if (salvageStarted) return 0;
    if ((v.spec.moveAttachment ?? null) !== null && robustness === 'healthy' && leaving.size === 0 && !rebuilding && missing <= 0 && active.length === wanted) {
      await this.releaseMoveAttachment(volume.name, 'the replicas have moved');
      return 0;
    }
    if (e.spec.frontend && e.status.endpoint === null) return WAIT_MS;
    const baseMs = robustness === 'healthy' ? RESYNC_MS : 1000;
    return againMs === null ? baseMs : Math.max(50, Math.min(baseMs, againMs));
  }

  /**
   * Replicas of a detached volume that are to leave their disk or node. A volume never attached
   * holds no data: a new empty replica takes the place of a leaving one at once. Otherwise the
   * volume is attached (no NBD export) on a node that holds a healthy replica, the moves run as
   * for any attached volume, and it is detached again when they are done. Returns null when it
   * did something (look again), else what the volume waits for.
   */
  private async moveWhileDetached(volume: Obj<VolumeValue>, inPlace: Obj<ReplicaValue>[], leaving: Map<string, Leaving>): Promise<string | null> {
    const v = volume.value;
    const listed = [...leaving].map(([name, l]) => `${name} (${l.why})`).join(', ');
    if (v.status.epoch === 0) {
      const first = inPlace.find((r) => leaving.has(r.name))!;
      const l = leaving.get(first.name)!;
      const added = await this.addReplicas(volume, inPlace, 1, v.spec.sizeBytes, 'stopped', l.only ?? undefined);
      if (added === 0) return `replica ${first.name} cannot move (${l.why}): ${this.lastPlacementProblem.get(volume.name) ?? 'no disk can take it'}`;
      await this.requestReplicaDeletion(first.name);
      await this.event(volume.name, 'Normal', 'ReplicaMoved', `replica ${first.name} left disk ${first.value.spec.diskId} of node ${first.value.spec.nodeId} (${l.why}); the volume was never attached, so an empty replica took its place`, Kind.Replica, first.name);
      return null;
    }
    const restore = v.spec.restore ?? null;
    // A restore attaches the volume itself (the moves run then); a DR standby is applied the same way.
    if (restore !== null && (restore.standby || v.status.restore?.state !== 'completed')) return `replica(s) ${listed} will move while the restore has the volume attached`;
    if ((v.spec.jobAttachment ?? null) !== null) return `replica(s) ${listed} will move once the recurring job is done with the volume`;
    const node = await nodeWithHealthyReplica(this.objects, volume.name, null);
    if (node === null) return `replica(s) ${listed} will move once a node that is up holds a healthy replica to attach the volume on (a replica moves by a rebuild, which needs a running engine)`;
    let attached = false;
    await this.objects.mutate(Kind.Volume, volume.name, (x) => {
      attached = false;
      if (x.spec.nodeId !== null || x.deletionRequestedAt !== null || (x.spec.jobAttachment ?? null) !== null || (x.spec.pendingAttach ?? null) !== null) return false;
      x.spec.nodeId = node;
      x.spec.maintenance = true;
      x.spec.moveAttachment = { node, startedAt: new Date().toISOString(), why: listed };
      attached = true;
    });
    if (attached) await this.event(volume.name, 'Normal', 'MoveAttached', `volume ${volume.name} attached on node ${node} without an NBD export to move replica(s) ${listed}; detached when they have moved`);
    return null;
  }

  /** Detaches a volume attached for replica moves (a workload attach that waited follows). */
  private async releaseMoveAttachment(volume: string, why: string): Promise<void> {
    let released = false;
    const after = await this.objects.mutate(Kind.Volume, volume, (x) => {
      released = false;
      if ((x.spec.moveAttachment ?? null) === null) return false;
      x.spec.moveAttachment = null;
      x.spec.nodeId = null;
      x.spec.maintenance = false;
      released = true;
    });
    if (!released) return;
    const waiting = after?.value.spec.pendingAttach ?? null;
    await this.event(volume, 'Normal', 'MoveDetached', `${why}: detaching volume ${volume}${waiting !== null ? `; then it attaches to node ${waiting.nodeId} as asked` : ''}`);
  }

  /**
   * The replicas of a volume that are to leave, and why: moved by a user (`zebu replica move`:
   * where to, if said), or on a disk or a node being evicted.
   */
  private async leavingReplicas(replicas: Obj<ReplicaValue>[]): Promise<Map<string, Leaving>> {
    const out = new Map<string, Leaving>();
    if (replicas.length === 0) return out;
    const [disks, nodes] = await Promise.all([this.objects.list(Kind.Disk), this.objects.list(Kind.Node)]);
    const evictedDisks = new Set(disks.filter((d) => d.value.spec.evict === true).map((d) => d.name));
    const evictedNodes = new Set(nodes.filter((n) => n.value.spec.evict === true).map((n) => n.name));
    for (const r of replicas) {
      const move = r.value.spec.move ?? null;
      if (move !== null) {
        const to = move.diskId !== null ? ` to disk ${move.diskId}` : move.nodeId !== null ? ` to node ${move.nodeId}` : '';
        const by = move.balance !== undefined ? `by replica-auto-balance: ${move.balance}` : move.locality !== undefined ? `for ${move.locality}` : `as asked at ${move.requestedAt}`;
        out.set(r.name, { why: `moved${to} ${by}`, only: { diskId: move.diskId, nodeId: move.nodeId } });
      } else if (evictedDisks.has(r.value.spec.diskId)) {
        out.set(r.name, { why: `disk ${r.value.spec.diskId} is being evicted`, only: null });
      } else if (evictedNodes.has(r.value.spec.nodeId)) {
        out.set(r.name, { why: `node ${r.value.spec.nodeId} is being evicted`, only: null });
      }
    }
    return out;
  }

  /**
   * replica-auto-balance: asks one replica of a healthy attached volume, or of a detached one
   * with all its replicas, to move when that spreads replicas better (scheduler.ts,
   * balanceMove); the move itself is a move as any other.
   */
  private async autoBalance(volume: Obj<VolumeValue>, active: Obj<ReplicaValue>[], sizeBytes: number): Promise<void> {
    const mode = (await this.settings.string('replica-auto-balance')) as AutoBalance;
    // A volume on a backing image is left where it is: its replicas need a file of the image.
    if (mode === 'disabled' || volume.value.spec.backingImage != null) return;
    const view = await clusterView(this.objects);
    const counts = new Map<string, number>();
    for (const r of await this.objects.list(Kind.Replica)) {
      if (r.value.deletionRequestedAt !== null) continue;
      counts.set(r.value.spec.diskId, (counts.get(r.value.spec.diskId) ?? 0) + 1);
    }
    const move = balanceMove(mode, {
      sizeBytes,
      replicas: active.map((r) => ({ name: r.name, nodeId: r.value.spec.nodeId, diskId: r.value.spec.diskId })),
      nodes: view.nodes,
      disks: view.disks,
      counts,
      selector: selectorOf(volume.value),
      policy: await this.placementPolicy(),
    });
    if (move === null) return;
    await this.objects.mutate(Kind.Replica, move.replica, (x) => {
      if ((x.spec.move ?? null) !== null || x.deletionRequestedAt !== null) return false;
      x.spec.move = { requestedAt: new Date().toISOString(), diskId: move.diskId, nodeId: null, balance: `${mode}: ${move.why}` };
    });
    await this.event(volume.name, 'Normal', 'ReplicaAutoBalance', `replica ${move.replica} moves to disk ${move.diskId} (replica-auto-balance ${mode}: ${move.why})`, Kind.Replica, move.replica);
  }

  /**
   * Data locality `best-effort`: a healthy volume attached (by a workload) on a node that holds
   * none of its replicas gets one there — a replica elsewhere is asked to move to that node
   * (built there first, then the remote one removed) — when the node can take it. Never for the
   * manager's own attachments (a recurring job's, replica moves'): they leave as soon as done.
   * True when a move was asked for.
   */
  private async keepLocal(volume: Obj<VolumeValue>, active: Obj<ReplicaValue>[], sizeBytes: number): Promise<boolean> {
    const v = volume.value;
    const node = v.spec.nodeId;
    if ((v.spec.dataLocality ?? 'disabled') !== 'best-effort' || node === null) return false;
    if ((v.spec.jobAttachment ?? null) !== null || (v.spec.moveAttachment ?? null) !== null) return false;
    if (active.some((r) => r.value.spec.nodeId === node)) return false;
    const view = await clusterView(this.objects);
    const probe = scheduleReplicas(1, {
      sizeBytes,
      existing: active.map((r) => ({ nodeId: r.value.spec.nodeId, diskId: r.value.spec.diskId })),
      nodes: view.nodes,
      disks: view.disks,
      only: { diskId: null, nodeId: node },
      image: await this.imageRules(volume),
      selector: selectorOf(v),
      policy: await this.placementPolicy(),
    });
    if (probe.placements.length === 0) {
      await this.placementProblem(volume.name, `data locality: node ${node} cannot take a replica of volume ${volume.name} (${probe.reasons.join('; ') || 'no disk there'}); the replicas stay where they are`);
      return false;
    }
    // The replica to move: one from the node that holds the most of them (spread stays best).
    const perNode = new Map<string, number>();
    for (const r of active) perNode.set(r.value.spec.nodeId, (perNode.get(r.value.spec.nodeId) ?? 0) + 1);
    const from = [...active].sort((a, b) => (perNode.get(b.value.spec.nodeId)! - perNode.get(a.value.spec.nodeId)!) || a.name.localeCompare(b.name))[0];
    const why = `data locality best-effort: volume ${volume.name} is attached on node ${node}, which holds none of its replicas`;
    let asked = false;
    await this.objects.mutate(Kind.Replica, from.name, (x) => {
      if ((x.spec.move ?? null) !== null || x.deletionRequestedAt !== null) return false;
      x.spec.move = { requestedAt: new Date().toISOString(), diskId: null, nodeId: node, locality: why };
      asked = true;
    });
    if (asked) await this.event(volume.name, 'Normal', 'DataLocality', `replica ${from.name} moves from node ${from.value.spec.nodeId} to node ${node} (${why})`, Kind.Replica, from.name);
    return asked;
  }

  /** Where the volume's backing image lets a replica go (undefined: no image, anywhere). */
  private async imageRules(volume: Obj<VolumeValue>): Promise<ImageRules | undefined> {
    const name = volume.value.spec.backingImage?.name ?? null;
    if (name === null) return undefined;
    const obj = await this.objects.get(Kind.BackingImage, name);
    return obj === null ? undefined : imagePlacement(name, obj.value.spec, Object.values(obj.value.status.files));
  }

  /**
   * Moves leaving replicas of an attached volume, one at a time and never below its replica
   * count: a new replica is placed (where the move asked) and rebuilt while the leaving one
   * still serves; once the replicas in service without the leaving ones are enough, those go.
   * Returns what the volume waits for, or null.
   */
  private async moveReplicas(volume: Obj<VolumeValue>, active: Obj<ReplicaValue>[], leaving: Map<string, Leaving>, rwNames: Set<string>, options: { sizeBytes: number; mayAdd: boolean; returning: string[] }): Promise<string | null> {
    const wanted = volume.value.spec.numberOfReplicas;
    const staying = active.filter((r) => !leaving.has(r.name));
    if (staying.filter((r) => rwNames.has(r.name)).length >= wanted) {
      for (const r of active) {
        const l = leaving.get(r.name);
        if (l === undefined) continue;
        await this.requestReplicaDeletion(r.name);
        await this.event(volume.name, 'Normal', 'ReplicaMoved', `replica ${r.name} left disk ${r.value.spec.diskId} of node ${r.value.spec.nodeId} (${l.why}); the volume has ${wanted} replica(s) in service without it`, Kind.Replica, r.name);
      }
      return null;
    }
    const first = active.find((r) => leaving.has(r.name))!;
    const l = leaving.get(first.name)!;
    // Failed replicas that may still come back (a new replica whose rebuild goes on where it
    // stopped) count as on their way.
    const pending = [...staying.filter((r) => !rwNames.has(r.name)).map((r) => r.name), ...options.returning];
    if (staying.length + options.returning.length >= wanted) {
      return `replica ${first.name} is moving (${l.why}): waiting for ${pending.join(', ')} to be rebuilt`;
    }
    if (!options.mayAdd) return `replica ${first.name} is to move (${l.why}): waiting for the volume to be whole and not rebuilding`;
    const added = await this.addReplicas(volume, active, 1, options.sizeBytes, 'running', l.only ?? undefined);
    if (added === 0) return `replica ${first.name} cannot move (${l.why}): ${this.lastPlacementProblem.get(volume.name) ?? 'no disk can take it'}`;
    const placed = (await this.objects.list(Kind.Replica)).filter((r) => r.value.spec.volumeName === volume.name && !active.some((a) => a.name === r.name) && r.value.deletionRequestedAt === null);
    const where = placed.length > 0 ? ` ${placed[0].name} on disk ${placed[0].value.spec.diskId} of node ${placed[0].value.spec.nodeId}` : '';
    await this.event(volume.name, 'Normal', 'ReplicaMoving', `replica ${first.name} is moving (${l.why}): new replica${where} is being built; ${first.name} serves until it is`, Kind.Replica, first.name);
    return `replica ${first.name} is moving (${l.why})`;
  }

  /**
   * What to do with a failed replica that served before: hold its place (no new replica yet) and
   * keep it in the engine's set at the address the engine has; or, when its process is back on a
   * new address, put it in the set at that address, which makes the agent ask the engine to add
   * it again (a delta rebuild); or give it up (then a new replica replaces it).
   */
  private deltaDecision(r: Obj<ReplicaValue>, e: EngineValue, waitMs: number, nowMs: number): DeltaDecision {
    const st = this.deltaState.get(r.name) ?? { address: null, attempts: 0, refused: false, givenUp: false, resumable: false };
    this.deltaState.set(r.name, st);
    if (e.status.replicas[r.name]?.resumable === true) st.resumable = true;
    const none: DeltaDecision = { holds: false, engineAt: null, attempt: false, wakeInMs: null, gaveUp: null };
    // Worth waiting for: a replica that served, or one whose rebuild can go on where it stopped.
    if ((r.value.spec.healthyAt === null && !st.resumable) || st.givenUp) return none;
    if (waitMs === 0 && st.attempts === 0) {
      // No waiting for failed replicas: replaced at once (ReplicaFailed said so).
      st.givenUp = true;
      return none;
    }
    const giveUp = (why: string): DeltaDecision => {
      st.givenUp = true;
      return { ...none, gaveUp: why };
    };
    if (st.refused) return giveUp('cannot be rebuilt by delta');
    const inEngineAt = e.spec.replicas[r.name] ?? null;
    // A delta rebuild under way runs to its end, wait or not.
    if (inEngineAt !== null && st.address === inEngineAt && e.status.replicas[r.name]?.mode === 'WO') return { ...none, holds: true, engineAt: inEngineAt };
    const leftMs = Date.parse(r.value.spec.failedAt!) + waitMs - nowMs;
    if (leftMs <= 0) return giveUp(st.attempts > 0 ? `was not rebuilt by delta within ${waitMs / 1000} s` : `did not come back within ${waitMs / 1000} s`);
    const address = r.value.status.state === 'running' && r.value.spec.desireState === 'running' ? r.value.status.address : null;
    if (address !== null && address !== inEngineAt && st.address !== address) {
      if (st.attempts >= MAX_DELTA_ATTEMPTS) return giveUp(`failed again after ${st.attempts} delta rebuild attempt(s)`);
      st.attempts++;
      st.address = address;
      return { holds: true, engineAt: address, attempt: true, wakeInMs: leftMs, gaveUp: null };
    }
    return { ...none, holds: true, engineAt: inEngineAt, wakeInMs: leftMs };
  }

  /**
   * Events for what the NBD frontend's link to the engine went through (frontend/engine-link.ts):
   * the engine went away or hung (client requests held), and a new engine took them over. The
   * volume's status keeps the link last seen, to tell what is new.
   */
  private async noteEngineLink(volume: Obj<VolumeValue>, engine: Obj<EngineValue>): Promise<void> {
    const link = engine.value.status.frontendLink ?? null;
    const seen = volume.value.status.engineLink ?? null;
    if (link === null || JSON.stringify(link) === JSON.stringify(seen)) return;
    const closed = link.lastClose !== null && link.lastClose.at !== seen?.lastClose?.at;
    // Re-issued requests are counted from the moment the engine went (as far as seen; counters
    // start again with a new frontend).
    const sameCounters = seen !== null && seen.reissued <= link.reissued;
    const reissuedBefore = closed ? (sameCounters ? seen!.reissued : 0) : (volume.value.status.engineLinkReissuedBefore ?? 0);
    await this.setStatus(volume.name, (s) => {
      s.engineLink = link;
      s.engineLinkReissuedBefore = reissuedBefore;
    });
    if (closed && link.lastClose!.kind === 'frontend-restarted') {
      await this.event(volume.name, 'Warning', 'FrontendRestarted', `the NBD frontend serving volume ${volume.name} restarted; it serves the volume again`, Kind.Engine, engine.name);
    } else if (closed) {
      await this.event(volume.name, 'Warning', link.lastClose!.kind === 'engine-hung' ? 'EngineHung' : 'EngineLinkClosed',
        `the NBD frontend lost the engine of volume ${volume.name} (${link.lastClose!.cause}): ${link.lastClose!.outstanding} client request(s) held for the next engine`, Kind.Engine, engine.name);
    }
    if (link.state === 'OPEN' && link.reopens > 0 && link.lastClose?.kind !== 'frontend-restarted' && (closed || (seen !== null && seen.state !== 'OPEN'))) {
      await this.event(volume.name, 'Normal', 'EngineLinkReopened',
        `a new engine of volume ${volume.name} serves: ${Math.max(0, link.reissued - reissuedBefore)} held request(s) re-issued to it; longest hold so far ${link.longestHoldMs} ms (reopens: ${link.reopens}, engines found hung: ${link.hangs})`, Kind.Engine, engine.name);
    }
  }

  /** Copies the engine's recovery and verify reports into the volume's status, with an event for a recovery that did work. */
  private async noteEngineReports(volume: Obj<VolumeValue>, engine: Obj<EngineValue>): Promise<void> {
    const recovery = engine.value.status.recovery ?? null;
    const known = volume.value.status.lastRecovery ?? null;
    if (recovery !== null && (known === null || known.at !== recovery.at)) {
      await this.setStatus(volume.name, (s) => {
        s.lastRecovery = recovery;
      });
      if (recoveryDidWork(recovery)) {
        await this.event(volume.name, recovery.erredReplicas.length > 0 ? 'Warning' : 'Normal', 'Recovery', `engine of volume ${volume.name} (epoch ${engine.value.spec.epoch}) recovered: ${describeRecovery(recovery)}`, Kind.Engine, engine.name);
      }
    }
    const verify = engine.value.status.lastVerify ?? null;
    const lastVerify = volume.value.status.lastVerify ?? null;
    if (verify !== null && (lastVerify === null || verify.at > lastVerify.at)) {
      await this.setStatus(volume.name, (s) => {
        s.lastVerify = verify;
      });
    }
  }
}

function recoveryDidWork(r: RecoveryView): boolean {
  return r.regions > 0 || r.deltaReplicas.length > 0 || r.erredReplicas.length > 0;
}

export function describeRecovery(r: RecoveryView): string {
  const parts = [
    r.clean ? 'clean shutdown' : 'unclean shutdown',
    `${r.regions} region(s) (${r.bytes} bytes) resynced${r.source !== null ? ` from ${r.source}` : ''} of ${r.checkedRegions} compared, in ${r.durationMs} ms`,
  ];
  if (r.deltaReplicas.length > 0) parts.push(`delta rebuild of ${r.deltaReplicas.join(', ')}`);
  if (r.erredReplicas.length > 0) parts.push(`out (to be replaced): ${r.erredReplicas.join(', ')}`);
  return parts.join('; ');
}

function salvageOutcome(e: EngineValue, rw: number, wanted: number): string {
  const inService = Object.entries(e.status.replicas).filter(([, s]) => s.mode === 'RW').map(([name]) => name);
  const out = Object.entries(e.status.replicas).filter(([, s]) => s.mode === 'ERR').map(([name]) => name);
  const recovery = e.status.recovery ?? null;
  const parts = [`${rw} of ${wanted} replica(s) in service (${inService.join(', ')})`];
  if (recovery !== null) parts.push(`source ${recovery.source ?? 'none'}`, `${recovery.regions} region(s) resynced`);
  if (recovery !== null && recovery.deltaReplicas.length > 0) parts.push(`delta rebuild of ${recovery.deltaReplicas.join(', ')}`);
  if (out.length > 0) parts.push(`out, to be replaced: ${out.join(', ')}`);
  return parts.join('; ');
}
