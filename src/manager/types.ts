/**
 * What the manager offers its clients (REST API, CLI, web UI): the views it returns and the
 * operations it performs. The API layer (src/api) maps HTTP onto `ManagerService`; the service
 * (service.ts) maps these onto objects in the store and the controllers do the rest.
 *
 * Errors are ZebuErrors: EINVAL with `field` naming the bad input (HTTP 400), NOT_FOUND (404),
 * EXISTS / CONFLICT / BUSY (409: the request clashes with the current state; nothing changed).
 * Sizes are whole bytes (numbers: 16 TiB fits a JavaScript number exactly).
 */
import type { VolumeJobView } from './protection.ts';
import type { DataLocality, VolumeState, VolumeRobustness, ReplicaModeName, ProcessState, EngineLinkView, RecoveryView, VerifyDifference, VerifyView, SnapshotView, SettingView } from '../cluster/object-types.ts';
export type { VolumeState, VolumeRobustness, ReplicaModeName, ProcessState, EngineLinkView, RecoveryView, VerifyDifference, VerifyView, SnapshotView, SettingView };

export interface VolumeReplicaSummary {
  name: string;
  nodeId: string;
  diskId: string;
  /** The engine's view while attached; null while detached. */
  mode: ReplicaModeName | null;
  state: ProcessState;
  /** 0..1 while this replica is being rebuilt, else null. */
  rebuildProgress: number | null;
  failedAt: string | null;
}

export interface VolumeView {
  name: string;
  sizeBytes: number;
  /** The size the engine serves while attached (below sizeBytes while an expansion is under way); null otherwise. */
  currentSizeBytes: number | null;
  numberOfReplicas: number;
  state: VolumeState;
  robustness: VolumeRobustness;
  /** Node the volume is attached to (or attaching to); null when detached. */
  nodeId: string | null;
  /** best-effort: a replica is kept on the node the volume is attached on. */
  dataLocality: DataLocality;
  /** Tags the nodes and disks of its replicas carry. */
  nodeSelector: string[];
  diskSelector: string[];
  /** false: attached without an NBD export (maintenance: revert, jobs). */
  frontend: boolean;
  /** nbd://HOST:PORT/NAME while attached with a frontend. */
  endpoint: string | null;
  /** Epoch of the current (or last) attachment; grows at every attach. */
  epoch: number;
  replicas: VolumeReplicaSummary[];
  /** Whether a replica is being rebuilt. */
  rebuilding: boolean;
  /**
   * The running engine's rebuild region leases: recalled by client writes, revoked after
   * rebuild-lease-recall-timeout-ms, regions copied again after a revoke; client writes that
   * waited for a lease (or a verify's claim) on their range, and the longest wait. Null while
   * detached.
   */
  rebuildLeases: { grants: number; recalls: number; revokes: number; replays: number; copiersLost: number; writesWaited: number; longestWaitMs: number } | null;
  /** Why the volume is in its state, when it is not the obvious one. */
  message: string | null;
  createdAt: string;
  /** The engine's last start-up recovery; null before the first. */
  lastRecovery: RecoveryView | null;
  /** The last verify (scrub) of the replicas; null before the first. */
  lastVerify: VerifyView | null;
  /** The NBD frontend's link to the engine (while attached with a frontend); null otherwise. */
  engineLink: EngineLinkView | null;
  /** Created from a backup: the restore's progress; for a DR standby, the backups it applies. Null otherwise. */
  restore: VolumeRestoreView | null;
  /** The backing image every replica reads as its base layer, with its SHA-512; null when none. */
  backingImage: { name: string; checksum: string } | null;
  /** A recurring job that attached the (detached) volume for its run, without an NBD export; null otherwise. */
  heldByJob: { job: string; task: string; node: string; since: string } | null;
  /** A workload attach waiting for that job to finish; null otherwise. */
  pendingAttach: { nodeId: string; maintenance: boolean; requestedAt: string } | null;
  /** The newest completed backup and when it completed; null when there is none. */
  lastBackup: string | null;
  lastBackupAt: string | null;
  /** The newest moment whose data a backup holds (a backup job that found nothing changed moves it on). */
  recoveryPointAt: string | null;
  recoveryPointAgeSeconds: number | null;
  /** The recurring jobs the volume joins (by name or group), their next run and last result for it. */
  recurringJobs: VolumeJobView[];
}

export interface VolumeRestoreView {
  /** The backup being applied or last applied. */
  backup: string;
  sourceVolume: string;
  standby: boolean;
  state: 'pending' | 'in-progress' | 'completed' | 'error';
  /** The backup the volume's data equals; null until the first apply completed. */
  applied: string | null;
  /** 0..1 of the apply under way (1 when completed). */
  progress: number;
  doneBytes: number;
  totalBytes: number;
  bytesPerSecond: number;
  message: string | null;
  completedAt: string | null;
}

