/**
 * The manager's operations (ManagerService): validates requests against the current state,
 * records what is wanted in the store, and builds views. It never waits for the world to change:
 * the controllers do that; clients poll the views.
 */
import { ZebuError, ErrorCode, invalid } from '../errors.ts';
import type { StoreObject } from '../store/store.ts';
import { Kind, type EngineValue, type EngineIoStats, type EngineReplicaStatus, type Objects, type ReplicaValue, type RestoreSpec, type VolumeValue } from '../cluster/objects.ts';
import { LEADER_NAME } from './leader-election.ts';
import type { Settings } from '../cluster/settings.ts';
import type { DataLocality } from '../cluster/object-types.ts';
import type { EventRecorder } from './events.ts';
import { clusterView } from './volume-controller.ts';
import { scheduleReplicas, diskRefusal, type ImageRules } from './scheduler.ts';
import { checkBackingImageName, imagePlacement } from './backing-images.ts';
import type {
  DiskUpdateInput, DiskView, EventView, ManagerService, NodeUpdateInput, NodeView, ReplicaMoveInput, ReplicaView, SettingView, SnapshotView,
  VerifyView, VolumeAttachInput, VolumeRestoreView, VolumeCreateInput, VolumeUpdateInput, VolumeMetrics, VolumeReplicaSummary, VolumeSalvageInput, VolumeVerifyInput, VolumeView,
} from './types.ts';
import { unrepairedRegions, verifyFromEngine } from '../cluster/engine-reports.ts';
import { volumeProtection, type VolumeProtection } from './protection.ts';

export const VOLUME_NAME = /^[a-z0-9][a-z0-9._-]{0,62}$/;
const SNAPSHOT_NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$/;
export const MIN_VOLUME_BYTES = 4096;
export const MAX_VOLUME_BYTES = 2 ** 44;
const MAX_REPLICAS = 20;

/** How the manager reaches the engine of a volume on a node (the node's agent). */
export interface NodeAgents {
  engineRequest(nodeId: string, volume: string, method: string, path: string, body?: unknown): Promise<unknown>;
}

export interface ManagerServiceOptions {
  objects: Objects;
  settings: Settings;
  events: EventRecorder;
  agents: NodeAgents;
  /** The node a volume attaches to when the request names none. */
  defaultNodeId: string;
  /** Wakes the volume controller for a volume now. */
  kick?: (volume: string) => void;
  /** Wakes the backup controller (restores, standby). */
  backupKick?: () => void;
}

function validateVolumeName(name: unknown, field = 'name'): string {
  if (typeof name !== 'string' || !VOLUME_NAME.test(name)) {
    throw invalid(`volume name must be 1-63 characters of [a-z0-9._-] starting with a letter or digit, got ${JSON.stringify(name)}`, field);
  }
  return name;
}

function validateSize(sizeBytes: unknown): number {
  if (typeof sizeBytes !== 'number' || !Number.isSafeInteger(sizeBytes)) throw invalid(`sizeBytes must be a whole number of bytes, got ${JSON.stringify(sizeBytes)}`, 'sizeBytes');
  if (sizeBytes % 4096 !== 0) throw invalid(`sizeBytes must be a multiple of 4096, got ${sizeBytes}`, 'sizeBytes');
  if (sizeBytes < MIN_VOLUME_BYTES || sizeBytes > MAX_VOLUME_BYTES) throw invalid(`sizeBytes must be between ${MIN_VOLUME_BYTES} and ${MAX_VOLUME_BYTES} (16 TiB), got ${sizeBytes}`, 'sizeBytes');
  return sizeBytes;
}

function validateSnapshotName(name: unknown, field = 'name'): string {
  if (typeof name !== 'string' || !SNAPSHOT_NAME.test(name)) {
    throw invalid(`snapshot name must be 1-63 characters of [A-Za-z0-9._-] starting with a letter or digit, got ${JSON.stringify(name)}`, field);
  }
  return name;
}

function stateConflict(message: string): ZebuError {
  return new ZebuError(ErrorCode.BUSY, message);
}

function restoreView(v: VolumeValue): VolumeRestoreView | null {
  const spec = v.spec.restore ?? null;
  if (spec === null) return null;
  const s = v.status.restore ?? null;
  const total = s?.totalBytes ?? 0;
  return {
    backup: s?.backup ?? spec.backup,
    sourceVolume: spec.sourceVolume,
    standby: spec.standby,
    state: s?.state ?? 'pending',
    applied: s?.applied ?? null,
    progress: s?.state === 'completed' ? 1 : total > 0 ? Math.min(1, (s?.doneBytes ?? 0) / total) : 0,
    doneBytes: s?.doneBytes ?? 0,
    totalBytes: total,
    bytesPerSecond: s?.bytesPerSecond ?? 0,
    message: s?.message ?? null,
    completedAt: s?.completedAt ?? null,
  };
}

/** A volume whose data is not (yet) a whole backup is never reported healthy. */
function restoreRobustness(v: VolumeValue): VolumeValue['status']['robustness'] {
  const spec = v.spec.restore ?? null;
  if (spec === null) return v.status.robustness;
  const s = v.status.restore ?? null;
  if (s?.state === 'error') return 'faulted';
  if (s?.applied == null) return v.status.robustness === 'faulted' ? 'faulted' : 'unknown';
  return v.status.robustness;
}

/** A recurring job or replica moves attached the volume (not a user): it is detached by them. */
function heldByManager(v: VolumeValue): boolean {
  return (v.spec.jobAttachment ?? null) !== null || (v.spec.moveAttachment ?? null) !== null;
}

/** Let go (by a user or a job) but its engine and replicas are still stopping. */
function stillDetaching(v: VolumeValue): boolean {
  return v.spec.nodeId === null && v.status.state === 'detaching';
}

/**
 * The engine's rebuild progress for replica `r` while it is WO — only when the engine has it at
 * the replica's current address (a replica restarted on another port is not the one it copies to).
 */
function rebuildOf(said: EngineReplicaStatus | undefined, r: StoreObject<ReplicaValue>): EngineReplicaStatus['rebuild'] {
  if (said?.mode !== 'WO' || said.rebuild === null) return null;
  return said.address === undefined || said.address === r.value.status.address ? said.rebuild : null;
}

/** Why a user may not attach a volume being restored, or a DR standby; null when it may. */
function restoreAttachRefusal(name: string, v: VolumeValue): string | null {
  const spec = v.spec.restore ?? null;
  if (spec === null) return null;
  const s = v.status.restore ?? null;
  if (spec.standby) return `volume ${name} is a DR standby of volume ${spec.sourceVolume}; activate it first (zebu volume activate ${name})`;
  if (s?.state === 'error') return `volume ${name}: the restore of backup ${s.backup} failed (${s.message}); its data is incomplete — delete it and restore again`;
  if (s === null || s.state !== 'completed' || s.attachedForRestore) {
    const pct = s !== null && s.totalBytes > 0 ? ` (${Math.floor((100 * s.doneBytes) / s.totalBytes)}%)` : '';
    return `volume ${name} is being restored from backup ${s?.backup ?? spec.backup}${pct}; attach it when the restore has completed`;
  }
  return null;
}

