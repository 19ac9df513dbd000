/**
 * An in-memory ManagerService for the API and CLI tests. It keeps state and enforces the rules
 * the real service enforces (names, sizes, duplicates, attach before snapshot, maintenance before
 * revert, detach before delete), so create -> list -> get -> delete really behave. Transitions
 * (attaching -> attached, detaching -> detached, deleting -> gone) complete after a few reads,
 * the way the controllers complete them after a few reconcile passes.
 */
import { ZebuError, ErrorCode, invalid } from '../../src/errors.ts';
import type {
  DiskUpdateInput, DiskView, EventView, ManagerService, NodeUpdateInput, NodeView, ReplicaMoveInput, ReplicaView, SettingView, SnapshotView,
  VerifyView, VolumeAttachInput, VolumeCreateInput, VolumeMetrics, VolumeSalvageInput, VolumeUpdateInput, VolumeVerifyInput, VolumeView,
} from '../../src/manager/types.ts';

const VOLUME_NAME = /^[a-z0-9][a-z0-9._-]{0,62}$/;
/** Reads of a volume before a pending transition completes. */
const READS_PER_TRANSITION = 2;

interface FakeVolume {
  view: VolumeView;
  /** Reads left before the pending transition completes; null: none pending. */
  pendingReads: number | null;
  maintenance: boolean;
  snapshots: SnapshotView[];
  io: NonNullable<VolumeMetrics['io']>;
  /** Regions whose replicas differ (what the next verify finds). */
  differing: number[];
  /** What the "engine" reports while attached: its write-intent log and whether it was fenced. */
  engine: { activeRegions: number; maxActiveRegions: number; superseded: boolean };
}

/** Regions of the fake volumes (4 MiB each). */
const REGION_BYTES = 4 * 2 ** 20;

export class FakeManagerService implements ManagerService {
  readonly volumes = new Map<string, FakeVolume>();
  readonly events: EventView[] = [];
  readonly nodes: NodeView[] = [{
    name: 'node-1', address: '127.0.0.1', allowScheduling: true, ready: true, lastHeartbeatAt: '2024-01-01T00:00:00.000Z', nbdAddress: '127.0.0.1:10809',
    disks: ['disk-0', 'disk-1', 'disk-2'], evict: false, replicaCount: 0, leader: true, agentEndpoint: null, tags: [],
  }];
  readonly disks: DiskView[] = [0, 1, 2].map((i) => ({
    name: `disk-${i}`, nodeId: 'node-1', path: `/data/disks/disk-${i}`, allowScheduling: true, storageReservedBytes: 0,
    storageMaximumBytes: 100 * 2 ** 30, storageAvailableBytes: 90 * 2 ** 30, storageScheduledBytes: 0, ready: true, message: null, evict: false, replicaCount: 0, tags: [],
  }));
  readonly settings: SettingView[] = [
    { name: 'default-replica-count', value: '3', default: '3', type: 'int', description: 'Replicas of a new volume when the request does not say.' },
    { name: 'replica-soft-anti-affinity', value: 'true', default: 'true', type: 'bool', description: 'Allow replicas of one volume on one node.' },
  ];
  /** Number of calls per method, to prove a rejected request never reached the service. */
  readonly calls = new Map<string, number>();
  /** When set, every method throws this (a plain Error: an internal failure). */
  explode: Error | null = null;
  /** Not the same as a size: lets tests keep attaches pending. */
  readsPerTransition = READS_PER_TRANSITION;

  private clock = Date.parse('2024-01-01T00:00:00.000Z');

  private enter(method: string): void {
    this.calls.set(method, (this.calls.get(method) ?? 0) + 1);
    if (this.explode !== null) throw this.explode;
  }

  private now(): string {
    this.clock += 1000;
    return new Date(this.clock).toISOString();
  }

  private event(volume: string, reason: string, message: string): void {
    this.events.push({ time: this.now(), type: 'Normal', reason, message, kind: 'Volume', object: volume, volume });
  }

  private must(name: string): FakeVolume {
    if (!VOLUME_NAME.test(name)) throw invalid(`volume name must be 1-63 characters of [a-z0-9._-], got ${JSON.stringify(name)}`, 'name');
    const v = this.volumes.get(name);
    if (v === undefined) throw new ZebuError(ErrorCode.NOT_FOUND, `volume ${name} not found`);
    return v;
  }

