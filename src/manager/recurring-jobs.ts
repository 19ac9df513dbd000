/**
 * Recurring jobs, the rules without the I/O: what a job is (and which input is refused), when a
 * run is due, which volumes a job covers, and what its retention removes. The scheduler in the
 * manager applies them; everything here is a pure function of its arguments (the clock is one).
 *
 * Due runs: a job remembers the scheduled time it last ran for. A run is due when the schedule
 * has a time after that one and not after now; the run then counts for now, so a manager that was
 * down across many scheduled times runs the job once when it is back, not once per missed time.
 */
import { Cron } from 'croner';
import { invalid } from '../errors.ts';
import { checkLabels } from './labels.ts';
import type { RecurringTask, RecurringJobSpec } from '../cluster/object-types.ts';
import { RECURRING_TASKS } from '../cluster/object-types.ts';
export type { RecurringTask, RecurringJobSpec };
export { RECURRING_TASKS };

/** The group of volumes that name no job and no group. */
export const DEFAULT_GROUP = 'default';
/** Snapshots or backups a job keeps per volume, at most (a chain of snapshots costs every read). */
export const MAX_RETAIN = 250;
export const MAX_CONCURRENCY = 100;
/** A maximum age longer than this is surely a mistake in units. */
const MAX_RETAIN_AGE_SECONDS = 10 * 366 * 24 * 3600;
const NAME = /^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$/;

/** What a user sends: every field but task and cron may be left out. */
export interface RecurringJobInput {
  task?: unknown;
  cron?: unknown;
  timezone?: unknown;
  retain?: unknown;
  retainMaxAgeSeconds?: unknown;
  concurrency?: unknown;
  groups?: unknown;
  labels?: unknown;
}

export function checkJobName(name: unknown, field = 'name'): string {
  if (typeof name !== 'string' || !NAME.test(name)) {
    throw invalid(`${field} must be 1-63 lowercase letters, digits and '-', starting and ending with a letter or digit (got ${JSON.stringify(name)})`, field);
  }
  return name;
}

/** The schedule of a spec (never started: only asked for its times). Throws EINVAL for a bad cron or time zone. */
export function scheduleOf(cron: string, timezone: string): Cron {
  let schedule: Cron;
  try {
    schedule = new Cron(cron, { timezone, paused: true, mode: '5-or-6-parts' });
  } catch (err) {
    throw invalid(`cron ${JSON.stringify(cron)}: ${(err as Error).message}`, 'cron');
  }
  try {
    // A bad time zone is found when a time is computed.
    schedule.nextRun(new Date(0));
  } catch {
    throw invalid(`timezone ${JSON.stringify(timezone)} is not an IANA time zone (e.g. UTC, Europe/Berlin, America/New_York)`, 'timezone');
  }
  return schedule;
}

function integer(value: unknown, field: string, min: number, max: number): number {
  if (typeof value !== 'number' || !Number.isInteger(value) || value < min || value > max) {
    throw invalid(`${field} must be a whole number from ${min} to ${max} (got ${JSON.stringify(value)})`, field);
  }
  return value;
}

