/**
 * The `zebu backing-image …` commands. Same output contract as commands.ts: `--json` prints what
 * the API returned; tables otherwise. `create` waits (with a progress bar on a terminal) until
 * the first file is ready, unless --no-wait.
 */
import fs from 'node:fs';
import { ZebuError, ErrorCode } from '../../errors.ts';
import type { BackingImageView } from '../../manager/backing-image-service.ts';
import { parsePositiveInt } from '../units.ts';
import { ApiClient } from './api-client.ts';
import { formatBytes, formatPercent, keyValues, printJson, table } from './format.ts';
import { enc, out, timeoutMs, type CommonOptions, type WaitingOptions } from './commands.ts';
import { POLL_INTERVAL_MS, progressBar } from './wait.ts';

export interface BackingImageCreateOptions extends WaitingOptions {
  url?: string;
  upload?: string;
  fromVolume?: string;
  snapshot?: string;
  fromBackup?: string;
  checksum?: string;
  minCopies?: string;
  node?: string[];
  disk?: string[];
}

function sourceText(i: BackingImageView): string {
  const s = i.source as { type: string; url?: string; volume?: string; snapshot?: string; backup?: string };
  if (s.type === 'download') return s.url!;
  if (s.type === 'export-from-volume') return `volume ${s.volume} snapshot ${s.snapshot}`;
  if (s.type === 'restore') return `backup ${s.backup}`;
  return s.type;
}

function details(i: BackingImageView): string {
  const head = keyValues([
    ['name', i.name],
    ['source', sourceText(i)],
    ['state', i.state],
    ['size', i.sizeBytes > 0 ? `${formatBytes(i.sizeBytes)} (${i.sizeBytes} bytes)` : null],
    ['sha512', i.checksum],
    ['copies', `${i.readyCopies} ready of ${i.minCopies} wanted`],
    ['nodes', i.nodeSelector.length > 0 ? i.nodeSelector.join(', ') : null],
    ['disks', i.diskSelector.length > 0 ? i.diskSelector.join(', ') : null],
    ['backup', i.backup === null ? null : `${i.backup.backup} in ${i.backup.targetUrl} (${i.backup.at})`],
    ['backup error', i.backupError],
    ['fetched again', i.refetch.attempts === 0 ? null : `${i.refetch.attempts} of at most ${i.refetch.maxAttempts} time(s)${i.refetch.notBefore !== null ? `, next not before ${i.refetch.notBefore}` : ''}: ${i.refetch.message}`],
    ['message', i.message],
    ['created', i.createdAt],
    ['deleting', i.deleting ? 'yes' : null],
  ]);
  if (i.files.length === 0) return head;
  const files = table(['DISK', 'NODE', 'STATE', 'PROGRESS', 'FROM', 'SINCE', 'MESSAGE'], i.files.map((f) => [
    f.disk, f.node, f.state, f.state === 'in-progress' ? formatPercent(f.progress) : null, f.from, f.since, f.message,
  ]));
  return `${head}\n${files}`;
}

async function waitReady(client: ApiClient, name: string, wait: number): Promise<BackingImageView> {
  const deadline = Date.now() + wait;
  const bar = await progressBar(`backing image ${name}`);
  try {
    for (;;) {
      const i = await client.get<BackingImageView>(`/v1/backingimages/${enc(name)}`);
      const busy = i.files.find((f) => f.state === 'in-progress');
      bar?.update({ fraction: busy?.progress ?? (i.state === 'ready' ? 1 : 0), label: i.state });
      if (i.state === 'ready' || i.state === 'failed') return i;
      if (Date.now() >= deadline) {
        const why = i.refetch.message ?? i.message ?? i.files.map((f) => `${f.disk} ${f.state}${f.message !== null ? ` (${f.message})` : ''}`).join('; ');
        throw new ZebuError(ErrorCode.TIMEOUT, `timed out after ${wait / 1000} s waiting for backing image ${name} to be ready (${i.state}${why ? `: ${why}` : ''})`);
      }
      await new Promise((resolve) => setTimeout(resolve, POLL_INTERVAL_MS));
    }
  } finally {
    bar?.stop();
  }
}

