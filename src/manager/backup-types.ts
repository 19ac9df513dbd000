/**
 * What the manager offers for backups (REST API, CLI): the views and the operations. Kept apart
 * from types.ts so the volume service stays the size it is; the API serves both.
 */
import type { TargetVerifyResult } from '../backup/verify-target.ts';
import type { BackupState } from '../cluster/objects.ts';

export interface BackupTargetView {
  name: string;
  url: string;
  endpoint: string | null;
  region: string | null;
  /** Whether credentials are stored (they are never shown). */
  credentials: 'set' | 'none';
  /** Reachable and writable at the last check; null before the first. */
  available: boolean | null;
  message: string | null;
  checkedAt: string | null;
  lastSyncAt: string | null;
  lastGcAt: string | null;
  lastGc: { tombstones: number; removedBlocks: number; keptClaimed: number } | null;
  /** Backups in the catalog. */
  backups: number;
}

export interface BackupTargetSetInput {
  url: string;
  endpoint?: string | null;
  region?: string | null;
  /** S3 credentials; stored once, never returned. Absent: keep the stored ones (same target type). */
  credentials?: { accessKeyId: string; secretAccessKey: string; sessionToken?: string } | null;
}

export interface BackupView {
  name: string;
  volume: string;
  snapshot: string;
  state: BackupState;
  /** 0..1 while in progress, 1 when completed. */
  progress: number;
  doneBytes: number;
  totalBytes: number;
  bytesPerSecond: number;
  /** Why it is in error, or what it is waiting for. */
  message: string | null;
  labels: Record<string, string>;
  url: string;
  requestedAt: string;
  startedAt: string | null;
  completedAt: string | null;
  /** The volume's size at the backup. */
  sizeBytes: number;
  /** The backup it carried blocks over from (incremental), or null. */
  base: string | null;
  /** The backing image the volume was on, or null. The backup holds the image's bytes too. */
  backingImage: { name: string; checksum: string } | null;
  uploadedBytes: number | null;
  readBytes: number | null;
  blocks: number | null;
  deleting: boolean;
}

export interface BackupCreateInput {
  volume: string;
  /** An existing snapshot; absent: one is taken now. */
  snapshot?: string;
  labels?: Record<string, string>;
}

export interface BackupRestoreInput {
  /** The new volume. */
  name: string;
  numberOfReplicas?: number;
  standby?: boolean;
}

export interface BackupSyncResult {
  volumes: number;
  added: string[];
  removed: string[];
  durationMs: number;
}

export interface BackupGcView {
  tombstones: number;
  candidates: number;
  removedBlocks: number;
  keptClaimed: number;
  manifestsRead: number;
}

/** Per-volume backup figures for /metrics, from the catalog. */
export interface BackupMetrics {
  volume: string;
  uploadedBytes: number;
  reusedBytes: number;
  lastDurationSeconds: number | null;
  lastSuccessSeconds: number | null;
  completed: number;
  inProgress: number;
  failed: number;
}

export interface BackupService {
  getBackupTarget(): Promise<BackupTargetView>;
  /** Stores the target and checks it; the answer says whether it is reachable and writable. */
  setBackupTarget(input: BackupTargetSetInput): Promise<BackupTargetView>;
  checkBackupTarget(): Promise<BackupTargetView>;
  syncBackupTarget(): Promise<BackupSyncResult>;
  verifyBackupTarget(input: { volume?: string }): Promise<TargetVerifyResult>;
  gcBackupTarget(): Promise<BackupGcView>;

  listBackups(filter?: { volume?: string }): Promise<BackupView[]>;
  getBackup(name: string): Promise<BackupView>;
  /** Returns at once (state pending); poll getBackup. */
  createBackup(input: BackupCreateInput): Promise<BackupView>;
  /** Removes it from the target and the catalog (blocks go at the next collection). */
  deleteBackup(name: string): Promise<BackupView>;

  backupMetrics(): Promise<BackupMetrics[]>;
}
