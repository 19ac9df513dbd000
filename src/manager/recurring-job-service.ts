/**
 * The recurring-job operations the API and CLI use: create, list, get, update and delete jobs,
 * and say which jobs and groups a volume joins. Checks requests (recurring-jobs.ts) and records
 * what is wanted in the store; the scheduler in the manager runs the jobs.
 */
import { ZebuError, ErrorCode, invalid } from '../errors.ts';
import type { StoreObject } from '../store/store.ts';
import { Kind, type Objects, type RecurringJobValue, type RecurringJobResult } from '../cluster/objects.ts';
import type { EventRecorder } from './events.ts';
import { checkJobName, dueRun, jobsForVolume, validateRecurringJob, type RecurringJobInput, type RecurringTask } from './recurring-jobs.ts';

export interface RecurringJobView {
  name: string;
  task: RecurringTask;
  cron: string;
  timezone: string;
  retain: number;
  retainMaxAgeSeconds: number | null;
  concurrency: number;
  groups: string[];
  labels: Record<string, string>;
  createdAt: string;
  lastRunAt: string | null;
  nextRunAt: string | null;
  /** The volumes the job covers now (by name or group). */
  members: string[];
  /** Per volume, the last run's result. */
  results: { volume: string; result: RecurringJobResult; message: string | null; at: string }[];
}

export interface VolumeJobsInput {
  /** Jobs the volume joins by name (replaces the list); absent: unchanged. */
  recurringJobs?: unknown;
  /** Groups the volume joins (replaces the list); absent: unchanged. */
  recurringJobGroups?: unknown;
}

export interface RecurringJobServiceOptions {
  objects: Objects;
  events: EventRecorder;
  now?: () => Date;
  /** Wakes the scheduler (a job created or changed). */
  kick?: () => void;
}

export class RecurringJobServiceImpl {
  private readonly o: RecurringJobServiceOptions;
  private readonly now: () => Date;

  constructor(options: RecurringJobServiceOptions) {
    this.o = options;
    this.now = options.now ?? (() => new Date());
  }

  private async view(job: StoreObject<RecurringJobValue>): Promise<RecurringJobView> {
    const { spec, status } = job.value;
    const volumes = await this.o.objects.list(Kind.Volume);
    const members = volumes.filter((v) => jobsForVolume(v.value.spec, [{ name: job.name, spec }]).length > 0).map((v) => v.name).sort();
    return {
      name: job.name,
      task: spec.task,
      cron: spec.cron,
      timezone: spec.timezone,
      retain: spec.retain.count,
      retainMaxAgeSeconds: spec.retain.maxAgeSeconds,
      concurrency: spec.concurrency,
      groups: spec.groups,
      labels: spec.labels,
      createdAt: status.createdAt,
      lastRunAt: status.lastRunAt,
      nextRunAt: status.nextRunAt,
      members,
      results: Object.entries(status.volumes).map(([volume, r]) => ({ volume, ...r })).sort((a, b) => a.volume.localeCompare(b.volume)),
    };
  }

  async listRecurringJobs(): Promise<RecurringJobView[]> {
    const jobs = (await this.o.objects.list(Kind.RecurringJob)).sort((a, b) => a.name.localeCompare(b.name));
    return Promise.all(jobs.map((j) => this.view(j)));
  }

  async getRecurringJob(name: string): Promise<RecurringJobView> {
    return this.view(await this.mustJob(name));
  }

  private async mustJob(name: string): Promise<StoreObject<RecurringJobValue>> {
    const job = await this.o.objects.get(Kind.RecurringJob, name);
    if (job === null) throw new ZebuError(ErrorCode.NOT_FOUND, `recurring job ${name} not found`);
    return job;
  }

  async createRecurringJob(input: RecurringJobInput & { name?: unknown }): Promise<RecurringJobView> {
    const name = checkJobName(input.name);
    const spec = validateRecurringJob(input);
    const now = this.now();
    const value: RecurringJobValue = {
      spec,
      // A new job waits for its first scheduled time.
      status: { createdAt: now.toISOString(), lastRunFor: now.toISOString(), lastRunAt: null, nextRunAt: isoOrNull(dueRun(spec, now, now).next), volumes: {} },
    };
    try {
      await this.o.objects.create(Kind.RecurringJob, name, value);
    } catch (err) {
      if (err instanceof ZebuError && err.code === ErrorCode.EXISTS) throw new ZebuError(ErrorCode.EXISTS, `recurring job ${name} already exists`, { field: 'name' });
      throw err;
    }
    this.o.kick?.();
    await this.o.events.record({ type: 'Normal', reason: 'RecurringJobCreated', kind: Kind.RecurringJob, object: name, volume: null, message: `${spec.task} on "${spec.cron}" (${spec.timezone}), retain ${spec.retain.count}` });
    return this.getRecurringJob(name);
  }