/** A full spec from a user's input, or EINVAL naming the field at fault. */
export function validateRecurringJob(input: RecurringJobInput): RecurringJobSpec {
  if (typeof input.task !== 'string' || !(RECURRING_TASKS as readonly string[]).includes(input.task)) {
    throw invalid(`task must be one of ${RECURRING_TASKS.join(', ')} (got ${JSON.stringify(input.task)})`, 'task');
  }
  if (typeof input.cron !== 'string' || input.cron.trim() === '') throw invalid('cron is required (5 fields, or 6 with seconds first)', 'cron');
  const cron = input.cron.trim().replace(/\s+/g, ' ');
  const timezone = input.timezone === undefined || input.timezone === null ? 'UTC' : input.timezone;
  if (typeof timezone !== 'string' || timezone === '') throw invalid('timezone must be an IANA time zone name', 'timezone');
  scheduleOf(cron, timezone);
  const count = integer(input.retain ?? 1, 'retain', 1, MAX_RETAIN);
  const maxAgeSeconds = input.retainMaxAgeSeconds === undefined || input.retainMaxAgeSeconds === null ? null : integer(input.retainMaxAgeSeconds, 'retainMaxAgeSeconds', 60, MAX_RETAIN_AGE_SECONDS);
  const concurrency = integer(input.concurrency ?? 1, 'concurrency', 1, MAX_CONCURRENCY);
  const groups = input.groups ?? [];
  if (!Array.isArray(groups)) throw invalid('groups must be a list of group names', 'groups');
  groups.forEach((g) => checkJobName(g, 'groups'));
  const labels = checkLabels(input.labels);
  return {
    task: input.task as RecurringTask,
    cron,
    timezone,
    retain: { count, maxAgeSeconds },
    concurrency,
    groups: [...new Set(groups as string[])].sort(),
    labels,
  };
}

export interface DueRun {
  /** Whether a run is due now. */
  due: boolean;
  /** The next scheduled time after the run that is due now (or after now when none is); null: never again. */
  next: Date | null;
}

/**
 * Whether a job is due at `now`, given the scheduled time it last ran for (or, never run, when it
 * was created: a new job waits for its first scheduled time).
 */
export function dueRun(spec: Pick<RecurringJobSpec, 'cron' | 'timezone'>, lastRunFor: Date, now: Date): DueRun {
  const schedule = scheduleOf(spec.cron, spec.timezone);
  const first = schedule.nextRun(lastRunFor);
  if (first === null || first.getTime() > now.getTime()) return { due: false, next: first };
  return { due: true, next: schedule.nextRun(now) };
}

/** The jobs that cover a volume: those it names, and those of its groups (`default` when it names none). */
export function jobsForVolume<J extends { name: string; spec: Pick<RecurringJobSpec, 'groups'> }>(
  volume: { recurringJobs?: readonly string[]; recurringJobGroups?: readonly string[] },
  jobs: readonly J[],
): J[] {
  const names = new Set(volume.recurringJobs ?? []);
  const groups = new Set(volume.recurringJobGroups ?? []);
  if (names.size === 0 && groups.size === 0) groups.add(DEFAULT_GROUP);
  return jobs.filter((j) => names.has(j.name) || j.spec.groups.some((g) => groups.has(g)));
}

/**
 * What a job's retention removes from what it created for one volume: beyond the newest `count`,
 * and older than the maximum age — never the newest one (a volume keeps a recovery point however
 * long its job has not run).
 */
export function retentionVictims<T extends { createdAt: string }>(created: readonly T[], retain: RecurringJobSpec['retain'], now: Date): T[] {
  const newestFirst = [...created].sort((a, b) => Date.parse(b.createdAt) - Date.parse(a.createdAt));
  return newestFirst.filter((item, i) => {
    if (i === 0) return false;
    if (i >= retain.count) return true;
    return retain.maxAgeSeconds !== null && now.getTime() - Date.parse(item.createdAt) > retain.maxAgeSeconds * 1000;
  });
}

/** A snapshot as the jobs see it: `parent` by name. */
export interface SnapshotNode {
  name: string;
  parent: string | null;
  createdAt: string;
  sizeBytesUsed: number;
}

/**
 * Whether snapshot `probe` holds the same data as snapshot `base`: base is an ancestor of probe
 * and every snapshot from probe up to base (base excluded) holds no block — nothing was written
 * (not even a zero or a trim) between them.
 */
export function unchangedSince(snapshots: readonly SnapshotNode[], probe: string, base: string): boolean {
  const byName = new Map(snapshots.map((s) => [s.name, s]));
  const seen = new Set<string>();
  let at = byName.get(probe);
  while (at !== undefined && !seen.has(at.name)) {
    if (at.name === base) return true;
    if (at.sizeBytesUsed !== 0) return false;
    seen.add(at.name);
    at = at.parent === null ? undefined : byName.get(at.parent);
  }
  return false;
}

