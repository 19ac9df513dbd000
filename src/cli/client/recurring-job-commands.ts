/**
 * The `zebu recurring-job …` commands and `zebu volume update NAME --recurring-job J
 * --recurring-job-group G`. Same output contract as commands.ts: `--json` prints what the API
 * returned; tables otherwise.
 */
import { invalid } from '../../errors.ts';
import type { RecurringJobView } from '../../manager/recurring-job-service.ts';
import { parsePositiveInt } from '../units.ts';
import { ApiClient } from './api-client.ts';
import { keyValues, printJson, table } from './format.ts';
import { enc, jobResultText, out, type CommonOptions } from './commands.ts';
import { parseLabels } from './backup-commands.ts';

export interface RecurringJobOptions extends CommonOptions {
  task?: string;
  cron?: string;
  timezone?: string;
  retain?: string;
  retainMaxAge?: string;
  concurrency?: string;
  group?: string[];
  label?: string[];
}

/** "30d", "12h", "90m", "3600s" or plain seconds. */
function parseAge(text: string): number {
  const m = /^(\d+)([smhd]?)$/.exec(text.trim());
  if (m === null) throw invalid(`--retain-max-age must be a number of seconds or with a unit (90m, 12h, 30d), got ${JSON.stringify(text)}`, 'retain-max-age');
  return Number(m[1]) * { '': 1, s: 1, m: 60, h: 3600, d: 86400 }[m[2] as '' | 's' | 'm' | 'h' | 'd'];
}

/** The fields given on the command line, as the API takes them. */
function jobBody(o: RecurringJobOptions): Record<string, unknown> {
  const body: Record<string, unknown> = {};
  if (o.task !== undefined) body.task = o.task;
  if (o.cron !== undefined) body.cron = o.cron;
  if (o.timezone !== undefined) body.timezone = o.timezone;
  if (o.retain !== undefined) body.retain = parsePositiveInt(o.retain, '--retain');
  if (o.retainMaxAge !== undefined) body.retainMaxAgeSeconds = o.retainMaxAge === 'none' ? null : parseAge(o.retainMaxAge);
  if (o.concurrency !== undefined) body.concurrency = parsePositiveInt(o.concurrency, '--concurrency');
  if (o.group !== undefined) body.groups = o.group;
  if (o.label !== undefined) body.labels = parseLabels(o.label);
  return body;
}

function lastResults(j: RecurringJobView): string {
  return j.results.length === 0 ? '-' : j.results.map((r) => `${r.volume}: ${jobResultText(r.result, r.message)}`).join('; ');
}

function details(j: RecurringJobView): string {
  return keyValues([
    ['name', j.name],
    ['task', j.task],
    ['schedule', `${j.cron} (${j.timezone})`],
    ['retain', j.retainMaxAgeSeconds === null ? j.retain : `${j.retain}, none older than ${j.retainMaxAgeSeconds} s (the newest is always kept)`],
    ['concurrency', j.concurrency],
    ['groups', j.groups.length === 0 ? null : j.groups.join(', ')],
    ['labels', Object.keys(j.labels).length === 0 ? null : Object.entries(j.labels).map(([k, v]) => `${k}=${v}`).join(', ')],
    ['volumes', j.members.length === 0 ? null : j.members.join(', ')],
    ['next run', j.nextRunAt],
    ['last run', j.lastRunAt],
    ['last results', lastResults(j)],
  ]);
}

export async function recurringJobCreate(name: string, options: RecurringJobOptions): Promise<void> {
  const job = await new ApiClient(options).post<RecurringJobView>('/v1/recurringjobs', { name, ...jobBody(options) });
  if (options.json) return printJson(job);
  out(details(job));
}

export async function recurringJobUpdate(name: string, options: RecurringJobOptions): Promise<void> {
  const body = jobBody(options);
  if (Object.keys(body).length === 0) throw invalid('nothing to change: give at least one of --task, --cron, --timezone, --retain, --retain-max-age, --concurrency, --group, --label');
  const job = await new ApiClient(options).patch<RecurringJobView>(`/v1/recurringjobs/${enc(name)}`, body);
  if (options.json) return printJson(job);
  out(details(job));
}

export async function recurringJobList(options: CommonOptions): Promise<void> {
  const jobs = await new ApiClient(options).get<RecurringJobView[]>('/v1/recurringjobs');
  if (options.json) return printJson(jobs);
  out(table(['NAME', 'TASK', 'SCHEDULE', 'RETAIN', 'GROUPS', 'VOLUMES', 'NEXT RUN', 'LAST RUN', 'LAST RESULTS'], jobs.map((j) => [
    j.name, j.task, `${j.cron} (${j.timezone})`, j.retain, j.groups.join(',') || '-', j.members.length, j.nextRunAt ?? '-', j.lastRunAt ?? '-', lastResults(j),
  ])));
}

export async function recurringJobGet(name: string, options: CommonOptions): Promise<void> {
  const job = await new ApiClient(options).get<RecurringJobView>(`/v1/recurringjobs/${enc(name)}`);
  if (options.json) return printJson(job);
  out(details(job));
}

export async function recurringJobDelete(name: string, options: CommonOptions): Promise<void> {
  await new ApiClient(options).delete<RecurringJobView>(`/v1/recurringjobs/${enc(name)}`);
  out(`recurring job ${name} deleted (the snapshots and backups it made are kept)`);
}

export async function volumeUpdateJobs(volume: string, options: CommonOptions & { recurringJob?: string[]; recurringJobGroup?: string[]; clearRecurringJobs?: boolean }): Promise<void> {
  const body: Record<string, unknown> = {};
  if (options.clearRecurringJobs === true) {
    body.recurringJobs = [];
    body.recurringJobGroups = [];
  }
  if (options.recurringJob !== undefined) body.recurringJobs = options.recurringJob;
  if (options.recurringJobGroup !== undefined) body.recurringJobGroups = options.recurringJobGroup;
  if (Object.keys(body).length === 0) throw invalid('nothing to change: give --data-locality, --recurring-job, --recurring-job-group or --clear-recurring-jobs');
  const result = await new ApiClient(options).put<{ volume: string; recurringJobs: string[]; recurringJobGroups: string[]; jobs: string[] }>(`/v1/volumes/${enc(volume)}/recurringjobs`, body);
  if (options.json) return printJson(result);
  out(keyValues([
    ['volume', result.volume],
    ['recurring jobs', result.recurringJobs.length === 0 ? null : result.recurringJobs.join(', ')],
    ['groups', result.recurringJobGroups.length > 0 ? result.recurringJobGroups.join(', ') : result.recurringJobs.length === 0 ? 'default (none named)' : null],
    ['covered by', result.jobs.length === 0 ? 'no job' : result.jobs.join(', ')],
  ]));
}
