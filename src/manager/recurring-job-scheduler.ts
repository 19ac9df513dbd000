/**
 * The recurring-job scheduler in the manager: looks at every job once per poll, starts the runs
 * that are due (recurring-jobs.ts dueRun: a missed run runs once after the manager was down),
 * processes a job's volumes `concurrency` at a time, and keeps the job's last run, next run and
 * per-volume result in the store.
 *
 * - One task on a volume at a time: two jobs due together on one volume run one after the other.
 * - A run is recorded (`running` per volume) before its tasks start. A manager that stops or is
 *   killed mid-run finds those at its next start and runs them again; a volume a job had attached
 *   for a job that no longer exists is detached.
 * - Each volume with a backup job whose recovery point is older than twice the job's interval
 *   gets one warning event (again once it was fresh in between).
 */
import type { StoreObject } from '../store/store.ts';
import { Kind, type Objects, type RecurringJobValue, type VolumeValue } from '../cluster/objects.ts';
import type { EventRecorder } from './events.ts';
import { dueRun, jobsForVolume } from './recurring-jobs.ts';
import { isBackupTask, jobIntervalSeconds, volumeProtection } from './protection.ts';
import type { JobTasks, TaskOutcome } from './recurring-job-tasks.ts';

export interface RecurringJobSchedulerOptions {
  objects: Objects;
  events: EventRecorder;
  tasks: JobTasks;
  /** How often jobs are looked at (default 1 s: cron allows seconds). */
  pollMs?: number;
  /** How often recovery points are checked (default 30 s). */
  staleCheckMs?: number;
  now?: () => Date;
  log?: (event: Record<string, unknown>) => void;
}

export class RecurringJobScheduler {
  private readonly o: RecurringJobSchedulerOptions;
  private readonly now: () => Date;
  private readonly log: (event: Record<string, unknown>) => void;
  /** Runs under way, by job. */
  private readonly runs = new Map<string, Promise<void>>();
  /** The tail of each volume's queue of tasks. */
  private readonly volumeTail = new Map<string, Promise<unknown>>();
  private readonly abort = new AbortController();
  private timer: NodeJS.Timeout | null = null;
  private ticking: Promise<void> | null = null;
  private recovered = false;
  private lastStaleCheckMs = 0;

  constructor(options: RecurringJobSchedulerOptions) {
    this.o = options;
    this.now = options.now ?? (() => new Date());
    this.log = options.log ?? (() => {});
  }

  start(): void {
    this.kick();
    this.timer = setInterval(() => this.kick(), this.o.pollMs ?? 1000);
    this.timer.unref();
  }

  /** Looks at the jobs now (one look at a time). */
  kick(): void {
    if (this.abort.signal.aborted || this.ticking !== null) return;
    this.ticking = this.tick()
      .catch((err) => this.log({ event: 'recurring-job-tick-failed', error: (err as Error).message }))
      .finally(() => {
        this.ticking = null;
      });
  }

  /** Stops looking and abandons the tasks under way (they run again at the next start). */
  async stop(): Promise<void> {
    if (this.timer !== null) clearInterval(this.timer);
    this.abort.abort(new Error('the manager is stopping'));
    await this.ticking;
    await Promise.allSettled([...this.runs.values()]);
  }

  /** Resolves when no run is under way (tests). */
  async idle(): Promise<void> {
    while (this.ticking !== null || this.runs.size > 0) await Promise.allSettled([this.ticking, ...this.runs.values()]);
  }

  private async tick(): Promise<void> {
    const jobs = await this.o.objects.list(Kind.RecurringJob);
    const volumes = await this.o.objects.list(Kind.Volume);
    if (!this.recovered) {
      this.recovered = true;
      await this.recover(jobs, volumes);
    }
    const now = this.now();
    for (const job of jobs) {
      if (this.runs.has(job.name)) continue;
      let due;
      try {
        due = dueRun(job.value.spec, new Date(job.value.status.lastRunFor), now);
      } catch (err) {
        this.log({ event: 'recurring-job-schedule-failed', job: job.name, error: (err as Error).message });
        continue;
      }
      const nextRunAt = due.next === null ? null : due.next.toISOString();
      if (!due.due) {
        if (job.value.status.nextRunAt !== nextRunAt) {
          await this.o.objects.mutate(Kind.RecurringJob, job.name, (x) => {
            x.status.nextRunAt = nextRunAt;
          });
        }
        continue;
      }
      const members = volumes
        .filter((v) => v.value.deletionRequestedAt === null && jobsForVolume(v.value.spec, [{ name: job.name, spec: job.value.spec }]).length > 0)
        .map((v) => v.name)
        .sort();
      const at = now.toISOString();
      const started = await this.o.objects.mutate(Kind.RecurringJob, job.name, (x) => {
        // Another look (or the job was updated) got here first.
        if (x.status.lastRunFor !== job.value.status.lastRunFor) return false;
        x.status.lastRunFor = at;
        x.status.lastRunAt = at;
        x.status.nextRunAt = nextRunAt;
        const results: RecurringJobValue['status']['volumes'] = {};
        for (const m of members) results[m] = { result: 'running', message: null, at };
        x.status.volumes = results;
      });
      if (started === null || started.value.status.lastRunFor !== at) continue;
      this.startRun(started, members);
    }
    if (Date.now() - this.lastStaleCheckMs >= (this.o.staleCheckMs ?? 30_000)) {
      this.lastStaleCheckMs = Date.now();
      await this.checkRecoveryPoints(jobs, volumes);
    }
  }