/** Tags: up to 32 distinct names, sorted. */
function checkTags(value: unknown, field: string): string[] {
  if (!Array.isArray(value) || value.length > 32 || value.some((t) => typeof t !== 'string' || !TAG.test(t))) {
    throw invalid(`${field} must be a list of up to 32 tags, each 1-63 characters of [A-Za-z0-9._-] starting with a letter or digit, got ${JSON.stringify(value)}`, field);
  }
  return [...new Set(value as string[])].sort();
}

const TAG = /^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$/;

function checkDataLocality(value: unknown): DataLocality {
  if (value !== 'disabled' && value !== 'best-effort') throw invalid(`dataLocality must be "disabled" or "best-effort", got ${JSON.stringify(value)}`, 'dataLocality');
  return value;
}

export class ManagerServiceImpl implements ManagerService {
  private readonly objects: Objects;
  private readonly settings: Settings;
  private readonly events: EventRecorder;
  private readonly agents: NodeAgents;
  private readonly defaultNodeId: string;
  private readonly kick: (volume: string) => void;
  private readonly backupKick: () => void;

  constructor(options: ManagerServiceOptions) {
    this.objects = options.objects;
    this.settings = options.settings;
    this.events = options.events;
    this.agents = options.agents;
    this.defaultNodeId = options.defaultNodeId;
    this.kick = options.kick ?? (() => {});
    this.backupKick = options.backupKick ?? (() => {});
  }

  // ---- views -----------------------------------------------------------------------------------

  private async volumeReplicas(name: string): Promise<StoreObject<ReplicaValue>[]> {
    return (await this.objects.list(Kind.Replica)).filter((r) => r.value.spec.volumeName === name);
  }

  private volumeView(volume: StoreObject<VolumeValue>, engine: StoreObject<EngineValue> | null, replicas: StoreObject<ReplicaValue>[], protection: VolumeProtection): VolumeView {
    const v = volume.value;
    const held = v.spec.jobAttachment ?? null;
    const moving = v.spec.moveAttachment ?? null;
    const pending = v.spec.pendingAttach ?? null;
    const summaries: VolumeReplicaSummary[] = replicas
      .filter((r) => r.value.deletionRequestedAt === null)
      .map((r) => {
        const said = engine !== null && r.name in engine.value.spec.replicas ? engine.value.status.replicas[r.name] : undefined;
        const rebuild = rebuildOf(said, r);
        return {
          name: r.name,
          nodeId: r.value.spec.nodeId,
          diskId: r.value.spec.diskId,
          mode: said?.mode ?? null,
          state: r.value.status.state,
          rebuildProgress: rebuild != null ? (rebuild.totalBytes > 0 ? Math.min(1, rebuild.copiedBytes / rebuild.totalBytes) : 0) : null,
          failedAt: r.value.spec.failedAt,
        };
      });
    return {
      name: volume.name,
      sizeBytes: v.spec.sizeBytes,
      currentSizeBytes: engine !== null && engine.value.status.state === 'running' && v.status.state === 'attached' ? engine.value.status.sizeBytes : null,
      numberOfReplicas: v.spec.numberOfReplicas,
      state: v.status.state,
      robustness: restoreRobustness(v),
      nodeId: v.spec.nodeId ?? v.status.currentNodeId,
      dataLocality: v.spec.dataLocality ?? 'disabled',
      nodeSelector: v.spec.nodeSelector ?? [],
      diskSelector: v.spec.diskSelector ?? [],
      frontend: !v.spec.maintenance,
      endpoint: v.status.state === 'attached' ? v.status.endpoint : null,
      epoch: v.status.epoch,
      replicas: summaries,
      rebuilding: summaries.some((s) => s.mode === 'WO'),
      rebuildLeases: leaseCounters(engine?.value.status.state === 'running' ? engine.value.status.stats : null),
      message: pending !== null && held !== null
        ? `attach to node ${pending.nodeId} (asked at ${pending.requestedAt}) waits for recurring job ${held.job} (${held.task}) to finish`
        : pending !== null && moving !== null ? `attach to node ${pending.nodeId} (asked at ${pending.requestedAt}) waits for the volume to be detached from its replica moves`
          : held !== null && v.status.message === null ? `attached by recurring job ${held.job} (${held.task}) without an NBD export; detached when it is done`
            : moving !== null ? `attached by the manager without an NBD export to move replica(s) ${moving.why}; detached when they have moved${v.status.message !== null ? `; ${v.status.message}` : ''}` : v.status.message,
      createdAt: v.createdAt,
      lastRecovery: v.status.lastRecovery ?? null,
      lastVerify: v.status.lastVerify ?? null,
      engineLink: v.status.state === 'attached' && !v.spec.maintenance ? engine?.value.status.frontendLink ?? null : null,
      restore: restoreView(v),
      backingImage: v.spec.backingImage ?? null,
      heldByJob: held === null ? null : { job: held.job, task: held.task, node: held.node, since: held.startedAt },
      pendingAttach: pending,
      ...protection,
    };
  }

  private async mustVolume(name: string): Promise<StoreObject<VolumeValue>> {
    validateVolumeName(name);
    const volume = await this.objects.get(Kind.Volume, name);
    if (volume === null) throw new ZebuError(ErrorCode.NOT_FOUND, `volume ${name} not found`);
    return volume;
  }

  private async view(name: string): Promise<VolumeView> {
    const volume = await this.mustVolume(name);
    const [engine, replicas, backups, jobs] = await Promise.all([
      this.objects.get(Kind.Engine, name), this.volumeReplicas(name), this.objects.list(Kind.Backup), this.objects.list(Kind.RecurringJob),
    ]);
    return this.volumeView(volume, engine, replicas, volumeProtection(name, volume.value, backups, jobs, new Date()));
  }

  // ---- volumes ---------------------------------------------------------------------------------

  /**
   * The backing image a new volume goes on: it must exist, not be being deleted, and have a ready
   * file (its checksum fixed); the size defaults to the image's (up to a whole 4 KiB block) and
   * may not be smaller.
   */
  private async imageForVolume(name: unknown, askedSize: unknown): Promise<{ image: { name: string; checksum: string; rules: ImageRules }; sizeBytes: number }> {
    const imageName = checkBackingImageName(name, 'backingImage');
    const obj = await this.objects.get(Kind.BackingImage, imageName);
    if (obj === null) throw new ZebuError(ErrorCode.NOT_FOUND, `backing image ${imageName} not found`);
    if (obj.value.deletionRequestedAt !== null) throw stateConflict(`backing image ${imageName} is being deleted`);
    const files = Object.values(obj.value.status.files);
    const checksum = obj.value.status.checksum;
    if (checksum === null || !files.some((f) => f.state === 'ready')) {
      throw stateConflict(`backing image ${imageName} has no ready file yet${obj.value.status.message !== null ? ` (${obj.value.status.message})` : ''}; wait until zebu backing-image get ${imageName} shows one`);
    }
    const imageBytes = obj.value.status.sizeBytes;
    const minimum = Math.max(MIN_VOLUME_BYTES, Math.ceil(imageBytes / 4096) * 4096);
    const sizeBytes = askedSize === undefined ? minimum : validateSize(askedSize);
    if (sizeBytes < imageBytes) throw invalid(`backing image ${imageName} is ${imageBytes} bytes; the volume must be at least that (asked ${sizeBytes})`, 'sizeBytes');
    return { image: { name: imageName, checksum, rules: imagePlacement(imageName, obj.value.spec, files) }, sizeBytes };
  }

