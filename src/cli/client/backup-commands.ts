/**
 * The `zebu backup-target …` and `zebu backup …` commands, and restoring (`volume create
 * --from-backup`, `volume activate`). Same output contract as commands.ts: `--json` prints what
 * the API returned; long work (a backup, a restore) waits with a progress bar on a terminal and
 * fails (exit 1) with the reason when the work ends in error.
 */
import fs from 'node:fs';
import { ErrorCode, ZebuError, invalid } from '../../errors.ts';
import type { VolumeView } from '../../manager/types.ts';
import type { BackupGcView, BackupSyncResult, BackupTargetView, BackupView } from '../../manager/backup-types.ts';
import type { TargetVerifyResult } from '../../backup/verify-target.ts';
import { parsePositiveInt, parseBytes } from '../units.ts';
import { ApiClient } from './api-client.ts';
import { formatBytes, formatPercent, keyValues, printJson, table } from './format.ts';
import { POLL_INTERVAL_MS, progressBar, waitForVolume } from './wait.ts';
import { enc, out, timeoutMs, type CommonOptions, type WaitingOptions } from './commands.ts';

/** Verify, sync and collection answer when done: long for a large target. */
const LONG_REQUEST_MS = 6 * 3600 * 1000;
/** A backup or a restore of a large volume takes a while: wait an hour unless told. */
const BACKUP_WAIT_SECONDS = 3600;

function rate(bytesPerSecond: number): string {
  return `${formatBytes(Math.round(bytesPerSecond))}/s`;
}

// ---- target -----------------------------------------------------------------------------------

/**
 * Reads S3 credentials from a file: JSON {"accessKeyId", "secretAccessKey"} or the AWS variables
 * (AWS_ACCESS_KEY_ID=…, AWS_SECRET_ACCESS_KEY=…, AWS_SESSION_TOKEN=…), one per line.
 */
export function readCredentialFile(file: string): { accessKeyId: string; secretAccessKey: string; sessionToken?: string } {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (err) {
    throw invalid(`cannot read the credential file ${file}: ${(err as Error).message}`, 'credential-file');
  }
  let accessKeyId: string | undefined;
  let secretAccessKey: string | undefined;
  let sessionToken: string | undefined;
  const trimmed = text.trim();
  if (trimmed.startsWith('{')) {
    try {
      const doc = JSON.parse(trimmed) as Record<string, unknown>;
      accessKeyId = typeof doc.accessKeyId === 'string' ? doc.accessKeyId : undefined;
      secretAccessKey = typeof doc.secretAccessKey === 'string' ? doc.secretAccessKey : undefined;
      sessionToken = typeof doc.sessionToken === 'string' ? doc.sessionToken : undefined;
    } catch {
      throw invalid(`the credential file ${file} is not valid JSON`, 'credential-file');
    }
  } else {
    for (const line of trimmed.split('\n')) {
      const m = /^\s*(?:export\s+)?([A-Z_]+)\s*=\s*"?([^"\s]*)"?\s*$/.exec(line);
      if (m === null) continue;
      if (m[1] === 'AWS_ACCESS_KEY_ID') accessKeyId = m[2];
      if (m[1] === 'AWS_SECRET_ACCESS_KEY') secretAccessKey = m[2];
      if (m[1] === 'AWS_SESSION_TOKEN') sessionToken = m[2];
    }
  }
  if (!accessKeyId || !secretAccessKey) {
    throw invalid(`the credential file ${file} has no access key id and secret access key (JSON {"accessKeyId", "secretAccessKey"} or AWS_ACCESS_KEY_ID= and AWS_SECRET_ACCESS_KEY= lines)`, 'credential-file');
  }
  return { accessKeyId, secretAccessKey, ...(sessionToken ? { sessionToken } : {}) };
}

function targetDetails(t: BackupTargetView): string {
  return keyValues([
    ['url', t.url],
    ['endpoint', t.endpoint],
    ['region', t.region],
    ['credentials', t.credentials],
    ['available', t.available === null ? 'not checked yet' : t.available],
    ['message', t.message],
    ['checked', t.checkedAt],
    ['last sync', t.lastSyncAt],
    ['last collection', t.lastGcAt === null ? null : `${t.lastGcAt}: ${t.lastGc?.removedBlocks ?? 0} block(s) removed after ${t.lastGc?.tombstones ?? 0} deleted backup(s)`],
    ['backups', t.backups],
  ]);
}

