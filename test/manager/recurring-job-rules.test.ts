/**
 * The rules the recurring-job tasks apply to snapshots and backups: when a volume is unchanged
 * since a snapshot (no identical backup or snapshot), which snapshots backups still need, what
 * snapshot-cleanup and snapshot-delete remove, when pruning waits because backups fail, and a
 * volume's recovery point (moved on by a skip that found the data unchanged).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  backupsFailing, cleanupVictims, snapshotDeleteVictims, snapshotsBackupsNeed, unchangedSince, type BackupFacts, type SnapshotNode,
} from '../../src/manager/recurring-jobs.ts';
import { jobIntervalSeconds, volumeProtection } from '../../src/manager/protection.ts';
import type { BackupValue, RecurringJobValue, VolumeValue } from '../../src/cluster/objects.ts';

const snap = (name: string, parent: string | null, sizeBytesUsed: number, createdAt = '2026-01-01T00:00:00Z'): SnapshotNode => ({ name, parent, sizeBytesUsed, createdAt });

test('unchangedSince: only empty snapshots between the probe and the base', () => {
  const chain = [snap('a', null, 4096), snap('b', 'a', 8192), snap('c', 'b', 0), snap('d', 'c', 0), snap('e', 'd', 4096), snap('f', 'e', 0)];
  assert.equal(unchangedSince(chain, 'd', 'b'), true, 'c and d are empty');
  assert.equal(unchangedSince(chain, 'd', 'd'), true);
  assert.equal(unchangedSince(chain, 'f', 'b'), false, 'e holds a block');
  assert.equal(unchangedSince(chain, 'f', 'e'), true);
  assert.equal(unchangedSince(chain, 'b', 'a'), false, 'b itself holds blocks written after a');
  assert.equal(unchangedSince(chain, 'd', 'x'), false, 'a base that is gone is never an ancestor');
  assert.equal(unchangedSince([snap('p', 'q', 0), snap('q', 'p', 0)], 'p', 'z'), false, 'a cycle ends the walk');
  // Another branch (a revert): the base is not an ancestor.
  assert.equal(unchangedSince([...chain, snap('g', 'a', 0)], 'g', 'b'), false);
});

const backup = (name: string, snapshot: string, state: BackupFacts['state'], requestedAt: string, extra: Partial<BackupFacts> = {}): BackupFacts => ({
  name, snapshot, state, requestedAt, ownSnapshot: true, deleting: false, message: null, ...extra,
});

test('snapshots backups need, cleanup victims, snapshot-delete victims', () => {
  const backups = [
    backup('b1', 'backup-20260101-000000-aaaa', 'completed', '2026-01-01T00:00:00Z'),
    backup('b2', 'backup-20260102-000000-bbbb', 'completed', '2026-01-02T00:00:00Z'),
    backup('b3', 'backup-20260103-000000-cccc', 'error', '2026-01-03T00:00:00Z'),
    backup('b4', 'backup-20260104-000000-dddd', 'pending', '2026-01-04T00:00:00Z'),
    backup('b5', 'user-snap', 'completed', '2026-01-01T12:00:00Z', { ownSnapshot: false }),
  ];
  assert.deepEqual([...snapshotsBackupsNeed(backups)].sort(), ['backup-20260102-000000-bbbb', 'backup-20260104-000000-dddd']);
  const snapshots = [
    snap('user-snap', null, 1, '2026-01-01T11:00:00Z'),
    snap('backup-20260101-000000-aaaa', 'user-snap', 1, '2026-01-01T00:00:00Z'),
    snap('backup-20260102-000000-bbbb', 'backup-20260101-000000-aaaa', 1, '2026-01-02T00:00:00Z'),
    snap('backup-20260103-000000-cccc', 'backup-20260102-000000-bbbb', 1, '2026-01-03T00:00:00Z'),
    snap('backup-20260104-000000-dddd', 'backup-20260103-000000-cccc', 1, '2026-01-04T00:00:00Z'),
    snap('backup-20251231-000000-eeee', null, 1, '2025-12-31T00:00:00Z'),
    snap('snap-20260105-000000-ffff', 'backup-20260104-000000-dddd', 1, '2026-01-05T00:00:00Z'),
  ];
  // An older backup's own snapshot, a failed one's, and one whose backup is gone; never a user's or a job's.
  assert.deepEqual(cleanupVictims(snapshots, backups).sort(), ['backup-20251231-000000-eeee', 'backup-20260101-000000-aaaa', 'backup-20260103-000000-cccc']);
  const now = new Date('2026-01-06T00:00:00Z');
  assert.deepEqual(
    snapshotDeleteVictims(snapshots, backups, { count: 2, maxAgeSeconds: null }, now).sort(),
    ['backup-20251231-000000-eeee', 'backup-20260101-000000-aaaa', 'backup-20260103-000000-cccc', 'user-snap'],
    'beyond the newest 2, except what backups need',
  );
});

test('backupsFailing: the newest backup failed, or the target is down for a volume that is backed up', () => {
  const up = { available: true, message: null };
  const down = { available: false, message: 'ENOTDIR' };
  assert.equal(backupsFailing([], up, true), null);
  assert.equal(backupsFailing([], down, false), null, 'a volume nobody backs up keeps pruning');
  assert.match(backupsFailing([], down, true)!, /target is unavailable: ENOTDIR/);
  const older = backup('b1', 's1', 'completed', '2026-01-01T00:00:00Z');
  assert.match(backupsFailing([older, backup('b2', 's2', 'error', '2026-01-02T00:00:00Z', { message: 'EIO' })], up, true)!, /b2\) failed: EIO/);
  assert.equal(backupsFailing([backup('b0', 's0', 'error', '2025-12-01T00:00:00Z'), older], up, true), null, 'a later backup completed');
});

test('recovery point: the newest completed backup, moved on by a skip that found the volume unchanged since it', () => {
  const b = (name: string, state: BackupValue['status']['state'], requestedAt: string, completedAt: string | null) => ({
    kind: 'Backup', name, resourceVersion: 1,
    value: {
      spec: { volume: 'v', snapshot: `s-${name}`, labels: {}, targetUrl: 'file:///t', requestedAt, deletionRequestedAt: null },
      status: { state, completedAt, doneBytes: 0, totalBytes: 0, bytesPerSecond: 0, startedAt: null, message: null, attempts: 0, sizeBytes: 0, base: null, stats: null },
    } as BackupValue,
  });
  const volume = (coveredAt: VolumeValue['status']['coveredAt']): VolumeValue => ({
    spec: { sizeBytes: 4096, numberOfReplicas: 1, nodeId: null, maintenance: false, recurringJobs: ['bk'] },
    status: { state: 'detached', robustness: 'healthy', epoch: 1, currentNodeId: null, attachStartedAt: null, endpoint: null, message: null, snapshots: [], coveredAt },
    createdAt: '2026-01-01T00:00:00Z', deletionRequestedAt: null,
  });
  const job = {
    kind: 'RecurringJob', name: 'bk', resourceVersion: 1,
    value: {
      spec: { task: 'backup', cron: '0 * * * *', timezone: 'UTC', retain: { count: 1, maxAgeSeconds: null }, concurrency: 1, groups: [], labels: {} },
      status: { createdAt: '2026-01-01T00:00:00Z', lastRunFor: '2026-01-02T10:00:00Z', lastRunAt: '2026-01-02T10:00:00Z', nextRunAt: '2026-01-02T11:00:00Z', volumes: { v: { result: 'skipped', message: 'skipped: unchanged since backup b2', at: '2026-01-02T10:00:01Z' } } },
    } as RecurringJobValue,
  };
  const backups = [b('b1', 'completed', '2026-01-01T10:00:00Z', '2026-01-01T10:01:00Z'), b('b2', 'completed', '2026-01-02T08:00:00Z', '2026-01-02T08:02:00Z'), b('b3', 'error', '2026-01-02T09:00:00Z', null)];
  const now = new Date('2026-01-02T10:30:00Z');
  const plain = volumeProtection('v', volume(null), backups, [job], now);
  assert.equal(plain.lastBackup, 'b2');
  assert.equal(plain.lastBackupAt, '2026-01-02T08:02:00Z');
  assert.equal(plain.recoveryPointAt, '2026-01-02T08:00:00Z');
  assert.equal(plain.recoveryPointAgeSeconds, 2.5 * 3600);
  assert.deepEqual(plain.recurringJobs, [{ name: 'bk', task: 'backup', nextRunAt: '2026-01-02T11:00:00Z', result: 'skipped', message: 'skipped: unchanged since backup b2', at: '2026-01-02T10:00:01Z' }]);
  const skipped = volumeProtection('v', volume({ at: '2026-01-02T10:00:00Z', backup: 'b2' }), backups, [job], now);
  assert.equal(skipped.recoveryPointAt, '2026-01-02T10:00:00Z', 'the data at the skip is covered by b2');
  assert.equal(skipped.lastBackupAt, '2026-01-02T08:02:00Z', 'the last backup is still the last backup');
  const stale = volumeProtection('v', volume({ at: '2026-01-02T10:00:00Z', backup: 'b1' }), backups, [job], now);
  assert.equal(stale.recoveryPointAt, '2026-01-02T08:00:00Z', 'a skip against an older backup says nothing of the newer one');
  assert.equal(volumeProtection('w', volume(null), backups, [job], now).lastBackup, null);
  assert.equal(jobIntervalSeconds({ cron: '*/5 * * * * *', timezone: 'UTC' }, now), 5);
  assert.equal(jobIntervalSeconds({ cron: '0 3 * * *', timezone: 'Europe/Berlin' }, now), 86400);
});
