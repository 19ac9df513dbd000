/**
 * The objects the manager and the agents keep in the store, and typed access to them.
 *
 * Ownership (who writes what), so that controllers never fight:
 * - `spec` is written by the manager (service and controllers): what is wanted.
 * - `status` of Replica, Engine, Node and Disk is written by the agent of the object's node:
 *   what is. The Volume's status is written by the volume controller.
 * Every write is a compare-and-swap on the resourceVersion; `mutate` re-reads and retries.
 */
import path from 'node:path';
import { ZebuError, ErrorCode } from '../errors.ts';
import type { Store, StoreObject } from '../store/store.ts';
import type {
  BackingImageFile, BackingImageSpec, DataLocality, EngineLinkView, ProcessState, RecoveryView, RecurringJobSpec, RecurringTask, RefetchStatus,
  ReplicaModeName, SnapshotView, VerifyView, VolumeRobustness, VolumeState,
} from './object-types.ts';

/** Replica directories live under <disk>/replicas/ (the controller places them, the agent creates and removes them). */
export const REPLICAS_DIR = 'replicas';
/** Where an image's file lives on a disk: `DISK/backing-images/NAME/image.raw`. */
export const BACKING_IMAGES_DIR = 'backing-images';
export function imageFilePath(diskPath: string, image: string): string {
  return path.join(diskPath, BACKING_IMAGES_DIR, image, 'image.raw');
}

export const Kind = {
  Volume: 'Volume',
  Engine: 'Engine',
  Replica: 'Replica',
  Node: 'Node',
  /** Exists while the node's agent keeps its lease alive: the node is up. */
  NodeLease: 'NodeLease',
  Disk: 'Disk',
  Setting: 'Setting',
  Event: 'Event',
  /** The backup target (one, named "default"). */
  BackupTarget: 'BackupTarget',
  /** A backup in the catalog: what the target holds, or a backup asked for and under way. */
  Backup: 'Backup',
  /** Credentials, written by the API and read by the manager only; never returned by the API. */
  Secret: 'Secret',
  /** A scheduled task (snapshot, backup, cleanup) over the volumes that join it by name or group. */
  RecurringJob: 'RecurringJob',
  /** A base image kept as files on disks (docs/backing-images.md). */
  BackingImage: 'BackingImage',
  /** The node whose manager runs the cluster's controllers (one, "manager"), attached to its store lease. */
  Leader: 'Leader',
} as const;
export type Kind = (typeof Kind)[keyof typeof Kind];