  /** A read: moves a pending transition on; returns null once a deleted volume is gone. */
  private read(v: FakeVolume): VolumeView | null {
    if (v.pendingReads !== null) {
      v.pendingReads--;
      if (v.pendingReads <= 0) {
        v.pendingReads = null;
        const view = v.view;
        if (view.state === 'attaching') {
          view.state = 'attached';
          view.currentSizeBytes = view.sizeBytes;
          view.robustness = 'healthy';
          view.endpoint = v.maintenance ? null : `nbd://127.0.0.1:10809/${view.name}`;
          for (const r of view.replicas) {
            r.mode = 'RW';
            r.state = 'running';
          }
          this.event(view.name, 'Attached', `volume ${view.name} attached`);
        } else if (view.state === 'detaching') {
          view.state = 'detached';
          view.currentSizeBytes = null;
          view.nodeId = null;
          view.robustness = 'unknown';
          for (const r of view.replicas) {
            r.mode = null;
            r.state = 'stopped';
          }
          this.event(view.name, 'Detached', `volume ${view.name} detached`);
        } else if (view.state === 'deleting') {
          this.volumes.delete(view.name);
          this.event(view.name, 'Deleted', `volume ${view.name} deleted`);
          return null;
        }
      }
    }
    return structuredClone(v.view);
  }

  private begin(v: FakeVolume): void {
    v.pendingReads = this.readsPerTransition;
  }

  async createVolume(input: VolumeCreateInput): Promise<VolumeView> {
    this.enter('createVolume');
    const { name } = input;
    if (typeof name !== 'string' || !VOLUME_NAME.test(name)) throw invalid(`volume name must be 1-63 characters of [a-z0-9._-], got ${JSON.stringify(name)}`, 'name');
    if (input.fromBackup !== undefined) throw new ZebuError(ErrorCode.NOT_FOUND, `backup ${input.fromBackup} not found`);
    if (input.backingImage !== undefined) throw new ZebuError(ErrorCode.NOT_FOUND, `backing image ${input.backingImage} not found`);
    const sizeBytes = input.sizeBytes as number;
    if (!Number.isSafeInteger(sizeBytes) || sizeBytes % 4096 !== 0) throw invalid(`sizeBytes must be a multiple of 4096, got ${sizeBytes}`, 'sizeBytes');
    const count = input.numberOfReplicas ?? Number(this.settings[0].value);
    if (count > this.disks.length) throw invalid(`only ${this.disks.length} of ${count} replicas can be placed: no more disks`, 'numberOfReplicas');
    if (this.volumes.has(name)) throw new ZebuError(ErrorCode.EXISTS, `volume ${name} already exists`);
    const view: VolumeView = {
      name, sizeBytes, currentSizeBytes: null, numberOfReplicas: count, state: 'detached', robustness: 'unknown', nodeId: null, dataLocality: input.dataLocality ?? 'disabled', nodeSelector: input.nodeSelector ?? [], diskSelector: input.diskSelector ?? [], frontend: true, endpoint: null, epoch: 0,
      replicas: Array.from({ length: count }, (_, i) => ({
        name: `${name}-r-${i}`, nodeId: 'node-1', diskId: `disk-${i}`, mode: null, state: 'stopped' as const, rebuildProgress: null, failedAt: null,
      })),
      rebuilding: false, rebuildLeases: null, message: null, createdAt: this.now(), lastRecovery: null, lastVerify: null, engineLink: null, restore: null, backingImage: null,
      heldByJob: null, pendingAttach: null, lastBackup: null, lastBackupAt: null, recoveryPointAt: null, recoveryPointAgeSeconds: null, recurringJobs: [],
    };
    this.volumes.set(name, {
      view, pendingReads: null, maintenance: false, snapshots: [], differing: [],
      engine: { activeRegions: 0, maxActiveRegions: 256, superseded: false },
      io: { reads: 0, writes: 0, readBytes: 0, writeBytes: 0, readLatencySecondsTotal: 0, writeLatencySecondsTotal: 0, errors: 0, rebuildLeaseRecalls: 0, rebuildLeaseRevokes: 0, rebuildLeaseReplays: 0, rebuildCopiersLost: 0, claimWaits: 0, claimWaitLongestSeconds: 0 },
    });
    this.event(name, 'Created', `volume ${name} created with ${count} replica(s)`);
    return structuredClone(view);
  }