  async createVolume(input: VolumeCreateInput): Promise<VolumeView> {
    const name = validateVolumeName(input.name);
    let restore: RestoreSpec | null = null;
    let sizeBytes: number;
    let image: { name: string; checksum: string; rules: ImageRules } | null = null;
    if (input.backingImage !== undefined && input.fromBackup !== undefined) {
      throw invalid('a backup holds every byte of its volume, those of its backing image too: restore it without backingImage', 'backingImage');
    }
    if (input.standby !== undefined && typeof input.standby !== 'boolean') throw invalid('standby must be true or false', 'standby');
    if (input.fromBackup !== undefined) {
      if (typeof input.fromBackup !== 'string' || !/^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$/.test(input.fromBackup)) throw invalid(`fromBackup must be a backup name, got ${JSON.stringify(input.fromBackup)}`, 'fromBackup');
      const backup = await this.objects.get(Kind.Backup, input.fromBackup);
      if (backup === null) throw new ZebuError(ErrorCode.NOT_FOUND, `backup ${input.fromBackup} not found`);
      if (backup.value.status.state !== 'completed') throw stateConflict(`backup ${input.fromBackup} is ${backup.value.status.state}; only a completed backup can be restored`);
      if (backup.value.spec.deletionRequestedAt !== null) throw stateConflict(`backup ${input.fromBackup} is being deleted`);
      const target = await this.objects.get(Kind.BackupTarget, 'default');
      if (target === null || target.value.spec.url !== backup.value.spec.targetUrl) throw stateConflict(`backup ${input.fromBackup} is on ${backup.value.spec.targetUrl}, which is not the backup target now`);
      const backupSize = backup.value.status.sizeBytes;
      sizeBytes = input.sizeBytes === undefined ? backupSize : validateSize(input.sizeBytes);
      if (sizeBytes < backupSize) throw invalid(`backup ${input.fromBackup} is ${backupSize} bytes; the volume must be at least that (asked ${sizeBytes})`, 'sizeBytes');
      restore = { backup: input.fromBackup, sourceVolume: backup.value.spec.volume, standby: input.standby ?? false, activateRequestedAt: null };
    } else if (input.backingImage !== undefined) {
      if (input.standby === true) throw invalid('a standby volume is created from a backup (fromBackup)', 'standby');
      ({ image, sizeBytes } = await this.imageForVolume(input.backingImage, input.sizeBytes));
    } else {
      if (input.standby === true) throw invalid('a standby volume is created from a backup (fromBackup)', 'standby');
      sizeBytes = validateSize(input.sizeBytes);
    }
    const nodeSelector = checkTags(input.nodeSelector ?? [], 'nodeSelector');
    const diskSelector = checkTags(input.diskSelector ?? [], 'diskSelector');
    const dataLocality = input.dataLocality === undefined ? (await this.settings.string('default-data-locality')) as DataLocality : checkDataLocality(input.dataLocality);
    const count = input.numberOfReplicas ?? (await this.settings.int('default-replica-count'));
    if (!Number.isSafeInteger(count) || count < 1 || count > MAX_REPLICAS) throw invalid(`numberOfReplicas must be between 1 and ${MAX_REPLICAS}, got ${JSON.stringify(count)}`, 'numberOfReplicas');
    if ((await this.objects.get(Kind.Volume, name)) !== null) throw new ZebuError(ErrorCode.EXISTS, `volume ${name} already exists`);
    const view = await clusterView(this.objects);
    const plan = scheduleReplicas(count, {
      sizeBytes,
      existing: [],
      nodes: view.nodes,
      disks: view.disks,
      image: image?.rules,
      selector: { node: nodeSelector, disk: diskSelector },
      policy: {
        softAntiAffinity: await this.settings.bool('replica-soft-anti-affinity'),
        overProvisioningPercentage: await this.settings.int('storage-over-provisioning-percentage'),
        minimalAvailablePercentage: await this.settings.int('storage-minimal-available-percentage'),
      },
    });
    if (plan.placements.length < count) {
      throw invalid(`only ${plan.placements.length} of ${count} replicas can be placed: ${plan.reasons.join('; ')}`, 'numberOfReplicas');
    }
    try {
      await this.objects.create(Kind.Volume, name, {
        spec: { sizeBytes, numberOfReplicas: count, nodeId: null, maintenance: false, restore, backingImage: image === null ? null : { name: image.name, checksum: image.checksum }, dataLocality, nodeSelector, diskSelector },
        status: {
          state: 'creating', robustness: 'unknown', epoch: 0, currentNodeId: null, attachStartedAt: null, endpoint: null, message: null, snapshots: [], restore: null,
        },
        createdAt: new Date().toISOString(),
        deletionRequestedAt: null,
      });
    } catch (err) {
      if ((err as ZebuError).code === ErrorCode.EXISTS) throw new ZebuError(ErrorCode.EXISTS, `volume ${name} already exists`);
      throw err;
    }
    if (restore !== null) {
      await this.events.record({
        type: 'Normal', reason: 'RestoreCreated', kind: Kind.Volume, object: name, volume: name,
        message: `volume ${name} created from backup ${restore.backup} of volume ${restore.sourceVolume}${restore.standby ? ' as a DR standby' : ''}`,
      });
    }
    this.kick(name);
    this.backupKick();
    return this.view(name);
  }

  async listVolumes(): Promise<VolumeView[]> {
    const [volumes, engines, replicas, backups, jobs] = await Promise.all([
      this.objects.list(Kind.Volume), this.objects.list(Kind.Engine), this.objects.list(Kind.Replica), this.objects.list(Kind.Backup), this.objects.list(Kind.RecurringJob),
    ]);
    const engineByName = new Map(engines.map((e) => [e.name, e]));
    const now = new Date();
    return volumes.map((v) => this.volumeView(v, engineByName.get(v.name) ?? null, replicas.filter((r) => r.value.spec.volumeName === v.name), volumeProtection(v.name, v.value, backups, jobs, now)));
  }

  getVolume(name: string): Promise<VolumeView> {
    return this.view(name);
  }

  async attachVolume(name: string, input: VolumeAttachInput): Promise<VolumeView> {
    const volume = await this.mustVolume(name);
    const nodeId = input.nodeId ?? this.defaultNodeId;
    const maintenance = input.maintenance ?? false;
    if ((await this.objects.get(Kind.Node, nodeId)) === null) throw invalid(`node ${nodeId} not found`, 'nodeId');
    const v = volume.value;
    if (v.deletionRequestedAt !== null) throw stateConflict(`volume ${name} is being deleted`);
    const refusal = restoreAttachRefusal(name, v);
    if (refusal !== null) throw stateConflict(refusal);
    if (heldByManager(v) || stillDetaching(v)) return this.attachAfterHolder(name, nodeId, maintenance);
    if (v.spec.nodeId !== null && (v.spec.nodeId !== nodeId || v.spec.maintenance !== maintenance)) {
      if (v.spec.nodeId !== nodeId && (await this.objects.get(Kind.NodeLease, v.spec.nodeId)) === null) return this.attachAwayFromDownNode(name, v.spec.nodeId, nodeId, maintenance);
      throw stateConflict(`volume ${name} is already attached to node ${v.spec.nodeId}${v.spec.maintenance ? ' in maintenance mode' : ''}; detach it first`);
    }

    await this.objects.mutate(Kind.Volume, name, (x) => {
      if (x.spec.nodeId !== null) return false;
      x.spec.nodeId = nodeId;
      x.spec.maintenance = maintenance;
      x.spec.lastWorkloadNodeId = nodeId;
    });
    this.kick(name);
    return this.view(name);
  }