  /** Changes the fields given; the result is checked as a whole. A new schedule starts from now. */
  async updateRecurringJob(name: string, input: RecurringJobInput): Promise<RecurringJobView> {
    const current = await this.mustJob(name);
    const old = current.value.spec;
    const spec = validateRecurringJob({
      task: input.task ?? old.task,
      cron: input.cron ?? old.cron,
      timezone: input.timezone ?? old.timezone,
      retain: input.retain ?? old.retain.count,
      retainMaxAgeSeconds: input.retainMaxAgeSeconds === undefined ? old.retain.maxAgeSeconds : input.retainMaxAgeSeconds,
      concurrency: input.concurrency ?? old.concurrency,
      groups: input.groups ?? old.groups,
      labels: input.labels ?? old.labels,
    });
    const now = this.now();
    await this.o.objects.mutate(Kind.RecurringJob, name, (value) => {
      const rescheduled = value.spec.cron !== spec.cron || value.spec.timezone !== spec.timezone;
      value.spec = spec;
      if (rescheduled) {
        value.status.lastRunFor = now.toISOString();
        value.status.nextRunAt = isoOrNull(dueRun(spec, now, now).next);
      }
    });
    await this.o.events.record({ type: 'Normal', reason: 'RecurringJobUpdated', kind: Kind.RecurringJob, object: name, volume: null, message: `${spec.task} on "${spec.cron}" (${spec.timezone}), retain ${spec.retain.count}` });
    return this.getRecurringJob(name);
  }

  /** Deletes a job; volumes that named it no longer do (what it created stays). */
  async deleteRecurringJob(name: string): Promise<RecurringJobView> {
    const view = await this.getRecurringJob(name);
    for (const volume of await this.o.objects.list(Kind.Volume)) {
      if (!(volume.value.spec.recurringJobs ?? []).includes(name)) continue;
      await this.o.objects.mutate(Kind.Volume, volume.name, (v) => {
        v.spec.recurringJobs = (v.spec.recurringJobs ?? []).filter((j) => j !== name);
      });
    }
    await this.o.objects.remove(Kind.RecurringJob, name);
    await this.o.events.record({ type: 'Normal', reason: 'RecurringJobDeleted', kind: Kind.RecurringJob, object: name, volume: null, message: 'deleted; the snapshots and backups it made are kept' });
    return view;
  }

  /**
   * Which jobs (by name) and groups a volume joins. A job must exist; a group must be one some job
   * is in (a typo would otherwise leave the volume with no protection and no error).
   */
  async setVolumeJobs(volume: string, input: VolumeJobsInput): Promise<{ volume: string; recurringJobs: string[]; recurringJobGroups: string[]; jobs: string[] }> {
    const vol = await this.o.objects.get(Kind.Volume, volume);
    if (vol === null) throw new ZebuError(ErrorCode.NOT_FOUND, `volume ${volume} not found`);
    const jobs = await this.o.objects.list(Kind.RecurringJob);
    const names = input.recurringJobs === undefined ? undefined : nameList(input.recurringJobs, 'recurringJobs');
    const groups = input.recurringJobGroups === undefined ? undefined : nameList(input.recurringJobGroups, 'recurringJobGroups');
    for (const n of names ?? []) {
      if (!jobs.some((j) => j.name === n)) throw new ZebuError(ErrorCode.NOT_FOUND, `recurring job ${n} not found`, { field: 'recurringJobs' });
    }
    for (const g of groups ?? []) {
      if (!jobs.some((j) => j.value.spec.groups.includes(g))) throw invalid(`no recurring job is in group ${g} (the groups of the jobs: ${[...new Set(jobs.flatMap((j) => j.value.spec.groups))].sort().join(', ') || 'none'})`, 'recurringJobGroups');
    }
    const updated = await this.o.objects.mutate(Kind.Volume, volume, (v) => {
      if (names !== undefined) v.spec.recurringJobs = names;
      if (groups !== undefined) v.spec.recurringJobGroups = groups;
    });
    const spec = updated!.value.spec;
    return {
      volume,
      recurringJobs: spec.recurringJobs ?? [],
      recurringJobGroups: spec.recurringJobGroups ?? [],
      jobs: jobsForVolume(spec, jobs.map((j) => ({ name: j.name, spec: j.value.spec }))).map((j) => j.name).sort(),
    };
  }
}

function nameList(value: unknown, field: string): string[] {
  if (!Array.isArray(value)) throw invalid(`${field} must be a list of names`, field);
  return [...new Set(value.map((n) => checkJobName(n, field)))].sort();
}

function isoOrNull(d: Date | null): string | null {
  return d === null ? null : d.toISOString();
}
