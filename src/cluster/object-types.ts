/**
 * The types the cluster's objects are made of (see objects.ts): a volume's state and robustness,
 * a replica's mode, a process's state, what an engine reported (recovery, verify, snapshots, its
 * link), a recurring job's spec and a backing image's spec and files. The manager shows them
 * through the API as they are; the agents write some of them into the objects' status.
 */
import type { LinkView } from '../frontend/engine-link.ts';

export type VolumeState = 'creating' | 'detached' | 'attaching' | 'attached' | 'detaching' | 'deleting';

export type VolumeRobustness = 'healthy' | 'degraded' | 'faulted' | 'unknown';

export type ReplicaModeName = 'RW' | 'WO' | 'ERR';

/** A process the agent runs: where it is in its life. */
/** Whether a volume keeps a replica on the node it is attached on. */
export type DataLocality = 'disabled' | 'best-effort';

export type ProcessState = 'stopped' | 'starting' | 'running' | 'error';

/**
 * The NBD frontend's link to a volume's engine (see src/frontend/engine-link.ts): OPEN
 * (forwarding), CLOSE (no engine: requests held), REOPENING (a new engine got the held requests).
 * Counters are the frontend's, since it started serving the volume. The engine process it names
 * is left out: the Engine object has its pid.
 */
/** The link as stored (directReads moves with every read: it reaches the engine's counters instead). */
export type EngineLinkView = Omit<LinkView, 'engine' | 'directReads'>;

/**
 * What an engine did at start-up before serving: resynced the regions where replicas may
 * differ (the union of their write-intent logs) from the source, delta-rebuilt replicas that
 * were behind, put out (ERR) those it could not bring back.
 */
export interface RecoveryView {
  at: string;
  /** Every replica had shut down cleanly: nothing to resync. */
  clean: boolean;
  /** The replica the engine copied from (name); null when it had none to choose. */
  source: string | null;
  /** Regions compared: where the replicas may have differed (the union of their write-intent logs). */
  checkedRegions: number;
  /** Of those, regions that differed and were copied from the source. */
  regions: number;
  /** Bytes copied. */
  bytes: number;
  durationMs: number;
  /** Replicas brought up to date by a delta rebuild. */
  deltaReplicas: string[];
  /** Replicas the engine could not bring back (the manager replaces them). */
  erredReplicas: string[];
}

export interface VerifyDifference {
  region: number;
  offset: number;
  length: number;
  /** Replica name -> SHA-256 (hex) of the region on it. */
  hashes: Record<string, string>;
}

/** A comparison of the replicas of an attached volume, region by region. */
export interface VerifyView {
  at: string;
  /** Whether differing regions were copied from the source into the others. */
  repair: boolean;
  /** Regions compared. */
  regions: number;
  /** The replicas compared (those RW when it ran): fewer than the volume's means some were out. */
  replicas: string[];
  differing: VerifyDifference[];
  /** Differing regions repaired (0 without repair). */
  repaired: number;
  durationMs: number;
}

export interface SnapshotView {
  name: string;
  createdAt: string;
  parent: string | null;
  sizeBytesUsed: number;
  /** Whether it is an ancestor of the volume's current data. */
  inChain: boolean;
}

export interface SettingView {
  name: string;
  value: string;
  default: string;
  type: 'int' | 'bool' | 'string';
  description: string;
}

export const RECURRING_TASKS = ['snapshot', 'snapshot-cleanup', 'snapshot-delete', 'backup', 'backup-force-create'] as const;

export type RecurringTask = (typeof RECURRING_TASKS)[number];

export interface RecurringJobSpec {
  task: RecurringTask;
  /** Cron with 5 fields, or 6 with seconds first. */
  cron: string;
  /** IANA time zone the schedule is read in. */
  timezone: string;
  retain: { count: number; maxAgeSeconds: number | null };
  /** Volumes processed at once. */
  concurrency: number;
  groups: string[];
  labels: Record<string, string>;
}

export type BackingImageSource =
  | { type: 'download'; url: string }
  | { type: 'upload' }
  | { type: 'export-from-volume'; volume: string; snapshot: string }
  | { type: 'restore'; backup: string };

export interface BackingImageSpec {
  source: BackingImageSource;
  /** SHA-512 (hex) the image must have; null: fixed at the first ready file. */
  expectedChecksum: string | null;
  /** Ready files wanted, on different disks (on different nodes first). */
  minCopies: number;
  /** Nodes and disks the files may be on (by name); empty: any. */
  nodeSelector: string[];
  diskSelector: string[];
}

export const FILE_STATES = ['pending', 'starting', 'in-progress', 'ready', 'failed', 'unknown', 'cleaning'] as const;

export type FileState = (typeof FILE_STATES)[number];

/** One file of an image on one disk, as the store keeps it. */
export interface BackingImageFile {
  diskId: string;
  nodeId: string;
  state: FileState;
  /** 0..1 while in progress. */
  progress: number;
  /** Why it is failed or unknown, or what it waits for. */
  message: string | null;
  /** When it entered its state. */
  transitionAt: string;
  /** Where its bytes come from: the source, the backup of the image, or another disk's ready file. */
  from: 'source' | 'backup' | { disk: string };
}

export interface RefetchStatus {
  /** Fetches from scratch after every file was lost, so far. */
  attempts: number;
  /** Not before this time (backoff); null: at once. */
  notBefore: string | null;
  /** Why it gave up or waits; null when nothing to say. */
  message: string | null;
}

/**
 * Whether the manager writes this file (src/backing-image/writer.ts) rather than the agent of its
 * node: the first file of an upload, an export or a restore, and any file from the image's backup.
 */
export function writtenByManager(source: BackingImageSource, from: BackingImageFile['from']): boolean {
  return from === 'backup' || (from === 'source' && source.type !== 'download');
}