export async function backupTargetSet(url: string, options: CommonOptions & { endpoint?: string; region?: string; credentialFile?: string }): Promise<void> {
  const body: Record<string, unknown> = { url };
  if (options.endpoint !== undefined) body.endpoint = options.endpoint;
  if (options.region !== undefined) body.region = options.region;
  if (options.credentialFile !== undefined) body.credentials = readCredentialFile(options.credentialFile);
  const target = await new ApiClient(options).put<BackupTargetView>('/v1/backuptargets/default', body);
  if (options.json) return printJson(target);
  out(targetDetails(target));
  if (target.available !== true) throw new ZebuError(ErrorCode.EIO, `the backup target is set but not usable: ${target.message}`);
}

export async function backupTargetGet(options: CommonOptions): Promise<void> {
  const target = await new ApiClient(options).get<BackupTargetView>('/v1/backuptargets/default');
  if (options.json) return printJson(target);
  out(targetDetails(target));
}

export async function backupTargetCheck(options: CommonOptions): Promise<void> {
  const target = await new ApiClient(options).post<BackupTargetView>('/v1/backuptargets/default/check', undefined, { timeoutMs: LONG_REQUEST_MS });
  if (options.json) printJson(target);
  else out(target.available === true ? `backup target ${target.url} is reachable and writable` : `backup target ${target.url}: ${target.message}`);
  if (target.available !== true) throw new ZebuError(ErrorCode.EIO, `backup target ${target.url} is not usable: ${target.message}`);
}

export async function backupTargetSync(options: CommonOptions): Promise<void> {
  const result = await new ApiClient(options).post<BackupSyncResult>('/v1/backuptargets/default/sync', undefined, { timeoutMs: LONG_REQUEST_MS });
  if (options.json) return printJson(result);
  out(`catalog synced: ${result.volumes} volume(s) on the target, ${result.added.length} backup(s) added${result.added.length > 0 ? ` (${result.added.join(', ')})` : ''}, ${result.removed.length} removed${result.removed.length > 0 ? ` (${result.removed.join(', ')})` : ''}`);
}

export async function backupTargetGc(options: CommonOptions): Promise<void> {
  const result = await new ApiClient(options).post<BackupGcView>('/v1/backuptargets/default/gc', undefined, { timeoutMs: LONG_REQUEST_MS });
  if (options.json) return printJson(result);
  out(`${result.removedBlocks} unreferenced block(s) removed after ${result.tombstones} deleted backup(s) (${result.manifestsRead} manifest(s) read${result.keptClaimed > 0 ? `, ${result.keptClaimed} kept for a running backup` : ''})`);
}

/** Prints the report; fails (exit 1) when a block is missing or corrupt. */
export async function backupTargetVerify(options: CommonOptions & { volume?: string }): Promise<void> {
  const body = options.volume !== undefined ? { volume: options.volume } : {};
  const report = await new ApiClient(options).post<TargetVerifyResult>('/v1/backuptargets/default/verify', body, { timeoutMs: LONG_REQUEST_MS });
  if (options.json) printJson(report);
  else {
    let text = table(['BACKUP', 'VOLUME', 'BLOCKS', 'MISSING', 'CORRUPT'], report.backups.map((b) => [
      b.backup, b.volume, b.blocks, b.manifestError !== null ? `manifest: ${b.manifestError}` : b.problems.filter((p) => p.problem === 'missing').length, b.problems.filter((p) => p.problem === 'corrupt').length,
    ]));
    const problems = report.backups.flatMap((b) => b.problems.map((p) => [b.backup, p.problem, p.offset, p.hash]));
    if (problems.length > 0) text += `\n${table(['BACKUP', 'PROBLEM', 'OFFSET', 'BLOCK'], problems)}`;
    text += `\n${report.blocksChecked} block(s) checked (${formatBytes(report.bytesRead)} read) in ${(report.durationMs / 1000).toFixed(1)} s: ${report.missingBlocks} missing, ${report.corruptBlocks} corrupt`;
    out(text);
  }
  const damaged = report.backups.filter((b) => b.problems.length > 0 || b.manifestError !== null).map((b) => b.backup);
  if (damaged.length > 0) throw new ZebuError(ErrorCode.EIO, `backup(s) ${damaged.join(', ')} on ${report.url} cannot be restored whole`);
}

// ---- backups ----------------------------------------------------------------------------------

function backupTable(backups: BackupView[]): string {
  return table(
    ['NAME', 'VOLUME', 'SNAPSHOT', 'STATE', 'PROGRESS', 'SIZE', 'UPLOADED', 'COMPLETED', 'MESSAGE'],
    backups.map((b) => [
      b.name, b.volume, b.snapshot, b.deleting ? 'deleting' : b.state, formatPercent(b.progress), formatBytes(b.sizeBytes),
      b.uploadedBytes === null ? null : formatBytes(b.uploadedBytes), b.completedAt, b.message,
    ]),
  );
}