export interface VolumeValue {
  spec: {
    sizeBytes: number;
    numberOfReplicas: number;
    /** Where the volume should be attached; null: detached. */
    nodeId: string | null;
    /** Attached without an NBD export. */
    maintenance: boolean;
    /**
     * A salvage asked for (API or auto-salvage) and not yet begun by the controller. Absent in
     * objects written before salvage existed: same as null.
     */
    salvage?: SalvageRequest | null;
    /** Created from a backup (restore), or a DR standby that keeps applying newer backups. */
    restore?: RestoreSpec | null;
    /** Recurring jobs the volume joins by name, and by group; both empty or absent: the group `default`. */
    recurringJobs?: string[];
    recurringJobGroups?: string[];
    /**
     * A recurring job attached this detached volume for its run (frontend disabled): it detaches
     * it when done. While set, no replica is added or moved. Absent: null.
     */
    jobAttachment?: JobAttachment | null;
    /**
     * The manager attached this detached volume (frontend disabled) so that replicas leaving
     * their disk or node can be rebuilt elsewhere: detached again once they have moved, or at
     * once when a workload asks to attach it. Absent: null.
     */
    moveAttachment?: MoveAttachment | null;
    /**
     * The node a workload last attached the volume on (kept after it detaches): a recurring job
     * attaches the detached volume there when it is up. Absent: never attached by a workload.
     */
    lastWorkloadNodeId?: string | null;
    /** A workload attach that arrived while a job (or replica moves) held the volume: applied once it is detached. */
    pendingAttach?: { nodeId: string; maintenance: boolean; requestedAt: string } | null;
    /**
     * The backing image the volume is on (every replica reads its file on its own disk as the
     * base layer), with the image's SHA-512 when the volume was created. Absent: none.
     */
    backingImage?: { name: string; checksum: string } | null;
    /**
     * `best-effort`: keep a replica on the node the volume is attached on (a replica is moved
     * there: built first, then a remote one removed), so that reads stay local. Absent: disabled.
     */
    dataLocality?: DataLocality;
    /** Tags every node, and every disk, holding a replica must carry. Absent: none. */
    nodeSelector?: string[];
    diskSelector?: string[];
  };
  status: {
    state: VolumeState;
    robustness: VolumeRobustness;
    /** Epoch of the current or last attachment. Only grows. */
    epoch: number;
    /** The node of the current attachment; null when detached. */
    currentNodeId: string | null;
    /** When the current attachment was asked for. */
    attachStartedAt: string | null;
    endpoint: string | null;
    message: string | null;
    /** Snapshots as last seen (served while detached). */
    snapshots: SnapshotView[];
    /** The engine's last start-up recovery (replica names, not addresses). */
    lastRecovery?: RecoveryView | null;
    /** The last verify (manual or scheduled scrub). */
    lastVerify?: VerifyView | null;
    /** The frontend's link to the engine as last seen by the controller (to tell what changed). */
    engineLink?: EngineLinkView | null;
    /** The link's re-issued count when the engine was last lost (to say how many one reopening took). */
    engineLinkReissuedBefore?: number;
    /** A salvage under way: the engine of `epoch` is starting on `replicas`. */
    salvage?: { startedAt: string; epoch: number; replicas: string[]; auto: boolean } | null;
    /** The restore (or standby apply) as the backup controller last wrote it. */
    restore?: RestoreStatus | null;
    /**
     * The last time a backup job found the volume's data unchanged since backup `backup` (so the
     * data was covered at `at` without a new backup). Absent: never.
     */
    coveredAt?: { at: string; backup: string } | null;
    /** When a warning said the volume's recovery point is too old (cleared once it is fresh again). */
    recoveryPointWarnedAt?: string | null;
  };
  createdAt: string;
  deletionRequestedAt: string | null;
}

export interface JobAttachment {
  job: string;
  task: RecurringTask;
  node: string;
  startedAt: string;
}

export interface MoveAttachment {
  node: string;
  startedAt: string;
  /** The replicas that were to leave, and why (for the user). */
  why: string;
}

export interface RestoreSpec {
  /** The backup first restored. */
  backup: string;
  /** The volume the backups are of. */
  sourceVolume: string;
  /** Keep applying newer backups of sourceVolume; not attachable until activated. */
  standby: boolean;
  /** `zebu volume activate` asked for: apply the newest backup, then end standby. */
  activateRequestedAt: string | null;
}

export type RestoreState = 'pending' | 'in-progress' | 'completed' | 'error';

/** What a long job (a backup, a restore) reports while it runs and when it ends. */
export interface JobStatus {
  doneBytes: number;
  totalBytes: number;
  bytesPerSecond: number;
  startedAt: string | null;
  completedAt: string | null;
  /** Why it is in error, or what it waits for. */
  message: string | null;
  /** Transient failures retried so far. */
  attempts: number;
}

export interface RestoreStatus extends JobStatus {
  state: RestoreState;
  /** The backup being applied (or last applied). */
  backup: string;
  /** The backup the volume's data equals (null until the first apply completed). */
  applied: string | null;
  /** The volume was attached by the restore (it detaches it again). */
  attachedForRestore: boolean;
  /**
   * Backups whose apply began since the last one completed: the volume may hold some of their
   * blocks, so the next apply writes (or zeroes) those again too. Absent: none.
   */
  begun?: string[];
}

export interface SalvageRequest {
  requestedAt: string;
  /** Replicas to salvage from; null: every replica not being deleted. */
  replicas: string[] | null;
  /** Started by the auto-salvage setting, not by a user. */
  auto: boolean;
}

export interface EngineReplicaStatus {
  /** The address the engine has it at (absent in older objects). */
  address?: string;
  mode: ReplicaModeName;
  reason: string | null;
  /** Delta: only what it missed is copied (absent in older objects: unknown). */
  rebuild: { copiedBytes: number; totalBytes: number; delta?: boolean } | null;
  /** A rebuild of it stopped (or runs) past the point where it can go on as a delta (absent in older objects). */
  resumable?: boolean;
}