  /**
   * The volume is attached on a node that is down, and asked for on another one (its workload
   * moved there): the attachment moves. The engine on the down node is let go without its answer
   * and fenced by the new attachment's higher epoch, should it still run cut off from the store.
   */
  private async attachAwayFromDownNode(name: string, downNode: string, nodeId: string, maintenance: boolean): Promise<VolumeView> {
    let moved = false;
    await this.objects.mutate(Kind.Volume, name, (x) => {
      if (x.spec.nodeId !== downNode) return false;
      x.spec.nodeId = nodeId;
      x.spec.maintenance = maintenance;
      x.spec.lastWorkloadNodeId = nodeId;
      x.spec.pendingAttach = null;
      // Attaching from now on: nobody waiting for the new attachment takes the old node's endpoint.
      x.status.state = 'attaching';
      x.status.endpoint = null;
      moved = true;
    });
    if (!moved) throw stateConflict(`volume ${name} changed while it was being attached to node ${nodeId}; look at it again and retry`);
    await this.events.record({
      type: 'Warning', reason: 'AttachMoved', kind: Kind.Volume, object: name, volume: name,
      message: `volume ${name} was attached on node ${downNode}, which is down: attaching it on node ${nodeId} instead; the engine on ${downNode} is fenced by the new epoch`,
    });
    this.kick(name);
    return this.view(name);
  }

  /**
   * A workload attach while a recurring job (or replica moves) holds the volume, or while the
   * volume is still detaching (a job or a user let it go a moment ago): recorded, and applied by
   * the volume controller once the volume is detached (a job detaches it when done; moves give it
   * up at once). The caller polls the volume as for any attach.
   */
  private async attachAfterHolder(name: string, nodeId: string, maintenance: boolean): Promise<VolumeView> {
    let clash: string | null = null;
    const after = await this.objects.mutate(Kind.Volume, name, (x) => {
      const pending = x.spec.pendingAttach ?? null;
      if (pending !== null) {
        if (pending.nodeId !== nodeId || pending.maintenance !== maintenance) clash = `an attach of volume ${name} to node ${pending.nodeId}${pending.maintenance ? ' in maintenance mode' : ''} already waits for ${(x.spec.jobAttachment ?? null) !== null ? 'its recurring job' : (x.spec.moveAttachment ?? null) !== null ? 'the manager to detach it from its replica moves' : 'the volume to finish detaching'}`;
        return false;
      }
      if (!heldByManager(x) && !stillDetaching(x)) return false;
      x.spec.pendingAttach = { nodeId, maintenance, requestedAt: new Date().toISOString() };
    });
    if (clash !== null) throw stateConflict(clash);
    const held = after?.value.spec.jobAttachment ?? null;
    const moving = after?.value.spec.moveAttachment ?? null;
    const waitsForDetach = after !== null && (after.value.spec.pendingAttach ?? null) !== null && stillDetaching(after.value);
    if (held === null && moving === null && !waitsForDetach) {
      // It was let go meanwhile: an ordinary attach.
      return this.attachVolume(name, { nodeId, maintenance });
    }
    await this.events.record({
      type: 'Normal', reason: 'AttachWaiting', kind: Kind.Volume, object: name, volume: name,
      message: held !== null
        ? `attach of volume ${name} to node ${nodeId} waits for recurring job ${held.job} (${held.task}), which attached it at ${held.startedAt}`
        : moving !== null
          ? `attach of volume ${name} to node ${nodeId} waits for the volume to be detached from node ${moving.node}, where it was attached for replica moves`
          : `attach of volume ${name} to node ${nodeId} waits for the volume to finish detaching`,
    });
    this.kick(name);
    return this.view(name);
  }

  async detachVolume(name: string): Promise<VolumeView> {
    await this.mustVolume(name);
    await this.objects.mutate(Kind.Volume, name, (x) => {
      // While a job (or replica moves) holds the volume, a detach withdraws a waiting attach; the
      // holder detaches it itself.
      if (heldByManager(x)) {
        if ((x.spec.pendingAttach ?? null) === null) return false;
        x.spec.pendingAttach = null;
        return;
      }
      if (x.spec.nodeId === null) {
        // Still detaching, with an attach waiting for that: the attach is withdrawn.
        if ((x.spec.pendingAttach ?? null) === null) return false;
        x.spec.pendingAttach = null;
        return;
      }
      x.spec.pendingAttach = null;
      x.spec.nodeId = null;
    });
    this.kick(name);
    return this.view(name);
  }

  async deleteVolume(name: string): Promise<VolumeView> {
    const volume = await this.mustVolume(name);
    // A volume attached by its restore (not by a user) may be deleted: the restore stops.
    const byRestore = volume.value.status.restore?.attachedForRestore === true;
    // Likewise one a recurring job attached for its run (the job's task ends in error), or one
    // attached for replica moves.
    const byManager = heldByManager(volume.value);
    if (volume.value.spec.nodeId !== null && !byRestore && !byManager) throw stateConflict(`volume ${name} is attached to node ${volume.value.spec.nodeId}; detach it first`);
    await this.objects.mutate(Kind.Volume, name, (x) => {
      if (x.deletionRequestedAt !== null) return false;
      x.deletionRequestedAt = new Date().toISOString();
      if (byRestore || byManager) {
        x.spec.nodeId = null;
        x.spec.jobAttachment = null;
        x.spec.moveAttachment = null;
        x.spec.pendingAttach = null;
      }
    });
    this.backupKick();
    await this.events.record({ type: 'Normal', reason: 'Deleting', message: `deleting volume ${name}`, kind: Kind.Volume, object: name, volume: name });
    this.kick(name);
    return this.view(name);
  }

  async updateVolume(name: string, input: VolumeUpdateInput): Promise<VolumeView> {
    await this.mustVolume(name);
    if (input === null || typeof input !== 'object' || (input.dataLocality === undefined && input.nodeSelector === undefined && input.diskSelector === undefined)) {
      throw invalid('nothing to change: give dataLocality, nodeSelector or diskSelector', 'dataLocality');
    }
    const dataLocality = input.dataLocality === undefined ? undefined : checkDataLocality(input.dataLocality);
    const nodeSelector = input.nodeSelector === undefined ? undefined : checkTags(input.nodeSelector, 'nodeSelector');
    const diskSelector = input.diskSelector === undefined ? undefined : checkTags(input.diskSelector, 'diskSelector');
    const changes: string[] = [];
    await this.objects.mutate(Kind.Volume, name, (x) => {
      changes.length = 0;
      const was = x.spec.dataLocality ?? 'disabled';
      if (dataLocality !== undefined && was !== dataLocality) {
        changes.push(`data locality ${was} -> ${dataLocality}`);
        x.spec.dataLocality = dataLocality;
      }
      if (nodeSelector !== undefined && (x.spec.nodeSelector ?? []).join(',') !== nodeSelector.join(',')) {
        changes.push(`node selector [${(x.spec.nodeSelector ?? []).join(', ')}] -> [${nodeSelector.join(', ')}]`);
        x.spec.nodeSelector = nodeSelector;
      }
      if (diskSelector !== undefined && (x.spec.diskSelector ?? []).join(',') !== diskSelector.join(',')) {
        changes.push(`disk selector [${(x.spec.diskSelector ?? []).join(', ')}] -> [${diskSelector.join(', ')}]`);
        x.spec.diskSelector = diskSelector;
      }
      if (changes.length === 0) return false;
    });
    if (changes.length > 0) {
      await this.events.record({ type: 'Normal', reason: 'VolumeUpdated', kind: Kind.Volume, object: name, volume: name, message: `volume ${name}: ${changes.join('; ')}` });
    }
    this.kick(name);
    return this.view(name);
  }