  async listVolumes(): Promise<VolumeView[]> {
    this.enter('listVolumes');
    return [...this.volumes.values()].map((v) => this.read(v)).filter((v) => v !== null);
  }

  async getVolume(name: string): Promise<VolumeView> {
    this.enter('getVolume');
    const view = this.read(this.must(name));
    if (view === null) throw new ZebuError(ErrorCode.NOT_FOUND, `volume ${name} not found`);
    return view;
  }

  async activateVolume(name: string): Promise<VolumeView> {
    this.enter('activateVolume');
    this.must(name);
    throw new ZebuError(ErrorCode.BUSY, `volume ${name} is not a DR standby volume; there is nothing to activate`);
  }

  async attachVolume(name: string, input: VolumeAttachInput): Promise<VolumeView> {
    this.enter('attachVolume');
    const v = this.must(name);
    const nodeId = input.nodeId ?? 'node-1';
    if (!this.nodes.some((n) => n.name === nodeId)) throw invalid(`node ${nodeId} not found`, 'nodeId');
    if (v.view.state === 'deleting') throw new ZebuError(ErrorCode.BUSY, `volume ${name} is being deleted`);
    if (v.view.state === 'attached' || v.view.state === 'attaching') {
      if (v.maintenance !== (input.maintenance ?? false)) throw new ZebuError(ErrorCode.BUSY, `volume ${name} is already attached; detach it first`);
      return structuredClone(v.view);
    }
    if (v.view.state === 'detaching') throw new ZebuError(ErrorCode.BUSY, `volume ${name} is still detaching`);
    v.maintenance = input.maintenance ?? false;
    v.view.state = 'attaching';
    v.view.nodeId = nodeId;
    v.view.frontend = !v.maintenance;
    v.view.epoch++;
    this.begin(v);
    return structuredClone(v.view);
  }

  async detachVolume(name: string): Promise<VolumeView> {
    this.enter('detachVolume');
    const v = this.must(name);
    if (v.view.state === 'attached' || v.view.state === 'attaching') {
      v.view.state = 'detaching';
      v.view.endpoint = null;
      this.begin(v);
    }
    return structuredClone(v.view);
  }

  async deleteVolume(name: string): Promise<VolumeView> {
    this.enter('deleteVolume');
    const v = this.must(name);
    if (v.view.nodeId !== null) throw new ZebuError(ErrorCode.BUSY, `volume ${name} is attached to node ${v.view.nodeId}; detach it first`);
    if (v.view.state !== 'deleting') {
      v.view.state = 'deleting';
      this.begin(v);
    }
    return structuredClone(v.view);
  }

  async expandVolume(name: string, sizeBytes: number): Promise<VolumeView> {
    this.enter('expandVolume');
    const v = this.must(name);
    if (sizeBytes < v.view.sizeBytes) throw invalid(`a volume cannot shrink: ${name} has ${v.view.sizeBytes} bytes, asked ${sizeBytes}`, 'sizeBytes');
    v.view.sizeBytes = sizeBytes;
    if (v.view.state === 'attached') v.view.currentSizeBytes = sizeBytes;
    this.event(name, 'Expanding', `expanding volume ${name} to ${sizeBytes} bytes`);
    return structuredClone(v.view);
  }

  async updateVolume(name: string, input: VolumeUpdateInput): Promise<VolumeView> {
    this.enter('updateVolume');
    const v = this.must(name);
    if (input.dataLocality !== undefined) v.view.dataLocality = input.dataLocality;
    if (input.nodeSelector !== undefined) v.view.nodeSelector = input.nodeSelector;
    if (input.diskSelector !== undefined) v.view.diskSelector = input.diskSelector;
    return structuredClone(v.view);
  }