export interface VolumeSalvageInput {
  /** Replicas to bring back; absent: every replica of the volume not being deleted. */
  replicas?: string[];
}

export interface VolumeVerifyInput {
  /** Copy differing regions from the source replica into the others. */
  repair?: boolean;
}

export interface VolumeCreateInput {
  name: string;
  /** Required unless fromBackup (then at least the backup's size; absent: the backup's size). */
  sizeBytes?: number;
  /** Restore this backup into the new volume. */
  fromBackup?: string;
  /** With fromBackup: a DR standby that keeps applying newer backups of the same volume. */
  standby?: boolean;
  /** Absent: the `default-replica-count` setting. */
  numberOfReplicas?: number;
  /** Create the volume on this backing image (sizeBytes then defaults to the image's size). */
  backingImage?: string;
  /** Absent: the `default-data-locality` setting. */
  dataLocality?: DataLocality;
  /** Tags the nodes and disks of its replicas must carry (every one). */
  nodeSelector?: string[];
  diskSelector?: string[];
}

export interface VolumeUpdateInput {
  dataLocality?: DataLocality;
  /** New replicas go only where these tags are (those in place stay). */
  nodeSelector?: string[];
  diskSelector?: string[];
}

export interface VolumeAttachInput {
  /** Absent: the manager's own node (`zebu up`: the only node). */
  nodeId?: string;
  /** Attach without an NBD export (needed for snapshot revert). */
  maintenance?: boolean;
}

export interface ReplicaView {
  name: string;
  volumeName: string;
  nodeId: string;
  diskId: string;
  /** The replica's directory on its node. */
  dataPath: string;
  sizeBytes: number;
  desireState: 'running' | 'stopped';
  state: ProcessState;
  mode: ReplicaModeName | null;
  /** HOST:PORT of the running replica process. */
  address: string | null;
  pid: number | null;
  restarts: number;
  /** Its rebuild under way: delta when only the regions it missed are copied. */
  rebuild: { copiedBytes: number; totalBytes: number; delta: boolean } | null;
  healthyAt: string | null;
  failedAt: string | null;
  message: string | null;
  /**
   * The replica is to leave its disk: moved by a user (to `diskId` or `nodeId` when given), or its
   * disk or node is being evicted. A new replica is built first; this one is removed after.
   */
  leaving: { reason: string; diskId: string | null; nodeId: string | null; requestedAt: string | null } | null;
}

/** `POST /v1/replicas/{name}/move`: where to (neither: anywhere else placement allows). */
export interface ReplicaMoveInput {
  diskId?: string;
  nodeId?: string;
}

export interface NodeView {
  name: string;
  address: string;
  allowScheduling: boolean;
  ready: boolean;
  lastHeartbeatAt: string | null;
  /** NBD endpoint of the node's frontend, HOST:PORT. */
  nbdAddress: string | null;
  disks: string[];
  /** Its replicas are leaving it (each is rebuilt elsewhere first); it takes no new one. */
  evict: boolean;
  /** Replicas on the node now (not being deleted): 0 once an eviction is done. */
  replicaCount: number;
  /** Its manager runs the cluster's controllers and serves the API now. */
  leader: boolean;
  tags: string[];
  /** Where the leader reaches its agent (HOST:PORT) on a cluster store; null on one machine. */
  agentEndpoint: string | null;
}

export interface NodeUpdateInput {
  allowScheduling?: boolean;
  evict?: boolean;
  /** Replaces the node's tags. */
  tags?: string[];
}

export interface DiskView {
  name: string;
  nodeId: string;
  path: string;
  allowScheduling: boolean;
  storageReservedBytes: number;
  storageMaximumBytes: number;
  storageAvailableBytes: number;
  /** Sum of the sizes of the replicas placed on this disk. */
  storageScheduledBytes: number;
  ready: boolean;
  message: string | null;
  /** Its replicas are leaving it (each is rebuilt elsewhere first); it takes no new one. */
  evict: boolean;
  tags: string[];
  /** Replicas on the disk now (not being deleted): 0 once an eviction is done. */
  replicaCount: number;
}

export interface DiskUpdateInput {
  allowScheduling?: boolean;
  storageReservedBytes?: number;
  evict?: boolean;
  /** Replaces the disk's tags. */
  tags?: string[];
}

export interface EventView {
  time: string;
  type: 'Normal' | 'Warning';
  reason: string;
  message: string;
  /** The object the event is about. */
  kind: string;
  object: string;
  /** The volume it concerns, when it concerns one. */
  volume: string | null;
}