  async expandVolume(name: string, sizeBytes: number): Promise<VolumeView> {
    const volume = await this.mustVolume(name);
    validateSize(sizeBytes);
    const v = volume.value;
    if (v.deletionRequestedAt !== null) throw stateConflict(`volume ${name} is being deleted`);
    if (sizeBytes < v.spec.sizeBytes) throw invalid(`a volume cannot shrink: ${name} has ${v.spec.sizeBytes} bytes, asked ${sizeBytes}`, 'sizeBytes');
    if (sizeBytes === v.spec.sizeBytes) return this.view(name);
    // Every disk holding a replica must be able to hold the larger one.
    const cluster = await clusterView(this.objects);
    const policy = {
      softAntiAffinity: true,
      overProvisioningPercentage: await this.settings.int('storage-over-provisioning-percentage'),
      minimalAvailablePercentage: 0,
    };
    for (const r of await this.volumeReplicas(name)) {
      if (r.value.deletionRequestedAt !== null || r.value.spec.failedAt !== null) continue;
      const disk = cluster.disks.find((d) => d.name === r.value.spec.diskId);
      if (disk === undefined) continue;
      const grow = sizeBytes - r.value.spec.sizeBytes;
      const why = diskRefusal({ ...disk, storageScheduledBytes: disk.storageScheduledBytes - r.value.spec.sizeBytes }, cluster.nodes.find((n) => n.name === disk.nodeId), sizeBytes, policy);
      if (why !== null && grow > 0) throw invalid(`cannot grow replica ${r.name}: ${why}`, 'sizeBytes');
    }
    await this.objects.mutate(Kind.Volume, name, (x) => {
      x.spec.sizeBytes = Math.max(x.spec.sizeBytes, sizeBytes);
    });
    await this.events.record({ type: 'Normal', reason: 'Expanding', message: `expanding volume ${name} from ${v.spec.sizeBytes} to ${sizeBytes} bytes`, kind: Kind.Volume, object: name, volume: name });
    this.kick(name);
    return this.view(name);
  }

  async salvageVolume(name: string, input: VolumeSalvageInput): Promise<VolumeView> {
    const volume = await this.mustVolume(name);
    const v = volume.value;
    let chosen: string[] | null = null;
    if (input.replicas !== undefined) {
      if (!Array.isArray(input.replicas) || input.replicas.length === 0 || input.replicas.some((r) => typeof r !== 'string')) {
        throw invalid('replicas must be a non-empty list of replica names', 'replicas');
      }
      const own = new Set((await this.volumeReplicas(name)).filter((r) => r.value.deletionRequestedAt === null).map((r) => r.name));
      const unknown = input.replicas.filter((r) => !own.has(r));
      if (unknown.length > 0) {
        throw invalid(`not replicas of volume ${name}: ${unknown.join(', ')} (its replicas: ${[...own].join(', ') || 'none'})`, 'replicas');
      }
      chosen = [...new Set(input.replicas)];
    }
    if (v.spec.nodeId === null || v.status.robustness !== 'faulted') {
      const why = v.spec.nodeId === null ? 'it is detached (attach it: a faulted volume shows at attach)' : `it is ${v.status.state} and ${v.status.robustness}`;
      throw stateConflict(`volume ${name} is not faulted: ${why}; salvage is for a volume whose replicas are all out`);
    }
    if ((v.spec.salvage ?? null) !== null || (v.status.salvage ?? null) !== null) throw stateConflict(`a salvage of volume ${name} is already under way`);
    await this.objects.mutate(Kind.Volume, name, (x) => {
      x.spec.salvage = { requestedAt: new Date().toISOString(), replicas: chosen, auto: false };
    });
    this.kick(name);
    return this.view(name);
  }

  async activateVolume(name: string): Promise<VolumeView> {
    const volume = await this.mustVolume(name);
    const restore = volume.value.spec.restore ?? null;
    if (restore === null || !restore.standby) throw stateConflict(`volume ${name} is not a DR standby volume; there is nothing to activate`);
    if (volume.value.status.restore?.state === 'error') throw stateConflict(`volume ${name}: its last apply failed (${volume.value.status.restore.message}); it cannot be activated with incomplete data`);
    await this.objects.mutate(Kind.Volume, name, (x) => {
      if (x.spec.restore == null || x.spec.restore.activateRequestedAt !== null) return false;
      x.spec.restore.activateRequestedAt = new Date().toISOString();
    });
    await this.events.record({ type: 'Normal', reason: 'VolumeActivating', message: `activating DR standby volume ${name}: the newest backup of volume ${restore.sourceVolume} is applied first`, kind: Kind.Volume, object: name, volume: name });
    this.backupKick();
    return this.view(name);
  }

  async verifyVolume(name: string, input: VolumeVerifyInput): Promise<VerifyView> {
    if (input.repair !== undefined && typeof input.repair !== 'boolean') throw invalid('repair must be true or false', 'repair');
    const repair = input.repair ?? false;
    const { engine } = await this.runningEngine(name, 'verify');
    const raw = await this.engineRequest(engine, 'POST', '/v1/verify', { repair });
    const report = verifyFromEngine(raw, engine.value.spec.replicas, repair);
    if (report === null) throw new ZebuError(ErrorCode.PROTOCOL, `the engine of volume ${name} answered verify with something else than a report`);
    await this.recordVerify(name, report);
    return report;
  }

  /** Keeps a verify's report in the volume's status, with an event (a warning when regions still differ). */
  async recordVerify(name: string, report: VerifyView): Promise<void> {
    await this.objects.mutate(Kind.Volume, name, (x) => {
      x.status.lastVerify = report;
    });
    const left = unrepairedRegions(report);
    const found = report.differing.length;
    const message = found === 0
      ? `verify of volume ${name}: ${report.regions} region(s) compared, replicas identical (${report.durationMs} ms)`
      : `verify of volume ${name}: ${found} of ${report.regions} region(s) differ (${report.differing.slice(0, 5).map((d) => d.region).join(', ')}${found > 5 ? ', ...' : ''})${report.repair ? `, ${report.repaired} repaired` : ', not repaired'} (${report.durationMs} ms)`;
    await this.events.record({ type: left > 0 ? 'Warning' : 'Normal', reason: 'VerifyDone', message, kind: Kind.Volume, object: name, volume: name });
  }

  // ---- snapshots -------------------------------------------------------------------------------