  /** After a start: tasks a stopped manager left `running` run again; attachments of vanished jobs end. */
  private async recover(jobs: StoreObject<RecurringJobValue>[], volumes: StoreObject<VolumeValue>[]): Promise<void> {
    const names = new Set(jobs.map((j) => j.name));
    for (const v of volumes) {
      const held = v.value.spec.jobAttachment ?? null;
      if (held !== null && !names.has(held.job)) {
        await this.o.tasks.release(held.job, v.name);
        this.log({ event: 'recurring-job-attachment-released', volume: v.name, job: held.job });
      }
    }
    for (const job of jobs) {
      const unfinished = Object.entries(job.value.status.volumes).filter(([, r]) => r.result === 'running').map(([volume]) => volume).sort();
      if (unfinished.length === 0) continue;
      await this.o.events.record({
        type: 'Normal', reason: 'RecurringJobResumed', kind: Kind.RecurringJob, object: job.name, volume: null,
        message: `the manager stopped during the run of ${job.value.status.lastRunAt}: its task runs again on ${unfinished.join(', ')}`,
      });
      this.startRun(job, unfinished);
    }
  }

  private startRun(job: StoreObject<RecurringJobValue>, members: string[]): void {
    const run = this.runJob(job, members)
      .catch((err) => this.log({ event: 'recurring-job-run-failed', job: job.name, error: (err as Error).message }))
      .finally(() => {
        this.runs.delete(job.name);
      });
    this.runs.set(job.name, run);
  }

  private async runJob(job: StoreObject<RecurringJobValue>, members: string[]): Promise<void> {
    const queue = [...members];
    const worker = async (): Promise<void> => {
      for (let volume = queue.shift(); volume !== undefined; volume = queue.shift()) {
        if (this.abort.signal.aborted) return;
        const outcome = await this.onVolume(volume, () => this.o.tasks.run(job, volume!, this.abort.signal));
        if (outcome === null) return;
        await this.record(job.name, volume, outcome);
      }
    };
    await Promise.all(Array.from({ length: Math.min(job.value.spec.concurrency, Math.max(1, members.length)) }, worker));
  }

  /** Runs `task` once every task queued before it on the volume has ended; null when stopping. */
  private async onVolume(volume: string, task: () => Promise<TaskOutcome>): Promise<TaskOutcome | null> {
    const before = this.volumeTail.get(volume) ?? Promise.resolve();
    const mine = before.then(async () => (this.abort.signal.aborted ? null : task())).catch((err) => (this.abort.signal.aborted ? null : { result: 'error' as const, message: (err as Error).message }));
    this.volumeTail.set(volume, mine);
    try {
      return await mine;
    } finally {
      if (this.volumeTail.get(volume) === mine) this.volumeTail.delete(volume);
    }
  }

  private async record(job: string, volume: string, outcome: TaskOutcome): Promise<void> {
    let previous: string | null = null;
    await this.o.objects.mutate(Kind.RecurringJob, job, (x) => {
      previous = x.status.volumes[volume]?.result ?? null;
      x.status.volumes[volume] = { result: outcome.result, message: outcome.message, at: this.now().toISOString() };
    });
    this.log({ event: 'recurring-job-result', job, volume, ...outcome });
    if (outcome.result === 'error') {
      await this.o.events.record({ type: 'Warning', reason: 'RecurringJobFailed', kind: Kind.RecurringJob, object: job, volume, message: `recurring job ${job} on volume ${volume}: ${outcome.message}` });
    } else if (outcome.result === 'suspended' && previous !== 'suspended') {
      await this.o.events.record({ type: 'Normal', reason: 'RecurringJobSuspended', kind: Kind.RecurringJob, object: job, volume, message: `recurring job ${job} on volume ${volume}: ${outcome.message}` });
    }
  }

  /** One warning per volume whose recovery point is older than twice its backup job's interval. */
  private async checkRecoveryPoints(jobs: StoreObject<RecurringJobValue>[], volumes: StoreObject<VolumeValue>[]): Promise<void> {
    const backupJobs = jobs.filter((j) => isBackupTask(j.value.spec.task));
    if (backupJobs.length === 0) return;
    const backups = await this.o.objects.list(Kind.Backup);
    const now = this.now();
    for (const v of volumes) {
      if (v.value.deletionRequestedAt !== null || v.value.spec.restore?.standby === true) continue;
      const mine = jobsForVolume(v.value.spec, backupJobs.map((j) => ({ name: j.name, spec: j.value.spec, status: j.value.status })));
      let limitS: number | null = null;
      let since = Date.parse(v.value.createdAt);
      for (const j of mine) {
        const interval = jobIntervalSeconds(j.spec, now);
        if (interval !== null) limitS = Math.min(limitS ?? Infinity, 2 * interval);
        since = Math.max(since, Date.parse(j.status.createdAt));
      }
      if (limitS === null) continue;
      const protection = volumeProtection(v.name, v.value, backups, jobs, now);
      const ageS = protection.recoveryPointAgeSeconds ?? (now.getTime() - since) / 1000;
      const stale = ageS > limitS;
      const warned = (v.value.status.recoveryPointWarnedAt ?? null) !== null;
      if (stale === warned) continue;
      await this.o.objects.mutate(Kind.Volume, v.name, (x) => {
        x.status.recoveryPointWarnedAt = stale ? now.toISOString() : null;
      });
      if (stale) {
        await this.o.events.record({
          type: 'Warning', reason: 'RecoveryPointStale', kind: Kind.Volume, object: v.name, volume: v.name,
          message: protection.recoveryPointAt === null
            ? `volume ${v.name} has no backup although its backup job(s) ${mine.map((j) => j.name).join(', ')} should have made one by now (limit ${Math.round(limitS)} s: twice the job's interval)`
            : `the newest data of volume ${v.name} in a backup is from ${protection.recoveryPointAt} (${Math.round(ageS)} s ago), older than twice its backup job's interval (${Math.round(limitS)} s)`,
        });
      }
    }
  }
}