  async salvageVolume(name: string, input: VolumeSalvageInput): Promise<VolumeView> {
    this.enter('salvageVolume');
    const v = this.must(name);
    const own = v.view.replicas.map((r) => r.name);
    const unknown = (input.replicas ?? []).filter((r) => !own.includes(r));
    if (unknown.length > 0) throw invalid(`not replicas of volume ${name}: ${unknown.join(', ')}`, 'replicas');
    if (v.view.robustness !== 'faulted') throw new ZebuError(ErrorCode.BUSY, `volume ${name} is not faulted: it is ${v.view.state} and ${v.view.robustness}`);
    const chosen = input.replicas ?? own;
    for (const r of v.view.replicas) r.failedAt = chosen.includes(r.name) ? null : r.failedAt ?? this.now();
    v.view.state = 'attaching';
    v.view.epoch++;
    v.view.message = `salvaging from ${chosen.join(', ')}`;
    this.begin(v);
    this.event(name, 'SalvageStarted', `salvaging volume ${name} from replica(s) ${chosen.join(', ')}`);
    return structuredClone(v.view);
  }

  async verifyVolume(name: string, input: VolumeVerifyInput): Promise<VerifyView> {
    this.enter('verifyVolume');
    const v = this.attached(name, 'verify');
    const regions = Math.ceil(v.view.sizeBytes / REGION_BYTES);
    const repair = input.repair ?? false;
    const report: VerifyView = {
      at: this.now(), repair, regions, replicas: v.view.replicas.map((r) => r.name), repaired: repair ? v.differing.length : 0, durationMs: 12,
      differing: v.differing.map((region) => ({
        region, offset: region * REGION_BYTES, length: REGION_BYTES,
        hashes: Object.fromEntries(v.view.replicas.map((r, i) => [r.name, (i === 0 ? 'a' : 'b').repeat(64)])),
      })),
    };
    if (repair) v.differing = [];
    v.view.lastVerify = report;
    this.event(name, 'VerifyDone', `verify of volume ${name}: ${report.differing.length} of ${regions} region(s) differ`);
    return structuredClone(report);
  }

  /** Test hook: every replica of an attached volume goes out (the engine is faulted). */
  fault(volume: string): void {
    const v = this.must(volume);
    v.view.robustness = 'faulted';
    for (const r of v.view.replicas) r.mode = 'ERR';
  }

  /** Test hook: regions the next verify finds differing. */
  setDiffering(volume: string, regions: number[]): void {
    this.must(volume).differing = [...regions];
  }

  async listSnapshots(volume: string): Promise<SnapshotView[]> {
    this.enter('listSnapshots');
    return structuredClone(this.must(volume).snapshots);
  }

  private attached(volume: string, what: string): FakeVolume {
    const v = this.must(volume);
    if (v.view.state !== 'attached') throw new ZebuError(ErrorCode.BUSY, `${what} needs volume ${volume} attached (it is ${v.view.state})`);
    return v;
  }

  async createSnapshot(volume: string, name?: string): Promise<SnapshotView> {
    this.enter('createSnapshot');
    const v = this.attached(volume, 'a snapshot');
    const snapshotName = name ?? `snap-${v.snapshots.length + 1}`;
    if (v.snapshots.some((s) => s.name === snapshotName)) throw new ZebuError(ErrorCode.EXISTS, `snapshot ${snapshotName} already exists`);
    const snapshot: SnapshotView = { name: snapshotName, createdAt: this.now(), parent: v.snapshots.at(-1)?.name ?? null, sizeBytesUsed: 4096, inChain: true };
    v.snapshots.push(snapshot);
    this.event(volume, 'SnapshotCreated', `snapshot ${snapshotName} of volume ${volume} created`);
    return structuredClone(snapshot);
  }

  async deleteSnapshot(volume: string, snapshot: string): Promise<void> {
    this.enter('deleteSnapshot');
    const v = this.attached(volume, 'deleting a snapshot');
    const i = v.snapshots.findIndex((s) => s.name === snapshot);
    if (i < 0) throw new ZebuError(ErrorCode.NOT_FOUND, `snapshot ${snapshot} of volume ${volume} not found`);
    v.snapshots.splice(i, 1);
  }

  async revertSnapshot(volume: string, snapshot: string): Promise<void> {
    this.enter('revertSnapshot');
    const v = this.attached(volume, 'reverting to a snapshot');
    if (!v.maintenance) throw new ZebuError(ErrorCode.BUSY, `attach volume ${volume} in maintenance mode first`);
    if (!v.snapshots.some((s) => s.name === snapshot)) throw new ZebuError(ErrorCode.NOT_FOUND, `snapshot ${snapshot} of volume ${volume} not found`);
  }