  /** The running engine of an attached volume, or a 409 explaining why there is none. */
  private async runningEngine(name: string, what: string): Promise<{ volume: StoreObject<VolumeValue>; engine: StoreObject<EngineValue> }> {
    const volume = await this.mustVolume(name);
    const engine = await this.objects.get(Kind.Engine, name);
    if (volume.value.status.state !== 'attached' || engine === null || engine.value.status.state !== 'running') {
      throw stateConflict(`${what} needs volume ${name} attached (it is ${volume.value.status.state})`);
    }
    return { volume, engine };
  }

  private async engineRequest(engine: StoreObject<EngineValue>, method: string, path: string, body?: unknown): Promise<unknown> {
    return this.agents.engineRequest(engine.value.spec.nodeId, engine.name, method, path, body);
  }

  private async refreshSnapshotCache(name: string, engine: StoreObject<EngineValue>): Promise<SnapshotView[]> {
    const list = (await this.engineRequest(engine, 'GET', '/v1/snapshots')) as (SnapshotView & { id?: string })[];
    // The replica names a parent by its layer id; users (and the jobs) know snapshots by name.
    const nameById = new Map(list.filter((s) => s.id !== undefined).map((s) => [s.id!, s.name]));
    const snapshots = list
      .map((s) => ({ name: s.name, createdAt: s.createdAt, parent: s.parent === null ? null : nameById.get(s.parent) ?? null, sizeBytesUsed: s.sizeBytesUsed, inChain: s.inChain }))
      .sort((a, b) => (a.createdAt < b.createdAt ? -1 : a.createdAt > b.createdAt ? 1 : 0));
    await this.objects.mutate(Kind.Volume, name, (x) => {
      x.status.snapshots = snapshots;
    });
    return snapshots;
  }

  async listSnapshots(volume: string): Promise<SnapshotView[]> {
    const v = await this.mustVolume(volume);
    const engine = await this.objects.get(Kind.Engine, volume);
    if (v.value.status.state === 'attached' && engine !== null && engine.value.status.state === 'running') {
      return this.refreshSnapshotCache(volume, engine);
    }
    return v.value.status.snapshots;
  }

  async createSnapshot(volume: string, name?: string): Promise<SnapshotView> {
    const snapshotName = name === undefined ? `snap-${new Date().toISOString().replace(/[-:]/g, '').replace(/\..*$/, '').replace('T', '-')}-${Math.random().toString(16).slice(2, 6)}` : validateSnapshotName(name);
    const { engine } = await this.runningEngine(volume, 'a snapshot');
    await this.engineRequest(engine, 'POST', '/v1/snapshots', { name: snapshotName });
    await this.events.record({ type: 'Normal', reason: 'SnapshotCreated', message: `snapshot ${snapshotName} of volume ${volume} created`, kind: Kind.Volume, object: volume, volume });
    const list = await this.refreshSnapshotCache(volume, engine);
    const created = list.find((s) => s.name === snapshotName);
    if (created === undefined) throw new ZebuError(ErrorCode.EIO, `snapshot ${snapshotName} was created but is not listed`);
    return created;
  }

  async deleteSnapshot(volume: string, snapshot: string): Promise<void> {
    validateSnapshotName(snapshot, 'snapshot');
    const { engine } = await this.runningEngine(volume, 'deleting a snapshot');
    await this.engineRequest(engine, 'DELETE', `/v1/snapshots/${encodeURIComponent(snapshot)}`);
    await this.events.record({ type: 'Normal', reason: 'SnapshotDeleted', message: `snapshot ${snapshot} of volume ${volume} deleted`, kind: Kind.Volume, object: volume, volume });
    await this.refreshSnapshotCache(volume, engine);
  }

  async revertSnapshot(volume: string, snapshot: string): Promise<void> {
    validateSnapshotName(snapshot, 'snapshot');
    const { volume: v, engine } = await this.runningEngine(volume, 'reverting to a snapshot');
    if (!v.value.spec.maintenance) {
      throw stateConflict(`reverting changes the data under a running client: attach volume ${volume} in maintenance mode first (zebu volume detach ${volume}; zebu volume attach ${volume} --maintenance)`);
    }
    await this.engineRequest(engine, 'POST', `/v1/snapshots/${encodeURIComponent(snapshot)}/revert`);
    await this.events.record({ type: 'Normal', reason: 'SnapshotReverted', message: `volume ${volume} reverted to snapshot ${snapshot}`, kind: Kind.Volume, object: volume, volume });
    await this.refreshSnapshotCache(volume, engine);
  }

  // ---- replicas --------------------------------------------------------------------------------

  private replicaView(r: StoreObject<ReplicaValue>, engine: StoreObject<EngineValue> | null, evicting: { disks: Set<string>; nodes: Set<string> }): ReplicaView {
    const said = engine !== null && r.name in engine.value.spec.replicas ? engine.value.status.replicas[r.name] : undefined;
    const rebuild = rebuildOf(said, r);
    const move = r.value.spec.move ?? null;
    const leaving: ReplicaView['leaving'] = r.value.deletionRequestedAt !== null || r.value.spec.failedAt !== null ? null
      : move !== null ? { reason: move.balance !== undefined ? `replica-auto-balance ${move.balance}` : move.locality ?? 'moved by a user', diskId: move.diskId, nodeId: move.nodeId, requestedAt: move.requestedAt }
        : evicting.disks.has(r.value.spec.diskId) ? { reason: `disk ${r.value.spec.diskId} is being evicted`, diskId: null, nodeId: null, requestedAt: null }
          : evicting.nodes.has(r.value.spec.nodeId) ? { reason: `node ${r.value.spec.nodeId} is being evicted`, diskId: null, nodeId: null, requestedAt: null } : null;
    return {
      name: r.name,
      volumeName: r.value.spec.volumeName,
      nodeId: r.value.spec.nodeId,
      diskId: r.value.spec.diskId,
      dataPath: r.value.spec.dataPath,
      sizeBytes: r.value.spec.sizeBytes,
      desireState: r.value.spec.desireState,
      state: r.value.status.state,
      mode: said?.mode ?? null,
      address: r.value.status.address,
      pid: r.value.status.pid,
      restarts: r.value.status.restarts,
      rebuild: rebuild === null ? null : { copiedBytes: rebuild.copiedBytes, totalBytes: rebuild.totalBytes, delta: rebuild.delta === true },
      healthyAt: r.value.spec.healthyAt,
      failedAt: r.value.spec.failedAt,
      message: r.value.status.message,
      leaving,
    };
  }

  /** Disks and nodes being evicted (their replicas are leaving). */
  private async evicting(): Promise<{ disks: Set<string>; nodes: Set<string> }> {
    const [disks, nodes] = await Promise.all([this.objects.list(Kind.Disk), this.objects.list(Kind.Node)]);
    return { disks: new Set(disks.filter((d) => d.value.spec.evict === true).map((d) => d.name)), nodes: new Set(nodes.filter((n) => n.value.spec.evict === true).map((n) => n.name)) };
  }