export async function backingImageCreate(name: string, options: BackingImageCreateOptions): Promise<void> {
  const client = new ApiClient(options);
  const sources = [options.url, options.upload, options.fromVolume, options.fromBackup].filter((x) => x !== undefined).length;
  if (sources !== 1) throw new ZebuError(ErrorCode.EINVAL, 'give exactly one source: --url URL, --upload FILE, --from-volume VOLUME --snapshot SNAPSHOT, or --from-backup BACKUP');
  if (options.upload !== undefined && !fs.existsSync(options.upload)) throw new ZebuError(ErrorCode.NOT_FOUND, `cannot read ${options.upload}: no such file`);
  const body: Record<string, unknown> = { name };
  if (options.url !== undefined) body.url = options.url;
  if (options.upload !== undefined) body.upload = true;
  if (options.fromVolume !== undefined) body.fromVolume = options.fromVolume;
  if (options.snapshot !== undefined) body.snapshot = options.snapshot;
  if (options.fromBackup !== undefined) body.fromBackup = options.fromBackup;
  if (options.checksum !== undefined) body.checksum = options.checksum;
  if (options.minCopies !== undefined) body.minCopies = parsePositiveInt(options.minCopies, '--min-copies');
  if (options.node !== undefined) body.nodeSelector = options.node;
  if (options.disk !== undefined) body.diskSelector = options.disk;
  let image = await client.post<BackingImageView>('/v1/backingimages', body);
  if (options.upload !== undefined) {
    // The bytes follow the image; the answer comes once they are written and verified.
    const bar = await progressBar(`uploading ${options.upload}`);
    try {
      image = await client.uploadFile<BackingImageView>(`/v1/backingimages/${enc(name)}/upload`, options.upload, {
        timeoutMs: timeoutMs(options),
        onProgress: (sent, total) => bar?.update({ fraction: total > 0 ? sent / total : 1, label: 'uploading' }),
      });
    } finally {
      bar?.stop();
    }
  }
  if (options.wait !== false) image = await waitReady(client, name, timeoutMs(options));
  if (options.json) printJson(image);
  else out(details(image));
  if (image.state === 'failed') throw new ZebuError(ErrorCode.EIO, `backing image ${name} failed: ${image.refetch.message ?? image.message ?? image.files.map((f) => f.message).join('; ')}`);
}

/** `zebu backing-image backup NAME`: stores the image in the backup target. */
export async function backingImageBackup(name: string, options: WaitingOptions): Promise<void> {
  const image = await new ApiClient(options).request<BackingImageView>('POST', `/v1/backingimages/${enc(name)}/backup`, undefined, { timeoutMs: timeoutMs(options) });
  if (options.json) printJson(image);
  else out(`backing image ${name} is in the backup target ${image.backup?.targetUrl} as ${image.backup?.backup}`);
}

/** `zebu backing-image upload NAME FILE`: sends (again) the bytes of an upload image. */
export async function backingImageUpload(name: string, file: string, options: WaitingOptions): Promise<void> {
  const client = new ApiClient(options);
  // Asked first: a refusal then comes before the bytes, not as a connection cut mid-upload.
  const before = await client.get<BackingImageView>(`/v1/backingimages/${enc(name)}`);
  if (before.source.type !== 'upload') throw new ZebuError(ErrorCode.EINVAL, `backing image ${name} is not an upload (its source is ${before.source.type})`);
  if (before.readyCopies > 0) throw new ZebuError(ErrorCode.EXISTS, `backing image ${name} is already uploaded (a file is ready)`);
  if (!fs.existsSync(file)) throw new ZebuError(ErrorCode.NOT_FOUND, `cannot read ${file}: no such file`);
  const bar = await progressBar(`uploading ${file}`);
  let image: BackingImageView;
  try {
    image = await client.uploadFile<BackingImageView>(`/v1/backingimages/${enc(name)}/upload`, file, {
      timeoutMs: timeoutMs(options),
      onProgress: (sent, total) => bar?.update({ fraction: total > 0 ? sent / total : 1, label: 'uploading' }),
    });
  } finally {
    bar?.stop();
  }
  if (options.json) printJson(image);
  else out(details(image));
}

export async function backingImageList(options: CommonOptions): Promise<void> {
  const images = await new ApiClient(options).get<BackingImageView[]>('/v1/backingimages');
  if (options.json) return printJson(images);
  out(table(['NAME', 'STATE', 'SIZE', 'COPIES', 'SOURCE', 'MESSAGE'], images.map((i) => [
    i.name, i.state, i.sizeBytes > 0 ? formatBytes(i.sizeBytes) : null, `${i.readyCopies}/${i.minCopies}`, sourceText(i), i.message,
  ])));
}

export async function backingImageGet(name: string, options: CommonOptions): Promise<void> {
  const image = await new ApiClient(options).get<BackingImageView>(`/v1/backingimages/${enc(name)}`);
  if (options.json) return printJson(image);
  out(details(image));
}

export async function backingImageDelete(name: string, options: WaitingOptions): Promise<void> {
  const client = new ApiClient(options);
  await client.delete<BackingImageView>(`/v1/backingimages/${enc(name)}`);
  if (options.wait !== false) {
    const deadline = Date.now() + timeoutMs(options);
    for (;;) {
      try {
        await client.get<BackingImageView>(`/v1/backingimages/${enc(name)}`);
      } catch (err) {
        if ((err as ZebuError).code === ErrorCode.NOT_FOUND) break;
        throw err;
      }
      if (Date.now() >= deadline) throw new ZebuError(ErrorCode.TIMEOUT, `timed out waiting for backing image ${name} to be removed`);
      await new Promise((resolve) => setTimeout(resolve, POLL_INTERVAL_MS));
    }
  }
  out(`backing image ${name} deleted`);
}