export interface EngineIoStats {
  reads: number;
  writes: number;
  readBytes: number;
  writeBytes: number;
  errors: number;
  readLatencyMsTotal: number;
  writeLatencyMsTotal: number;
  /** Rebuild leases: granted to the copy, recalled by client writes, revoked after the recall timeout, chunks replayed (absent from older engines). */
  rebuildLeaseGrants?: number;
  rebuildLeaseRecalls?: number;
  rebuildLeaseRevokes?: number;
  rebuildLeaseReplays?: number;
  /** Copier processes lost while they copied (absent from older engines). */
  rebuildCopiersLost?: number;
  /** Client writes that waited for a rebuild's lease or a verify's claim, and the longest wait in ms (absent from older engines). */
  claimWaits?: number;
  claimWaitLongestMs?: number;
}

/** One per attached volume, named after the volume. */
export interface EngineValue {
  spec: {
    volumeName: string;
    nodeId: string;
    epoch: number;
    sizeBytes: number;
    /** Replica name -> HOST:PORT. */
    replicas: Record<string, string>;
    desireState: 'running' | 'stopped';
    frontend: boolean;
  };
  status: {
    state: ProcessState;
    pid: number | null;
    /** The epoch the running process serves. */
    epoch: number;
    sizeBytes: number;
    endpoint: string | null;
    faulted: boolean;
    faultedReason: string | null;
    /** Replica name -> what the engine says of it. */
    replicas: Record<string, EngineReplicaStatus>;
    rebuilding: boolean;
    stats: EngineIoStats | null;
    restarts: number;
    message: string | null;
    /**
     * The highest epoch any process of this engine was started with. The agent never starts a
     * second process with an epoch already used: when the process is gone (crash, node restart)
     * the controller gives the engine a new epoch first. Absent in older objects: 0.
     */
    startedEpoch?: number;
    /** The running engine's start-up recovery, with replica names. */
    recovery?: RecoveryView | null;
    /** The running engine's last verify, with replica names (when it reports one). */
    lastVerify?: VerifyView | null;
    /** Replicas the agent could not add to the engine in its last pass (name -> why). */
    addErrors?: Record<string, { address: string; code: string; message: string }>;
    /** The running engine's write-intent log: regions active (refreshed with the stats) and its bound. */
    activeRegions?: number | null;
    maxActiveRegions?: number | null;
    /** The running engine was fenced by a newer epoch (FENCED): it serves nothing. */
    superseded?: boolean;
    /**
     * Why the last process of this engine is gone, in the supervisor's words (e.g. "crashed:
     * killed by SIGKILL"); null while one runs or when nothing is known. `message` says the same
     * in a sentence for people; this is the bare cause, for events.
     */
    exitReason?: string | null;
    /** The node's NBD frontend's link to this engine (written by the agent from the frontend). */
    frontendLink?: EngineLinkView | null;
  };
}

export interface ReplicaValue {
  spec: {
    volumeName: string;
    nodeId: string;
    diskId: string;
    /** The replica's directory (absolute, on its node). */
    dataPath: string;
    sizeBytes: number;
    desireState: 'running' | 'stopped';
    /** Set by the manager when an engine first reported it RW. */
    healthyAt: string | null;
    /** Set by the manager when it went ERR (or could not start): it will be replaced. */
    failedAt: string | null;
    /**
     * The volume's backing image: the agent starts the replica on the file at `path` (on the
     * replica's disk) once that file is ready. Absent: none.
     */
    backingImage?: { name: string; path: string } | null;
    /**
     * A user asked this replica to move (`zebu replica move`): a new replica is built (on that
     * disk or node when given), then this one is removed; the volume never has fewer replicas in
     * service than it should. Absent or null: it stays.
     */
    move?: ReplicaMove | null;
  };
  status: {
    state: ProcessState;
    address: string | null;
    pid: number | null;
    restarts: number;
    message: string | null;
  };
  deletionRequestedAt: string | null;
}

/** Where a replica is asked to move to (both null: anywhere else the scheduler allows). */
export interface ReplicaMove {
  requestedAt: string;
  diskId: string | null;
  nodeId: string | null;
  /** Set when the manager asked for it (replica-auto-balance), with why; absent: a user did. */
  balance?: string;
  /** Set when the manager asked for it for the volume's data locality, with why. */
  locality?: string;
}