  /**
   * Moves a replica to another disk (or node, or anywhere else placement allows) with no
   * downtime: a new replica is built while this one serves, then this one is removed (the volume
   * controller does it while the volume is attached, and attaches a detached one for it).
   */
  async moveReplica(name: string, input: ReplicaMoveInput): Promise<ReplicaView> {
    if (typeof input !== 'object' || input === null) throw invalid('the body must be a JSON object {diskId?, nodeId?}');
    for (const key of Object.keys(input)) if (key !== 'diskId' && key !== 'nodeId') throw invalid(`unknown field ${key}: give diskId or nodeId`, key);
    const { diskId, nodeId } = input;
    if (diskId !== undefined && typeof diskId !== 'string') throw invalid('diskId must be a string', 'diskId');
    if (nodeId !== undefined && typeof nodeId !== 'string') throw invalid('nodeId must be a string', 'nodeId');
    if (diskId !== undefined && nodeId !== undefined) throw invalid('give diskId or nodeId, not both', 'diskId');
    const r = await this.objects.must(Kind.Replica, name);
    if (r.value.deletionRequestedAt !== null) throw stateConflict(`replica ${name} is being deleted`);
    if (r.value.spec.failedAt !== null) throw stateConflict(`replica ${name} has failed: it is being replaced already`);
    const volume = await this.mustVolume(r.value.spec.volumeName);
    if (volume.value.deletionRequestedAt !== null) throw stateConflict(`volume ${volume.name} is being deleted`);
    if (diskId !== undefined) {
      const disk = await this.objects.get(Kind.Disk, diskId);
      if (disk === null) throw new ZebuError(ErrorCode.NOT_FOUND, `disk ${diskId} not found`, { field: 'diskId' });
      if (diskId === r.value.spec.diskId) throw invalid(`replica ${name} is on disk ${diskId} already`, 'diskId');
      const sibling = (await this.objects.list(Kind.Replica)).find((x) => x.name !== name && x.value.spec.volumeName === volume.name && x.value.spec.diskId === diskId && x.value.deletionRequestedAt === null);
      if (sibling !== undefined) throw invalid(`disk ${diskId} already holds replica ${sibling.name} of volume ${volume.name}`, 'diskId');
    }
    if (nodeId !== undefined && (await this.objects.get(Kind.Node, nodeId)) === null) throw new ZebuError(ErrorCode.NOT_FOUND, `node ${nodeId} not found`, { field: 'nodeId' });
    const move = { requestedAt: new Date().toISOString(), diskId: diskId ?? null, nodeId: nodeId ?? null };
    await this.objects.mutate(Kind.Replica, name, (x) => {
      x.spec.move = move;
    });
    const to = diskId !== undefined ? `disk ${diskId}` : nodeId !== undefined ? `node ${nodeId}` : 'another disk';
    await this.events.record({ type: 'Normal', reason: 'ReplicaMoveRequested', message: `replica ${name} is to move from disk ${r.value.spec.diskId} to ${to}`, kind: Kind.Replica, object: name, volume: volume.name });
    return this.getReplica(name);
  }

  async listReplicas(filter: { volume?: string } = {}): Promise<ReplicaView[]> {
    if (filter.volume !== undefined) await this.mustVolume(filter.volume);
    const [replicas, engines] = await Promise.all([this.objects.list(Kind.Replica), this.objects.list(Kind.Engine)]);
    const engineByName = new Map(engines.map((e) => [e.name, e]));
    const evicting = await this.evicting();
    return replicas
      .filter((r) => filter.volume === undefined || r.value.spec.volumeName === filter.volume)
      .map((r) => this.replicaView(r, engineByName.get(r.value.spec.volumeName) ?? null, evicting));
  }

  async getReplica(name: string): Promise<ReplicaView> {
    const r = await this.objects.must(Kind.Replica, name);
    return this.replicaView(r, await this.objects.get(Kind.Engine, r.value.spec.volumeName), await this.evicting());
  }

  // ---- nodes and disks -------------------------------------------------------------------------

  async listNodes(): Promise<NodeView[]> {
    const [nodes, leases, disks, replicas, leader] = await Promise.all([
      this.objects.list(Kind.Node), this.objects.list(Kind.NodeLease), this.objects.list(Kind.Disk), this.objects.list(Kind.Replica), this.objects.get(Kind.Leader, LEADER_NAME),
    ]);
    const up = new Set(leases.map((l) => l.name));
    return nodes.map((n) => ({
      name: n.name,
      address: n.value.status.address,
      allowScheduling: n.value.spec.allowScheduling,
      ready: up.has(n.name),
      lastHeartbeatAt: n.value.status.lastHeartbeatAt,
      nbdAddress: n.value.status.nbdAddress,
      disks: disks.filter((d) => d.value.spec.nodeId === n.name).map((d) => d.name),
      evict: n.value.spec.evict === true,
      replicaCount: replicas.filter((r) => r.value.spec.nodeId === n.name && r.value.deletionRequestedAt === null).length,
      leader: leader?.value.nodeId === n.name,
      tags: n.value.spec.tags ?? [],
      agentEndpoint: n.value.status.agentEndpoint ?? null,
    }));
  }

  async getNode(name: string): Promise<NodeView> {
    const node = (await this.listNodes()).find((n) => n.name === name);
    if (node === undefined) throw new ZebuError(ErrorCode.NOT_FOUND, `node ${name} not found`);
    return node;
  }

  async updateNode(name: string, input: NodeUpdateInput): Promise<NodeView> {
    await this.getNode(name);
    if (input.allowScheduling !== undefined && typeof input.allowScheduling !== 'boolean') throw invalid('allowScheduling must be true or false', 'allowScheduling');
    if (input.evict !== undefined && typeof input.evict !== 'boolean') throw invalid('evict must be true or false', 'evict');
    const tags = input.tags === undefined ? undefined : checkTags(input.tags, 'tags');
    const before = await this.objects.must(Kind.Node, name);
    await this.objects.mutate(Kind.Node, name, (n) => {
      if (input.allowScheduling !== undefined) n.spec.allowScheduling = input.allowScheduling;
      if (input.evict !== undefined) n.spec.evict = input.evict;
      if (tags !== undefined) n.spec.tags = tags;
    });
    if (input.evict !== undefined && input.evict !== (before.value.spec.evict === true)) {
      await this.events.record({ type: 'Normal', reason: input.evict ? 'NodeEvicting' : 'NodeEvictionCancelled', message: input.evict ? `node ${name} is being evicted: its replicas move to other nodes` : `node ${name} is no longer evicted`, kind: Kind.Node, object: name, volume: null });
    }
    return this.getNode(name);
  }

  async listDisks(): Promise<DiskView[]> {
    const cluster = await clusterView(this.objects);
    const [disks, replicas] = await Promise.all([this.objects.list(Kind.Disk), this.objects.list(Kind.Replica)]);
    return disks.map((d) => ({
      name: d.name,
      nodeId: d.value.spec.nodeId,
      path: d.value.spec.path,
      allowScheduling: d.value.spec.allowScheduling,
      storageReservedBytes: d.value.spec.storageReservedBytes,
      storageMaximumBytes: d.value.status.storageMaximumBytes,
      storageAvailableBytes: d.value.status.storageAvailableBytes,
      storageScheduledBytes: cluster.disks.find((x) => x.name === d.name)?.storageScheduledBytes ?? 0,
      ready: d.value.status.ready,
      message: d.value.status.message,
      evict: d.value.spec.evict === true,
      tags: d.value.spec.tags ?? [],
      replicaCount: replicas.filter((r) => r.value.spec.diskId === d.name && r.value.deletionRequestedAt === null).length,
    }));
  }