/** Per-volume figures for /metrics; counters since the engine started. */
export interface VolumeMetrics {
  name: string;
  state: VolumeState;
  robustness: VolumeRobustness;
  sizeBytes: number;
  replicas: { name: string; mode: ReplicaModeName | null }[];
  /** Null while detached. */
  io: {
    reads: number;
    writes: number;
    readBytes: number;
    writeBytes: number;
    readLatencySecondsTotal: number;
    writeLatencySecondsTotal: number;
    errors: number;
    /** Rebuild region leases recalled by client writes, revoked past the recall timeout, and regions replayed after a revoke. */
    rebuildLeaseRecalls: number;
    rebuildLeaseRevokes: number;
    rebuildLeaseReplays: number;
    rebuildCopiersLost: number;
    /** Client writes that waited for a rebuild's lease or a verify's claim on their range; the longest wait. */
    claimWaits: number;
    claimWaitLongestSeconds: number;
  } | null;
  /** The running engine's write-intent log: regions active now and its bound; null while detached (or not reported). */
  intent: { activeRegions: number; maxActiveRegions: number } | null;
  /** Whether the running engine was fenced by a newer epoch (it serves nothing); null while detached. */
  superseded: boolean | null;
  /** The engine's last start-up recovery; null before the first. */
  lastRecovery: { regions: number; bytes: number; durationSeconds: number } | null;
  /** The last verify; null before the first. */
  lastVerify: { differingRegions: number; timestampSeconds: number } | null;
  /** The NBD frontend's link to the engine; null when there is none. */
  engineLink: EngineLinkView | null;
  /** When the newest completed backup completed, and the recovery point (seconds since the epoch); null: none. */
  lastBackupSeconds: number | null;
  recoveryPointSeconds: number | null;
}

export interface ManagerService {
  createVolume(input: VolumeCreateInput): Promise<VolumeView>;
  listVolumes(): Promise<VolumeView[]>;
  getVolume(name: string): Promise<VolumeView>;
  /** Asks for the attachment and returns at once (state attaching); poll getVolume. */
  attachVolume(name: string, input: VolumeAttachInput): Promise<VolumeView>;
  detachVolume(name: string): Promise<VolumeView>;
  /** Marks the volume deleting and returns; the volume disappears once its replicas are gone. */
  deleteVolume(name: string): Promise<VolumeView>;
  /** Grows the volume (attached: online; detached: at the next attach). Never shrinks. */
  expandVolume(name: string, sizeBytes: number): Promise<VolumeView>;
  updateVolume(name: string, input: VolumeUpdateInput): Promise<VolumeView>;
  /**
   * Brings a faulted volume back: the chosen replicas are taken out of failure and a new engine
   * (new epoch) starts on them; its start-up rule picks the source. Returns at once.
   */
  salvageVolume(name: string, input: VolumeSalvageInput): Promise<VolumeView>;
  /** A DR standby: apply the newest backup, then end the standby (returns at once; poll). */
  activateVolume(name: string): Promise<VolumeView>;
  /** Compares the replicas of an attached volume (and repairs, when asked); waits for the answer. */
  verifyVolume(name: string, input: VolumeVerifyInput): Promise<VerifyView>;

  listSnapshots(volume: string): Promise<SnapshotView[]>;
  /** Attached volumes only. A name is generated when absent. */
  createSnapshot(volume: string, name?: string): Promise<SnapshotView>;
  deleteSnapshot(volume: string, snapshot: string): Promise<void>;
  /** Volume attached in maintenance mode only. */
  revertSnapshot(volume: string, snapshot: string): Promise<void>;

  listReplicas(filter?: { volume?: string }): Promise<ReplicaView[]>;
  getReplica(name: string): Promise<ReplicaView>;
  moveReplica(name: string, input: ReplicaMoveInput): Promise<ReplicaView>;

  listNodes(): Promise<NodeView[]>;
  getNode(name: string): Promise<NodeView>;
  updateNode(name: string, input: NodeUpdateInput): Promise<NodeView>;

  listDisks(): Promise<DiskView[]>;
  getDisk(name: string): Promise<DiskView>;
  updateDisk(name: string, input: DiskUpdateInput): Promise<DiskView>;

  listSettings(): Promise<SettingView[]>;
  getSetting(name: string): Promise<SettingView>;
  /** The value is validated against the setting's type and range. */
  setSetting(name: string, value: string): Promise<SettingView>;

  /** Newest first. */
  listEvents(filter?: { volume?: string; limit?: number }): Promise<EventView[]>;

  metrics(): Promise<VolumeMetrics[]>;
}