export interface NodeValue {
  /** `evict`: every replica leaves the node (each rebuilt elsewhere first); nothing new is placed there. Absent: false. */
  spec: { allowScheduling: boolean; evict?: boolean; /** Labels volumes select nodes by (a volume's node selector). Absent: none. */ tags?: string[] };
  status: {
    /** Host the node's replicas and NBD frontend listen on. */
    address: string;
    nbdAddress: string | null;
    /** Where the leader reaches the node's agent for its engines (HOST:PORT); absent or null: only from its own node. */
    agentEndpoint?: string | null;
    lastHeartbeatAt: string | null;
  };
  /**
   * Up or down as the manager last noted it (from the node's lease), and since when: so that a
   * NodeDown or NodeUp event is recorded once per change, whichever leader saw it. Written by the
   * manager only (the agent writes `status`). Absent: not noted yet.
   */
  liveness?: { up: boolean; since: string };
}

export interface NodeLeaseValue {
  startedAt: string;
}

export interface LeaderValue {
  nodeId: string;
  /** When this node's term began. */
  since: string;
  /** Where its API serves (other nodes pass their API requests on to it); null until it listens. */
  api?: string | null;
}

export interface DiskValue {
  spec: {
    nodeId: string;
    path: string;
    allowScheduling: boolean;
    storageReservedBytes: number;
    /** Labels volumes select disks by (a volume's disk selector). Absent: none. */
    tags?: string[];
    /** Every replica leaves the disk (each rebuilt elsewhere first); nothing new is placed there. Absent: false. */
    evict?: boolean;
  };
  status: {
    diskUuid: string | null;
    storageMaximumBytes: number;
    storageAvailableBytes: number;
    ready: boolean;
    message: string | null;
  };
}

export interface SettingValue {
  value: string;
}

export interface EventValue {
  time: string;
  type: 'Normal' | 'Warning';
  reason: string;
  message: string;
  kind: string;
  object: string;
  volume: string | null;
}

export interface BackupTargetValue {
  spec: {
    url: string;
    /** S3: the endpoint of an S3-compatible server; null for AWS. */
    endpoint: string | null;
    region: string | null;
    /** Whether the Secret `backup-target-credentials` holds credentials for it. */
    hasCredentials: boolean;
    /** Changed at every `set`: jobs of an older generation stop. */
    generation: number;
  };
  status: {
    /** Reachable and writable at the last check; null before the first. */
    available: boolean | null;
    message: string | null;
    checkedAt: string | null;
    lastSyncAt: string | null;
    lastGcAt: string | null;
    lastGc: { tombstones: number; removedBlocks: number; keptClaimed: number } | null;
  };
}

export type BackupState = 'pending' | 'in-progress' | 'completed' | 'error';

export interface BackupValue {
  spec: {
    volume: string;
    /** The snapshot it is taken from. */
    snapshot: string;
    /**
     * The backup took the snapshot itself: it is deleted once a newer backup of the volume has
     * completed (it is the base of the next incremental backup until then). Absent: false.
     */
    ownSnapshot?: boolean;
    labels: Record<string, string>;
    /** The target URL it belongs to. */
    targetUrl: string;
    requestedAt: string;
    deletionRequestedAt: string | null;
  };
  status: JobStatus & {
    state: BackupState;
    /** From the manifest, once completed. */
    sizeBytes: number;
    base: string | null;
    stats: { readBytes: number; uploadedBytes: number; uploadedBlocks: number; reusedBlocks: number; blocks: number } | null;
    /** The backing image the volume was on (from the manifest); absent or null: none. */
    backingImage?: { name: string; checksum: string } | null;
  };
}

export interface SecretValue {
  data: Record<string, string>;
}

/** `suspended`: the volume is detached and the setting allow-recurring-job-while-volume-detached is false. */
export type RecurringJobResult = 'running' | 'completed' | 'skipped' | 'suspended' | 'error';

export interface RecurringJobValue {
  spec: RecurringJobSpec;
  status: {
    createdAt: string;
    /** The scheduled time the job last ran for (its creation before the first run): see recurring-jobs.ts. */
    lastRunFor: string;
    /** When the last run started; null before the first. */
    lastRunAt: string | null;
    /** The next scheduled time, as last computed; null: the schedule has no further time. */
    nextRunAt: string | null;
    /** Per volume, the last run's result ("skipped: unchanged since backup B" is a result, not silence). */
    volumes: Record<string, { result: RecurringJobResult; message: string | null; at: string }>;
    /**
     * Snapshots the job made, per volume (recorded before each is taken, so that a crash in
     * between leaves none unaccounted): its retention removes only these. Absent: none.
     */
    created?: Record<string, { name: string; createdAt: string }[]>;
  };
}