  private replicaViews(): ReplicaView[] {
    return [...this.volumes.values()].flatMap((v) => v.view.replicas.map((r, i) => ({
      name: r.name, volumeName: v.view.name, nodeId: r.nodeId, diskId: r.diskId, dataPath: `/data/disks/${r.diskId}/replicas/${r.name}`,
      sizeBytes: v.view.sizeBytes, desireState: r.state === 'running' ? 'running' as const : 'stopped' as const, state: r.state, mode: r.mode,
      address: r.state === 'running' ? `127.0.0.1:${20000 + i}` : null, pid: r.state === 'running' ? 1000 + i : null, restarts: 0,
      rebuild: null, healthyAt: v.view.createdAt, failedAt: r.failedAt, message: null, leaving: null,
    })));
  }

  async listReplicas(filter: { volume?: string } = {}): Promise<ReplicaView[]> {
    this.enter('listReplicas');
    if (filter.volume !== undefined) this.must(filter.volume);
    return this.replicaViews().filter((r) => filter.volume === undefined || r.volumeName === filter.volume);
  }

  async getReplica(name: string): Promise<ReplicaView> {
    this.enter('getReplica');
    const r = this.replicaViews().find((x) => x.name === name);
    if (r === undefined) throw new ZebuError(ErrorCode.NOT_FOUND, `replica ${name} not found`);
    return r;
  }

  async moveReplica(name: string, input: ReplicaMoveInput): Promise<ReplicaView> {
    this.enter('moveReplica');
    const r = await this.getReplica(name);
    if (input.diskId !== undefined && !this.disks.some((d) => d.name === input.diskId)) throw new ZebuError(ErrorCode.NOT_FOUND, `disk ${input.diskId} not found`);
    return { ...r, leaving: { reason: 'moved by a user', diskId: input.diskId ?? null, nodeId: input.nodeId ?? null, requestedAt: this.now() } };
  }

  async listNodes(): Promise<NodeView[]> {
    this.enter('listNodes');
    return structuredClone(this.nodes);
  }

  async getNode(name: string): Promise<NodeView> {
    this.enter('getNode');
    const node = this.nodes.find((n) => n.name === name);
    if (node === undefined) throw new ZebuError(ErrorCode.NOT_FOUND, `node ${name} not found`);
    return structuredClone(node);
  }

  async updateNode(name: string, input: NodeUpdateInput): Promise<NodeView> {
    this.enter('updateNode');
    const node = this.nodes.find((n) => n.name === name);
    if (node === undefined) throw new ZebuError(ErrorCode.NOT_FOUND, `node ${name} not found`);
    if (input.allowScheduling !== undefined) node.allowScheduling = input.allowScheduling;
    if (input.evict !== undefined) node.evict = input.evict;
    if (input.tags !== undefined) node.tags = [...new Set(input.tags)].sort();
    return structuredClone(node);
  }

  async listDisks(): Promise<DiskView[]> {
    this.enter('listDisks');
    return structuredClone(this.disks);
  }

  async getDisk(name: string): Promise<DiskView> {
    this.enter('getDisk');
    const disk = this.disks.find((d) => d.name === name);
    if (disk === undefined) throw new ZebuError(ErrorCode.NOT_FOUND, `disk ${name} not found`);
    return structuredClone(disk);
  }

  async updateDisk(name: string, input: DiskUpdateInput): Promise<DiskView> {
    this.enter('updateDisk');
    const disk = this.disks.find((d) => d.name === name);
    if (disk === undefined) throw new ZebuError(ErrorCode.NOT_FOUND, `disk ${name} not found`);
    if (input.storageReservedBytes !== undefined && input.storageReservedBytes > disk.storageMaximumBytes) {
      throw invalid(`storageReservedBytes ${input.storageReservedBytes} exceeds the disk's size ${disk.storageMaximumBytes}`, 'storageReservedBytes');
    }
    if (input.allowScheduling !== undefined) disk.allowScheduling = input.allowScheduling;
    if (input.storageReservedBytes !== undefined) disk.storageReservedBytes = input.storageReservedBytes;
    if (input.evict !== undefined) disk.evict = input.evict;
    if (input.tags !== undefined) disk.tags = [...new Set(input.tags)].sort();
    return structuredClone(disk);
  }