/** Snapshot names a backup takes itself (service and jobs): `backup-YYYYMMDD-HHMMSS-xxxx`. */
export const BACKUP_SNAPSHOT_NAME = /^backup-\d{8}-\d{6}-[0-9a-f]{4}$/;

/** `YYYYMMDD-HHMMSS` (UTC), the time part of generated snapshot names. */
export function nameTimeStamp(now: Date): string {
  return now.toISOString().replace(/[-:]/g, '').replace(/\..*$/, '').replace('T', '-');
}

export function backupSnapshotName(now: Date, random: string): string {
  return `backup-${nameTimeStamp(now)}-${random}`;
}

/** What the jobs need to know of a backup of the volume. */
export interface BackupFacts {
  name: string;
  snapshot: string;
  ownSnapshot: boolean;
  state: 'pending' | 'in-progress' | 'completed' | 'error';
  requestedAt: string;
  deleting: boolean;
  message: string | null;
}

/**
 * Snapshots backups still need: those of backups under way, and that of the newest completed
 * backup (the next incremental backup reads only what was written since it).
 */
export function snapshotsBackupsNeed(backups: readonly BackupFacts[]): Set<string> {
  const needed = new Set<string>();
  let newest: BackupFacts | null = null;
  for (const b of backups) {
    if (b.state === 'pending' || b.state === 'in-progress') needed.add(b.snapshot);
    if (b.state === 'completed' && !b.deleting && (newest === null || b.requestedAt > newest.requestedAt)) newest = b;
  }
  if (newest !== null) needed.add(newest.snapshot);
  return needed;
}

/**
 * Why the volume's snapshots must not be pruned now (its backups fail: the snapshots are the
 * recovery points left), or null. Pruning while the target was down lost recovery points in
 * Longhorn (#1164).
 */
export function backupsFailing(backups: readonly BackupFacts[], target: { available: boolean | null; message: string | null } | null, hasBackupJob: boolean): string | null {
  let newest: BackupFacts | null = null;
  for (const b of backups) {
    if (b.deleting) continue;
    if (newest === null || b.requestedAt > newest.requestedAt) newest = b;
  }
  if (newest !== null && newest.state === 'error') return `the last backup of the volume (${newest.name}) failed: ${newest.message ?? 'error'}`;
  if ((hasBackupJob || newest !== null) && target !== null && target.available === false) return `the backup target is unavailable: ${target.message ?? 'unreachable'}`;
  return null;
}

/**
 * snapshot-cleanup: snapshots that backups took themselves and nothing needs any more (their
 * backup is older than the newest completed one, failed, or was deleted). Snapshots a user or a
 * snapshot job took are never touched here.
 */
export function cleanupVictims(snapshots: readonly SnapshotNode[], backups: readonly BackupFacts[]): string[] {
  const needed = snapshotsBackupsNeed(backups);
  const referenced = new Map<string, BackupFacts[]>();
  for (const b of backups) referenced.set(b.snapshot, [...(referenced.get(b.snapshot) ?? []), b]);
  return snapshots
    .filter((s) => {
      if (needed.has(s.name)) return false;
      const refs = referenced.get(s.name);
      // Taken for a backup that no longer exists (deleted, or a crash before it was recorded).
      if (refs === undefined) return BACKUP_SNAPSHOT_NAME.test(s.name);
      return refs.every((b) => b.ownSnapshot);
    })
    .map((s) => s.name);
}

/** snapshot-delete: beyond the newest `retain` snapshots (and older than the maximum age), except those backups need. */
export function snapshotDeleteVictims(snapshots: readonly SnapshotNode[], backups: readonly BackupFacts[], retain: RecurringJobSpec['retain'], now: Date): string[] {
  const needed = snapshotsBackupsNeed(backups);
  return retentionVictims(snapshots, retain, now).filter((s) => !needed.has(s.name)).map((s) => s.name);
}