  async getDisk(name: string): Promise<DiskView> {
    const disk = (await this.listDisks()).find((d) => d.name === name);
    if (disk === undefined) throw new ZebuError(ErrorCode.NOT_FOUND, `disk ${name} not found`);
    return disk;
  }

  async updateDisk(name: string, input: DiskUpdateInput): Promise<DiskView> {
    const disk = await this.getDisk(name);
    if (input.allowScheduling !== undefined && typeof input.allowScheduling !== 'boolean') throw invalid('allowScheduling must be true or false', 'allowScheduling');
    if (input.storageReservedBytes !== undefined) {
      const r = input.storageReservedBytes;
      if (!Number.isSafeInteger(r) || r < 0) throw invalid(`storageReservedBytes must be a whole number of bytes >= 0, got ${JSON.stringify(r)}`, 'storageReservedBytes');
      if (disk.storageMaximumBytes > 0 && r > disk.storageMaximumBytes) throw invalid(`storageReservedBytes ${r} exceeds the disk's size ${disk.storageMaximumBytes}`, 'storageReservedBytes');
    }
    if (input.evict !== undefined && typeof input.evict !== 'boolean') throw invalid('evict must be true or false', 'evict');
    const tags = input.tags === undefined ? undefined : checkTags(input.tags, 'tags');
    await this.objects.mutate(Kind.Disk, name, (d) => {
      if (tags !== undefined) d.spec.tags = tags;
      if (input.allowScheduling !== undefined) d.spec.allowScheduling = input.allowScheduling;
      if (input.storageReservedBytes !== undefined) d.spec.storageReservedBytes = input.storageReservedBytes;
      if (input.evict !== undefined) d.spec.evict = input.evict;
    });
    if (input.evict !== undefined && input.evict !== disk.evict) {
      await this.events.record({ type: 'Normal', reason: input.evict ? 'DiskEvicting' : 'DiskEvictionCancelled', message: input.evict ? `disk ${name} is being evicted: its replicas move to other disks` : `disk ${name} is no longer evicted`, kind: Kind.Disk, object: name, volume: null });
    }
    return this.getDisk(name);
  }

  // ---- settings, events, metrics ---------------------------------------------------------------

  listSettings(): Promise<SettingView[]> {
    return this.settings.list();
  }

  getSetting(name: string): Promise<SettingView> {
    return this.settings.get(name);
  }

  async setSetting(name: string, value: string): Promise<SettingView> {
    if (typeof value !== 'string') throw invalid('value must be a string', 'value');
    const before = await this.settings.get(name);
    const after = await this.settings.set(name, value);
    if (before.value !== after.value) {
      await this.events.record({ type: 'Normal', reason: 'SettingChanged', message: `setting ${name}: ${before.value} -> ${after.value}`, kind: Kind.Setting, object: name, volume: null });
    }
    return after;
  }

  listEvents(filter: { volume?: string; limit?: number } = {}): Promise<EventView[]> {
    if (filter.limit !== undefined && (!Number.isSafeInteger(filter.limit) || filter.limit < 1 || filter.limit > 1000)) throw invalid('limit must be between 1 and 1000', 'limit');
    return this.events.list(filter);
  }

  async metrics(): Promise<VolumeMetrics[]> {
    const [volumes, engines, replicas, backups, jobs] = await Promise.all([
      this.objects.list(Kind.Volume), this.objects.list(Kind.Engine), this.objects.list(Kind.Replica), this.objects.list(Kind.Backup), this.objects.list(Kind.RecurringJob),
    ]);
    const engineByName = new Map(engines.map((e) => [e.name, e]));
    const now = new Date();
    const seconds = (iso: string | null): number | null => (iso === null || Number.isNaN(Date.parse(iso)) ? null : Date.parse(iso) / 1000);
    return volumes.map((v) => {
      const protection = volumeProtection(v.name, v.value, backups, jobs, now);
      const engine = engineByName.get(v.name) ?? null;
      const running = engine?.value.status.state === 'running' ? engine.value.status : null;
      const stats = running?.stats ?? null;
      const activeRegions = running?.activeRegions ?? null;
      const maxActiveRegions = running?.maxActiveRegions ?? null;
      const recovery = v.value.status.lastRecovery ?? null;
      const verify = v.value.status.lastVerify ?? null;
      const verifiedAt = verify !== null ? Date.parse(verify.at) : NaN;
      return {
        name: v.name,
        state: v.value.status.state,
        robustness: v.value.status.robustness,
        sizeBytes: v.value.spec.sizeBytes,
        replicas: replicas
          .filter((r) => r.value.spec.volumeName === v.name && r.value.deletionRequestedAt === null)
          .map((r) => ({ name: r.name, mode: engine !== null && r.name in engine.value.spec.replicas ? engine.value.status.replicas[r.name]?.mode ?? null : null })),
        io: stats === null ? null : {
          reads: stats.reads,
          writes: stats.writes,
          readBytes: stats.readBytes,
          writeBytes: stats.writeBytes,
          readLatencySecondsTotal: stats.readLatencyMsTotal / 1000,
          writeLatencySecondsTotal: stats.writeLatencyMsTotal / 1000,
          errors: stats.errors,
          rebuildLeaseRecalls: stats.rebuildLeaseRecalls ?? 0,
          rebuildLeaseRevokes: stats.rebuildLeaseRevokes ?? 0,
          rebuildLeaseReplays: stats.rebuildLeaseReplays ?? 0,
          rebuildCopiersLost: stats.rebuildCopiersLost ?? 0,
          claimWaits: stats.claimWaits ?? 0,
          claimWaitLongestSeconds: (stats.claimWaitLongestMs ?? 0) / 1000,
        },
        intent: activeRegions === null || maxActiveRegions === null ? null : { activeRegions, maxActiveRegions },
        superseded: running === null ? null : running.superseded === true,
        lastRecovery: recovery === null ? null : { regions: recovery.regions, bytes: recovery.bytes, durationSeconds: recovery.durationMs / 1000 },
        lastVerify: verify === null ? null : { differingRegions: verify.differing.length, timestampSeconds: Number.isNaN(verifiedAt) ? 0 : verifiedAt / 1000 },
        engineLink: engine?.value.spec.frontend === true && engine.value.spec.desireState === 'running' ? engine.value.status.frontendLink ?? null : null,
        lastBackupSeconds: seconds(protection.lastBackupAt),
        recoveryPointSeconds: seconds(protection.recoveryPointAt),
      };
    });
  }
}

/** The rebuild lease counters of a running engine's stats (zeros from an engine that does not count them). */
function leaseCounters(stats: EngineIoStats | null | undefined): VolumeView['rebuildLeases'] {
  if (stats == null) return null;
  return {
    grants: stats.rebuildLeaseGrants ?? 0, recalls: stats.rebuildLeaseRecalls ?? 0, revokes: stats.rebuildLeaseRevokes ?? 0, replays: stats.rebuildLeaseReplays ?? 0,
    copiersLost: stats.rebuildCopiersLost ?? 0, writesWaited: stats.claimWaits ?? 0, longestWaitMs: stats.claimWaitLongestMs ?? 0,
  };
}