function backupDetails(b: BackupView): string {
  return keyValues([
    ['name', b.name],
    ['volume', b.volume],
    ['snapshot', b.snapshot],
    ['state', b.deleting ? `${b.state} (deleting)` : b.state],
    ['progress', `${formatPercent(b.progress)} (${formatBytes(b.doneBytes)} of ${formatBytes(b.totalBytes)} to read${b.bytesPerSecond > 0 ? `, ${rate(b.bytesPerSecond)}` : ''})`],
    ['message', b.message],
    ['target', b.url],
    ['size', `${formatBytes(b.sizeBytes)} (${b.sizeBytes} bytes)`],
    ['incremental from', b.base],
    ['backing image', b.backingImage === null ? null : `${b.backingImage.name} (sha512 ${b.backingImage.checksum.slice(0, 16)}…; its bytes are in the backup)`],
    ['blocks', b.blocks],
    ['read', b.readBytes === null ? null : formatBytes(b.readBytes)],
    ['uploaded', b.uploadedBytes === null ? null : formatBytes(b.uploadedBytes)],
    ['labels', Object.keys(b.labels).length === 0 ? null : Object.entries(b.labels).map(([k, v]) => `${k}=${v}`).join(', ')],
    ['requested', b.requestedAt],
    ['started', b.startedAt],
    ['completed', b.completedAt],
  ]);
}

export function parseLabels(labels: string[] | undefined): Record<string, string> {
  const out: Record<string, string> = {};
  for (const label of labels ?? []) {
    const eq = label.indexOf('=');
    if (eq <= 0) throw invalid(`--label must be KEY=VALUE, got ${JSON.stringify(label)}`, 'label');
    out[label.slice(0, eq)] = label.slice(eq + 1);
  }
  return out;
}

async function waitForBackup(client: ApiClient, name: string, wait: number): Promise<BackupView> {
  const deadline = Date.now() + wait;
  const bar = await progressBar(`backup ${name}`);
  try {
    for (;;) {
      const b = await client.get<BackupView>(`/v1/backups/${enc(name)}`);
      bar?.update({ fraction: b.progress, label: `${b.state}${b.bytesPerSecond > 0 ? `, ${rate(b.bytesPerSecond)}` : ''}` });
      if (b.state === 'completed' || b.state === 'error') return b;
      if (Date.now() >= deadline) throw new ZebuError(ErrorCode.TIMEOUT, `timed out after ${wait / 1000} s waiting for backup ${name} (${b.state}, ${formatPercent(b.progress)}${b.message !== null ? `: ${b.message}` : ''})`);
      await new Promise((resolve) => setTimeout(resolve, POLL_INTERVAL_MS));
    }
  } finally {
    bar?.stop();
  }
}

export async function backupCreate(volume: string, options: WaitingOptions & { snapshot?: string; label?: string[] }): Promise<void> {
  const client = new ApiClient(options);
  const body: Record<string, unknown> = { volume, labels: parseLabels(options.label) };
  if (options.snapshot !== undefined) body.snapshot = options.snapshot;
  let backup = await client.post<BackupView>('/v1/backups', body);
  if (options.wait !== false) backup = await waitForBackup(client, backup.name, timeoutMs(options, BACKUP_WAIT_SECONDS));
  if (options.json) printJson(backup);
  else if (options.wait === false) out(backup.name);
  else out(`backup ${backup.name} of volume ${volume} ${backup.state}${backup.state === 'completed' ? `: ${backup.blocks} block(s), ${formatBytes(backup.uploadedBytes ?? 0)} uploaded, ${formatBytes(backup.readBytes ?? 0)} read${backup.base !== null ? ` (incremental from ${backup.base})` : ''}` : ''}`);
  if (backup.state === 'error') throw new ZebuError(ErrorCode.EIO, `backup ${backup.name} of volume ${volume} failed: ${backup.message}`);
}

export async function backupList(options: CommonOptions & { volume?: string }): Promise<void> {
  const query = options.volume !== undefined ? `?volume=${enc(options.volume)}` : '';
  const backups = await new ApiClient(options).get<BackupView[]>(`/v1/backups${query}`);
  if (options.json) return printJson(backups);
  out(backupTable(backups));
}

export async function backupGet(name: string, options: CommonOptions): Promise<void> {
  const backup = await new ApiClient(options).get<BackupView>(`/v1/backups/${enc(name)}`);
  if (options.json) return printJson(backup);
  out(backupDetails(backup));
}