  async listSettings(): Promise<SettingView[]> {
    this.enter('listSettings');
    return structuredClone(this.settings);
  }

  async getSetting(name: string): Promise<SettingView> {
    this.enter('getSetting');
    const s = this.settings.find((x) => x.name === name);
    if (s === undefined) throw new ZebuError(ErrorCode.NOT_FOUND, `setting ${name} not found`);
    return structuredClone(s);
  }

  async setSetting(name: string, value: string): Promise<SettingView> {
    this.enter('setSetting');
    const s = this.settings.find((x) => x.name === name);
    if (s === undefined) throw new ZebuError(ErrorCode.NOT_FOUND, `setting ${name} not found`);
    if (s.type === 'int' && (!/^\d+$/.test(value) || Number(value) < 1 || Number(value) > 20)) throw invalid(`setting ${name} must be between 1 and 20, got ${JSON.stringify(value)}`, 'value');
    if (s.type === 'bool' && value !== 'true' && value !== 'false') throw invalid(`setting ${name} must be true or false, got ${JSON.stringify(value)}`, 'value');
    s.value = value;
    return structuredClone(s);
  }

  async listEvents(filter: { volume?: string; limit?: number } = {}): Promise<EventView[]> {
    this.enter('listEvents');
    if (filter.limit !== undefined && (!Number.isSafeInteger(filter.limit) || filter.limit < 1 || filter.limit > 1000)) throw invalid('limit must be between 1 and 1000', 'limit');
    const list = this.events.filter((e) => filter.volume === undefined || e.volume === filter.volume).reverse();
    return structuredClone(list.slice(0, filter.limit ?? 100));
  }

  async metrics(): Promise<VolumeMetrics[]> {
    this.enter('metrics');
    return [...this.volumes.values()].map((v) => ({
      name: v.view.name,
      state: v.view.state,
      robustness: v.view.robustness,
      sizeBytes: v.view.sizeBytes,
      replicas: v.view.replicas.map((r) => ({ name: r.name, mode: r.mode })),
      io: v.view.state === 'attached' ? { ...v.io } : null,
      intent: v.view.state === 'attached' ? { activeRegions: v.engine.activeRegions, maxActiveRegions: v.engine.maxActiveRegions } : null,
      superseded: v.view.state === 'attached' ? v.engine.superseded : null,
      lastRecovery: v.view.lastRecovery === null ? null : { regions: v.view.lastRecovery.regions, bytes: v.view.lastRecovery.bytes, durationSeconds: v.view.lastRecovery.durationMs / 1000 },
      lastVerify: v.view.lastVerify === null ? null : { differingRegions: v.view.lastVerify.differing.length, timestampSeconds: Date.parse(v.view.lastVerify.at) / 1000 },
      engineLink: v.view.engineLink,
      lastBackupSeconds: v.view.lastBackupAt === null ? null : Date.parse(v.view.lastBackupAt) / 1000,
      recoveryPointSeconds: v.view.recoveryPointAt === null ? null : Date.parse(v.view.recoveryPointAt) / 1000,
    }));
  }

  /** Test hook: what the "engine" reports of its write-intent log and fencing. */
  setEngine(volume: string, engine: Partial<FakeVolume['engine']>): void {
    Object.assign(this.must(volume).engine, engine);
  }

  /** Test hook: the "engine's" last start-up recovery. */
  setLastRecovery(volume: string, recovery: NonNullable<VolumeView['lastRecovery']>): void {
    this.must(volume).view.lastRecovery = structuredClone(recovery);
  }

  /** Test hook: the NBD frontend's link to the "engine". */
  setEngineLink(volume: string, link: VolumeView['engineLink']): void {
    this.must(volume).view.engineLink = structuredClone(link);
  }

  /** Test hook: I/O figures the "engine" reports. */
  setIo(volume: string, io: Partial<NonNullable<VolumeMetrics['io']>>): void {
    Object.assign(this.must(volume).io, io);
  }
}
