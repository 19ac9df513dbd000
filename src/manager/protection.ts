/**
 * How well a volume is protected, from what the store holds: its newest completed backup, its
 * recovery point (the newest moment whose data a backup holds), and its recurring jobs with their
 * last result. A pure function of its arguments, shared by the volume views, /metrics and the
 * scheduler's stale-recovery-point warning.
 *
 * The recovery point is the time of the newest completed backup's snapshot, or later when a
 * backup job found the data unchanged since that backup (then the data at that check is covered
 * too, although no new backup was made).
 */
import type { BackupValue, RecurringJobResult, RecurringJobValue, VolumeValue } from '../cluster/objects.ts';
import { jobsForVolume, scheduleOf, type RecurringTask } from './recurring-jobs.ts';

export interface VolumeJobView {
  name: string;
  task: RecurringTask;
  nextRunAt: string | null;
  /** The job's last result for this volume; null before its first run for it. */
  result: RecurringJobResult | null;
  message: string | null;
  at: string | null;
}

export interface VolumeProtection {
  /** The newest completed backup of the volume on the catalog (not being deleted), or null. */
  lastBackup: string | null;
  lastBackupAt: string | null;
  /** The newest moment whose data a backup holds; null: none does. */
  recoveryPointAt: string | null;
  recoveryPointAgeSeconds: number | null;
  recurringJobs: VolumeJobView[];
}

interface Named<T> {
  name: string;
  value: T;
}

function newestCompleted(volume: string, backups: readonly Named<BackupValue>[]): Named<BackupValue> | null {
  let best: Named<BackupValue> | null = null;
  for (const b of backups) {
    if (b.value.spec.volume !== volume || b.value.status.state !== 'completed' || b.value.spec.deletionRequestedAt !== null) continue;
    if (best === null || (b.value.spec.requestedAt > best.value.spec.requestedAt)) best = b;
  }
  return best;
}

export function volumeProtection(
  name: string,
  volume: VolumeValue,
  backups: readonly Named<BackupValue>[],
  jobs: readonly Named<RecurringJobValue>[],
  now: Date,
): VolumeProtection {
  const last = newestCompleted(name, backups);
  let recoveryPointAt = last?.value.spec.requestedAt ?? null;
  const covered = volume.status.coveredAt ?? null;
  if (covered !== null && last !== null && covered.backup === last.name && covered.at > (recoveryPointAt ?? '')) recoveryPointAt = covered.at;
  const joined = jobsForVolume(volume.spec, jobs.map((j) => ({ name: j.name, spec: j.value.spec, status: j.value.status })));
  return {
    lastBackup: last?.name ?? null,
    lastBackupAt: last?.value.status.completedAt ?? null,
    recoveryPointAt,
    recoveryPointAgeSeconds: recoveryPointAt === null ? null : Math.max(0, Math.round((now.getTime() - Date.parse(recoveryPointAt)) / 1000)),
    recurringJobs: joined.map((j) => {
      const r = j.status.volumes[name];
      return { name: j.name, task: j.spec.task, nextRunAt: j.status.nextRunAt, result: r?.result ?? null, message: r?.message ?? null, at: r?.at ?? null };
    }).sort((a, b) => a.name.localeCompare(b.name)),
  };
}

/** Seconds between two consecutive scheduled times of a job after `from` (null: it does not repeat). */
export function jobIntervalSeconds(spec: { cron: string; timezone: string }, from: Date): number | null {
  const schedule = scheduleOf(spec.cron, spec.timezone);
  const first = schedule.nextRun(from);
  if (first === null) return null;
  const second = schedule.nextRun(first);
  if (second === null) return null;
  return (second.getTime() - first.getTime()) / 1000;
}

/** Backup tasks: they make recovery points. */
export function isBackupTask(task: RecurringTask): boolean {
  return task === 'backup' || task === 'backup-force-create';
}