export async function backupDelete(name: string, options: WaitingOptions): Promise<void> {
  const client = new ApiClient(options);
  await client.delete<BackupView>(`/v1/backups/${enc(name)}`);
  if (options.wait !== false) {
    const deadline = Date.now() + timeoutMs(options, BACKUP_WAIT_SECONDS);
    for (;;) {
      try {
        const b = await client.get<BackupView>(`/v1/backups/${enc(name)}`);
        if (Date.now() >= deadline) throw new ZebuError(ErrorCode.TIMEOUT, `timed out waiting for backup ${name} to be deleted (${b.message ?? b.state})`);
      } catch (err) {
        if ((err as { status?: number }).status === 404) break;
        throw err;
      }
      await new Promise((resolve) => setTimeout(resolve, POLL_INTERVAL_MS));
    }
  }
  out(`backup ${name} deleted`);
}

// ---- restore ------------------------------------------------------------------------------------

/** Waits for a restore (or a standby's first apply) to end; fails with the reason when it failed. */
async function waitForRestore(client: ApiClient, name: string, wait: number): Promise<VolumeView> {
  const volume = await waitForVolume(client, name, {
    what: `volume ${name} to be restored`,
    timeoutMs: wait,
    done: (v) => v === null || v.restore === null || v.restore.state === 'error' || (v.restore.applied !== null && v.restore.state === 'completed' && (v.restore.standby || v.state === 'detached')),
    progress: (v) => ({
      fraction: v.restore?.progress ?? 0,
      label: v.restore === null ? v.state : `${v.restore.state} ${v.restore.backup}${v.restore.bytesPerSecond > 0 ? `, ${rate(v.restore.bytesPerSecond)}` : ''}`,
    }),
  });
  if (volume === null) throw new ZebuError(ErrorCode.NOT_FOUND, `volume ${name} was deleted while restoring`);
  if (volume.restore?.state === 'error') throw new ZebuError(ErrorCode.EIO, `restore into volume ${name} failed: ${volume.restore.message}`);
  return volume;
}

function restoreSummary(v: VolumeView): string {
  const r = v.restore;
  if (r === null) return `volume ${v.name}: ${v.state}`;
  if (r.standby) return `volume ${v.name} is a DR standby of volume ${r.sourceVolume}: backup ${r.applied ?? r.backup} ${r.applied !== null ? 'applied' : r.state}`;
  return `volume ${v.name} restored from backup ${r.backup} (${formatBytes(v.sizeBytes)}): ${v.state}`;
}

export async function backupRestore(backup: string, options: WaitingOptions & { to?: string; replicas?: string; size?: string; standby?: boolean }): Promise<void> {
  if (options.to === undefined) throw invalid('--to NEWVOL is required', 'to');
  const client = new ApiClient(options);
  const body: Record<string, unknown> = { name: options.to };
  if (options.replicas !== undefined) body.numberOfReplicas = parsePositiveInt(options.replicas, '--replicas');
  if (options.size !== undefined) body.sizeBytes = parseBytes(options.size);
  if (options.standby === true) body.standby = true;
  let volume = await client.post<VolumeView>(`/v1/backups/${enc(backup)}/restore`, body);
  if (options.wait !== false) volume = await waitForRestore(client, options.to, timeoutMs(options, BACKUP_WAIT_SECONDS));
  if (options.json) return printJson(volume);
  out(restoreSummary(volume));
}

/** `zebu volume create NAME --from-backup B [--standby]`. */
export async function volumeCreateFromBackup(name: string, options: WaitingOptions & { fromBackup: string; size?: string; replicas?: string; standby?: boolean; backingImage?: string }): Promise<void> {
  if (options.backingImage !== undefined) {
    throw new ZebuError(ErrorCode.EINVAL, 'a backup holds every byte of its volume, those of its backing image too: restore it without backingImage (--backing-image)');
  }
  await backupRestore(options.fromBackup, { ...options, to: name });
}

export async function volumeActivate(name: string, options: WaitingOptions): Promise<void> {
  const client = new ApiClient(options);
  let volume: VolumeView | null = await client.post<VolumeView>(`/v1/volumes/${enc(name)}/activate`);
  if (options.wait !== false) {
    volume = await waitForVolume(client, name, {
      what: `volume ${name} to be activated`,
      timeoutMs: timeoutMs(options, BACKUP_WAIT_SECONDS),
      done: (v) => v === null || v.restore === null || v.restore.state === 'error' || (!v.restore.standby && v.state === 'detached'),
      progress: (v) => ({ fraction: v.restore?.progress ?? 0, label: v.restore === null ? v.state : `applying ${v.restore.backup}` }),
    });
    if (volume === null) throw new ZebuError(ErrorCode.NOT_FOUND, `volume ${name} was deleted while activating`);
    if (volume.restore?.state === 'error') throw new ZebuError(ErrorCode.EIO, `activation of volume ${name} failed: ${volume.restore.message}`);
  }
  if (options.json) return printJson(volume);
  out(volume.restore?.standby === false ? `volume ${name} activated with backup ${volume.restore.applied}; attach it to use it` : `volume ${name}: activation asked for`);
}