/**
 * A backing image. `status.files` is written by both sides, each field by one: the backing-image
 * controller adds files (`pending`), marks them `unknown` when their disk or node is gone and
 * `cleaning` when they are to go; the agent of the file's node moves a file through `starting`,
 * `in-progress`, `ready` or `failed`, removes a cleaned file's entry, and fixes `checksum` and
 * `sizeBytes` at the first ready file.
 */
export interface BackingImageValue {
  spec: BackingImageSpec;
  status: {
    /** SHA-512 every file must have: the expected one, or that of the first ready file. */
    checksum: string | null;
    sizeBytes: number;
    /** By disk name. */
    files: Record<string, BackingImageFile>;
    refetch: RefetchStatus;
    /**
     * The image's own copy in the backup target (backing-image-backup.ts): which target, which
     * backup, when; absent or null: none. `backupError`: why the last backup of it failed.
     */
    backup?: { targetUrl: string; backup: string; at: string } | null;
    backupError?: string | null;
    /** What the controller waits for, or why it cannot go on; null when all is well. */
    message: string | null;
  };
  createdAt: string;
  deletionRequestedAt: string | null;
}

export interface KindValues {
  Volume: VolumeValue;
  Engine: EngineValue;
  Replica: ReplicaValue;
  Node: NodeValue;
  NodeLease: NodeLeaseValue;
  Disk: DiskValue;
  Setting: SettingValue;
  Event: EventValue;
  BackupTarget: BackupTargetValue;
  Backup: BackupValue;
  Secret: SecretValue;
  RecurringJob: RecurringJobValue;
  BackingImage: BackingImageValue;
  Leader: LeaderValue;
}

const MAX_MUTATE_ATTEMPTS = 20;

/** Typed access to the store for the manager and the agents. */
export class Objects {
  readonly store: Store;

  constructor(store: Store) {
    this.store = store;
  }

  get<K extends Kind>(kind: K, name: string): Promise<StoreObject<KindValues[K]> | null> {
    return this.store.get<KindValues[K]>(kind, name);
  }

  async must<K extends Kind>(kind: K, name: string): Promise<StoreObject<KindValues[K]>> {
    const obj = await this.get(kind, name);
    if (obj === null) throw new ZebuError(ErrorCode.NOT_FOUND, `${kind.toLowerCase()} ${name} not found`);
    return obj;
  }

  async list<K extends Kind>(kind: K): Promise<StoreObject<KindValues[K]>[]> {
    return (await this.store.list<KindValues[K]>(kind)).items;
  }

  create<K extends Kind>(kind: K, name: string, value: KindValues[K], options?: { leaseId?: string }): Promise<StoreObject<KindValues[K]>> {
    return this.store.create(kind, name, value, options);
  }

  /**
   * Read-modify-write with compare-and-swap, retried on CONFLICT. `change` edits a copy in place
   * and returns false to write nothing. Returns the object as stored afterwards, or null when it
   * does not exist.
   */
  async mutate<K extends Kind>(kind: K, name: string, change: (value: KindValues[K]) => boolean | void): Promise<StoreObject<KindValues[K]> | null> {
    for (let attempt = 0; attempt < MAX_MUTATE_ATTEMPTS; attempt++) {
      const obj = await this.get(kind, name);
      if (obj === null) return null;
      const value = structuredClone(obj.value);
      if (change(value) === false) return obj;
      if (JSON.stringify(value) === JSON.stringify(obj.value)) return obj;
      try {
        return await this.store.update(kind, name, value, { resourceVersion: obj.resourceVersion });
      } catch (err) {
        if ((err as ZebuError).code === ErrorCode.CONFLICT) continue;
        if ((err as ZebuError).code === ErrorCode.NOT_FOUND) return null;
        throw err;
      }
    }
    throw new ZebuError(ErrorCode.CONFLICT, `${kind} ${name}: gave up after ${MAX_MUTATE_ATTEMPTS} conflicting updates`);
  }

  async remove(kind: Kind, name: string): Promise<void> {
    try {
      await this.store.delete(kind, name);
    } catch (err) {
      if ((err as ZebuError).code !== ErrorCode.NOT_FOUND) throw err;
    }
  }
}
