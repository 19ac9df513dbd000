/**
 * The client commands of `zebu` (volume, snapshot, replica, node, disk, setting, events) over the
 * REST API. Output contract:
 * - `--json`: exactly what the API returned (an array for lists, an object for gets), indented.
 * - without it: aligned tables or "key: value" blocks for people.
 * - `volume attach` prints the NBD URI alone on stdout (maintenance mode: the state).
 * - errors: one line `zebu: <message>` on stderr, exit status 1 (see register.ts).
 */
import type { DiskView, EngineLinkView, EventView, NodeView, RecoveryView, ReplicaView, SettingView, SnapshotView, VerifyView, VolumeView } from '../../manager/types.ts';
import { ErrorCode, ZebuError, invalid } from '../../errors.ts';
import { parseBytes, parsePositiveInt } from '../units.ts';
import { ApiClient, type ConnectionOptions } from './api-client.ts';
import { formatBytes, formatPercent, keyValues, printJson, table } from './format.ts';
import { attachProgress, rebuildProgress, waitForVolume } from './wait.ts';

export interface CommonOptions extends ConnectionOptions {
  json?: boolean;
}

export interface WaitingOptions extends CommonOptions {
  /** commander's --no-wait sets wait=false */
  wait?: boolean;
  timeout?: string;
}

const DEFAULT_WAIT_SECONDS = 300;
/** A verify answers when every region is compared: minutes for a large volume. */
const VERIFY_TIMEOUT_MS = 6 * 3600 * 1000;
const VOLUME_STATES = ['creating', 'detached', 'attaching', 'attached', 'detaching', 'deleting'];
const ROBUSTNESS = ['healthy', 'degraded', 'faulted', 'unknown'];

export const enc = encodeURIComponent;
export const out = (text: string): void => {
  process.stdout.write(text.endsWith('\n') ? text : `${text}\n`);
};

/** --timeout in ms; `defaultSeconds` when absent. */
export function timeoutMs(options: WaitingOptions, defaultSeconds = DEFAULT_WAIT_SECONDS): number {
  if (options.timeout === undefined) return defaultSeconds * 1000;
  if (!/^\d+(\.\d+)?$/.test(options.timeout) || Number(options.timeout) <= 0) throw invalid(`--timeout must be a number of seconds > 0, got ${JSON.stringify(options.timeout)}`, 'timeout');
  return Number(options.timeout) * 1000;
}

function sizeOption(text: string | undefined, alternative = ''): number {
  if (text === undefined) throw invalid(`--size is required${alternative}`, 'size');
  return parseBytes(text);
}

/** The size the engine serves (null while detached). */
function servedSizeBytes(volume: VolumeView): number | null {
  return volume.currentSizeBytes;
}

// ---- human views ------------------------------------------------------------------------------

function volumeTable(volumes: VolumeView[]): string {
  return table(
    ['NAME', 'SIZE', 'REPLICAS', 'STATE', 'ROBUSTNESS', 'NODE', 'ENDPOINT', 'LAST BACKUP', 'RECOVERY POINT AGE'],
    volumes.map((v) => [
      // Attached: replicas in service (RW) of those wanted; else just how many are wanted.
      v.name, formatBytes(v.sizeBytes), v.state === 'attached' ? `${v.replicas.filter((r) => r.mode === 'RW').length}/${v.numberOfReplicas}` : v.numberOfReplicas,
      v.state, v.robustness, v.nodeId, v.endpoint ?? (v.heldByJob !== null ? `(job ${v.heldByJob.job})` : v.state === 'attached' && !v.frontend ? '(maintenance)' : null),
      v.lastBackupAt, v.recoveryPointAgeSeconds === null ? null : formatAge(v.recoveryPointAgeSeconds),
    ]),
  );
}

function volumeDetails(v: VolumeView): string {
  const head = keyValues([
    ['name', v.name],
    ['size', `${formatBytes(v.sizeBytes)} (${v.sizeBytes} bytes)`],
    ['replicas', v.numberOfReplicas],
    ['state', v.state],
    ['robustness', v.robustness],
    ['node', v.nodeId],
    ['data locality', v.dataLocality],
    ['node selector', v.nodeSelector.length === 0 ? null : v.nodeSelector.join(', ')],
    ['disk selector', v.diskSelector.length === 0 ? null : v.diskSelector.join(', ')],
    ['backing image', v.backingImage === null ? null : `${v.backingImage.name} (sha512 ${v.backingImage.checksum.slice(0, 16)}…)`],
    ['frontend', v.frontend ? 'nbd' : 'none (maintenance)'],
    ['endpoint', v.endpoint],
    ['epoch', v.epoch],
    ['rebuilding', v.rebuilding],
    ['rebuild leases', v.rebuildLeases === null ? null : `${v.rebuildLeases.grants} granted, ${v.rebuildLeases.recalls} recalled, ${v.rebuildLeases.revokes} revoked, ${v.rebuildLeases.replays} replayed, ${v.rebuildLeases.copiersLost} copier(s) lost; ${v.rebuildLeases.writesWaited} client write(s) waited, longest ${v.rebuildLeases.longestWaitMs.toFixed(1)} ms`],
    ['message', v.message],
    ['created', v.createdAt],
    ['last recovery', v.lastRecovery === null ? null : recoveryLine(v.lastRecovery)],
    ['last verify', v.lastVerify === null ? null : verifyLine(v.lastVerify)],
    ['engine link', v.engineLink === null ? null : engineLinkLine(v.engineLink)],
    ['restore', v.restore === null ? null : restoreLine(v)],
    ['held by job', v.heldByJob === null ? null : `${v.heldByJob.job} (${v.heldByJob.task}) on node ${v.heldByJob.node} since ${v.heldByJob.since}`],
    ['waiting attach', v.pendingAttach === null ? null : `to node ${v.pendingAttach.nodeId}${v.pendingAttach.maintenance ? ' (maintenance)' : ''}, asked at ${v.pendingAttach.requestedAt}`],
    ['last backup', v.lastBackup === null ? 'none' : `${v.lastBackup} at ${v.lastBackupAt}`],
    ['recovery point', v.recoveryPointAt === null ? 'none (no backup holds its data)' : `${v.recoveryPointAt} (${formatAge(v.recoveryPointAgeSeconds ?? 0)} ago)`],
    ['recurring jobs', v.recurringJobs.length === 0 ? null : v.recurringJobs.map((j) => `${j.name} (${j.task}, next ${j.nextRunAt ?? 'never'}): ${jobResultText(j.result, j.message)}`).join('; ')],
  ]);
  if (v.replicas.length === 0) return head;
  const replicas = table(
    ['REPLICA', 'NODE', 'DISK', 'STATE', 'MODE', 'REBUILD', 'FAILED'],
    v.replicas.map((r) => [r.name, r.nodeId, r.diskId, r.state, r.mode, r.rebuildProgress === null ? null : formatPercent(r.rebuildProgress), r.failedAt]),
  );
  return `${head}\n${replicas}`;
}

/** "DR standby of db: backup-x applied; in-progress backup-y 40%, 120 MiB/s". */
function restoreLine(v: VolumeView): string {
  const r = v.restore!;
  const parts = [r.standby ? `DR standby of volume ${r.sourceVolume}` : `from volume ${r.sourceVolume}`];
  if (r.applied !== null) parts.push(`backup ${r.applied} applied${r.completedAt !== null ? ` at ${r.completedAt}` : ''}`);
  if (r.state !== 'completed' || r.applied !== r.backup) {
    parts.push(`${r.state} ${r.backup} ${formatPercent(r.progress)}${r.bytesPerSecond > 0 ? `, ${formatBytes(r.bytesPerSecond)}/s` : ''}`);
  }
  if (r.message !== null) parts.push(r.message);
  return parts.join('; ');
}

/** "skipped: unchanged since backup b1", "error: ...", "not run yet". */
export function jobResultText(result: string | null, message: string | null): string {
  if (result === null) return 'not run yet';
  if (message === null) return result;
  return message.startsWith(`${result}:`) ? message : `${result}: ${message}`;
}

/** "42 s", "5 min", "3 h", "2 d". */
function formatAge(seconds: number): string {
  if (seconds < 120) return `${Math.round(seconds)} s`;
  if (seconds < 7200) return `${Math.round(seconds / 60)} min`;
  if (seconds < 172800) return `${Math.round(seconds / 3600)} h`;
  return `${Math.round(seconds / 86400)} d`;
}

function formatDuration(ms: number): string {
  return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(1)} s`;
}

function recoveryLine(r: RecoveryView): string {
  const parts = [
    r.at,
    r.clean ? 'clean' : 'unclean',
    `${r.regions} region(s) (${formatBytes(r.bytes)}) resynced${r.source !== null ? ` from ${r.source}` : ''} of ${r.checkedRegions} compared, in ${formatDuration(r.durationMs)}`,
  ];
  if (r.deltaReplicas.length > 0) parts.push(`delta: ${r.deltaReplicas.join(', ')}`);
  if (r.erredReplicas.length > 0) parts.push(`out: ${r.erredReplicas.join(', ')}`);
  return parts.join(', ');
}

/** "OPEN since …, 3 reopen(s), 12 request(s) re-issued, longest hold 850 ms, 1 hung; last: …". */
function engineLinkLine(l: EngineLinkView): string {
  const parts = [`${l.state} since ${l.stateSince}`, `${l.reopens} reopen(s)`, `${l.reissued} request(s) re-issued`, `longest hold ${formatDuration(l.longestHoldMs)}`];
  if (l.hangs > 0) parts.push(`${l.hangs} hung engine(s) killed`);
  if (l.held > 0) parts.push(`${l.held} held now`);
  if (l.lastClose !== null) parts.push(`last lost ${l.lastClose.at}: ${l.lastClose.cause}`);
  return parts.join(', ');
}

function verifyLine(r: VerifyView): string {
  const found = r.differing.length;
  return `${r.at}, ${r.regions} region(s) of ${r.replicas.length} replica(s), ${found === 0 ? 'identical' : `${found} differ${r.repair ? `, ${r.repaired} repaired` : ''}`}, ${formatDuration(r.durationMs)}`;
}

function replicaRows(replicas: ReplicaView[]): string {
  return table(
    ['NAME', 'VOLUME', 'NODE', 'DISK', 'STATE', 'MODE', 'ADDRESS', 'PID', 'RESTARTS', 'REBUILD', 'LEAVING'],
    replicas.map((r) => [
      r.name, r.volumeName, r.nodeId, r.diskId, r.state, r.mode, r.address, r.pid, r.restarts,
      r.rebuild === null ? null : `${formatPercent(r.rebuild.totalBytes > 0 ? r.rebuild.copiedBytes / r.rebuild.totalBytes : 0)} of ${formatBytes(r.rebuild.totalBytes)}${r.rebuild.delta ? ' (delta)' : ''}`,
      r.leaving === null ? null : leavingText(r.leaving),
    ]),
  );
}

function replicaDetails(r: ReplicaView): string {
  return keyValues([
    ['name', r.name],
    ['volume', r.volumeName],
    ['node', r.nodeId],
    ['disk', r.diskId],
    ['path', r.dataPath],
    ['size', `${formatBytes(r.sizeBytes)} (${r.sizeBytes} bytes)`],
    ['desired', r.desireState],
    ['state', r.state],
    ['mode', r.mode],
    ['address', r.address],
    ['pid', r.pid],
    ['restarts', r.restarts],
    ['rebuild', r.rebuild === null ? null : `${formatBytes(r.rebuild.copiedBytes)} of ${formatBytes(r.rebuild.totalBytes)}${r.rebuild.delta ? ', a delta of the regions it missed' : ', the whole volume'}`],
    ['healthy at', r.healthyAt],
    ['failed at', r.failedAt],
    ['leaving', r.leaving === null ? null : leavingText(r.leaving)],
    ['message', r.message],
  ]);
}

function leavingText(l: NonNullable<ReplicaView['leaving']>): string {
  const to = l.diskId !== null ? ` to disk ${l.diskId}` : l.nodeId !== null ? ` to node ${l.nodeId}` : '';
  return `${l.reason}${to}`;
}

// ---- volumes ----------------------------------------------------------------------------------

export async function volumeCreate(name: string, options: CommonOptions & { size?: string; replicas?: string; backingImage?: string; dataLocality?: string; nodeSelector?: string[]; diskSelector?: string[] }): Promise<void> {
  const body: { name: string; sizeBytes?: number; numberOfReplicas?: number; backingImage?: string; dataLocality?: string; nodeSelector?: string[]; diskSelector?: string[] } = { name };
  if (options.dataLocality !== undefined) body.dataLocality = dataLocalityOption(options.dataLocality);
  if (options.nodeSelector !== undefined) body.nodeSelector = options.nodeSelector;
  if (options.diskSelector !== undefined) body.diskSelector = options.diskSelector;
  // On a backing image the size defaults to the image's.
  if (options.backingImage !== undefined) body.backingImage = options.backingImage;
  if (options.backingImage === undefined || options.size !== undefined) body.sizeBytes = sizeOption(options.size, ' (or --from-backup BACKUP, or --backing-image IMAGE)');
  if (options.replicas !== undefined) body.numberOfReplicas = parsePositiveInt(options.replicas, '--replicas');
  const volume = await new ApiClient(options).post<VolumeView>('/v1/volumes', body);
  if (options.json) return printJson(volume);
  out(`volume ${volume.name} created: ${formatBytes(volume.sizeBytes)}, ${volume.numberOfReplicas} replica(s)${volume.backingImage !== null ? `, on backing image ${volume.backingImage.name}` : ''}, ${volume.state}`);
}

export async function volumeList(options: CommonOptions): Promise<void> {
  const volumes = await new ApiClient(options).get<VolumeView[]>('/v1/volumes');
  if (options.json) return printJson(volumes);
  out(volumeTable(volumes));
}

export async function volumeGet(name: string, options: CommonOptions): Promise<void> {
  const volume = await new ApiClient(options).get<VolumeView>(`/v1/volumes/${enc(name)}`);
  if (options.json) return printJson(volume);
  out(volumeDetails(volume));
}

/** What `volume attach` prints: the NBD URI, or the state in maintenance mode (no export). */
function attachOutput(volume: VolumeView): string {
  if (volume.endpoint !== null) return volume.endpoint;
  return volume.state === 'attached' && !volume.frontend ? 'attached (maintenance mode: no NBD export)' : volume.state;
}

export async function volumeAttach(name: string, options: WaitingOptions & { node?: string; maintenance?: boolean }): Promise<void> {
  const client = new ApiClient(options);
  const wait = timeoutMs(options);
  const body: { nodeId?: string; maintenance?: boolean } = {};
  if (options.node !== undefined) body.nodeId = options.node;
  if (options.maintenance === true) body.maintenance = true;
  let volume: VolumeView | null = await client.post<VolumeView>(`/v1/volumes/${enc(name)}/attach`, body);
  if (volume.pendingAttach !== null && options.wait !== false) {
    process.stderr.write(volume.heldByJob !== null
      ? `zebu: volume ${name} is held by recurring job ${volume.heldByJob.job} (${volume.heldByJob.task}); the attach waits until it is done\n`
      : `zebu: volume ${name} is still being detached; the attach waits until it is\n`);
  }
  if (options.wait !== false) {
    try {
      volume = await waitForVolume(client, name, {
        what: `volume ${name} to be attached`,
        timeoutMs: wait,
        done: (v) => v === null || (v.pendingAttach === null && v.heldByJob === null && v.state === 'attached' && (!v.frontend || v.endpoint !== null)),
        progress: attachProgress,
      });
    } catch (err) {
      // Still queued behind a job or a detach: withdrawn, so that it does not happen later unasked.
      const now = await client.get<VolumeView>(`/v1/volumes/${enc(name)}`).catch(() => null);
      if (now?.pendingAttach != null) {
        await client.post(`/v1/volumes/${enc(name)}/detach`, {}).catch(() => {});
        throw new ZebuError(ErrorCode.TIMEOUT, `${(err as Error).message}; the waiting attach was withdrawn`);
      }
      throw err;
    }
    if (volume === null) throw invalid(`volume ${name} was deleted while attaching`);
  }
  if (options.json) return printJson(volume);
  out(attachOutput(volume));
}

export async function volumeDetach(name: string, options: WaitingOptions): Promise<void> {
  const client = new ApiClient(options);
  const wait = timeoutMs(options);
  let volume: VolumeView | null = await client.post<VolumeView>(`/v1/volumes/${enc(name)}/detach`);
  if (options.wait !== false) {
    volume = await waitForVolume(client, name, {
      what: `volume ${name} to be detached`,
      timeoutMs: wait,
      done: (v) => v === null || v.state === 'detached',
      progress: (v) => ({ fraction: v.state === 'detached' ? 1 : v.state === 'detaching' ? 0.5 : 0, label: v.state }),
    });
  }
  if (options.json) return printJson(volume);
  out(volume === null ? `volume ${name} no longer exists` : `volume ${name} ${volume.state}`);
}

export async function volumeDelete(name: string, options: WaitingOptions): Promise<void> {
  const client = new ApiClient(options);
  const wait = timeoutMs(options);
  const volume = await client.delete<VolumeView>(`/v1/volumes/${enc(name)}`);
  if (options.wait === false) return out(`volume ${name} ${volume.state}`);
  await waitForVolume(client, name, {
    what: `volume ${name} to be deleted`,
    timeoutMs: wait,
    done: (v) => v === null,
    progress: (v) => ({ fraction: 0.5, label: v.state }),
  });
  out(`volume ${name} deleted`);
}

function dataLocalityOption(value: string): string {
  if (value !== 'disabled' && value !== 'best-effort') throw invalid(`--data-locality must be disabled or best-effort, got ${JSON.stringify(value)}`, 'dataLocality');
  return value;
}

export async function volumeUpdate(name: string, options: CommonOptions & { dataLocality?: string; nodeSelector?: string[]; diskSelector?: string[]; clearSelectors?: boolean }): Promise<void> {
  const body: { dataLocality?: string; nodeSelector?: string[]; diskSelector?: string[] } = {};
  if (options.dataLocality !== undefined) body.dataLocality = dataLocalityOption(options.dataLocality);
  if (options.clearSelectors === true) {
    if (options.nodeSelector !== undefined || options.diskSelector !== undefined) throw invalid('--clear-selectors and --node-selector/--disk-selector do not go together', 'nodeSelector');
    body.nodeSelector = [];
    body.diskSelector = [];
  }
  if (options.nodeSelector !== undefined) body.nodeSelector = options.nodeSelector;
  if (options.diskSelector !== undefined) body.diskSelector = options.diskSelector;
  if (Object.keys(body).length === 0) throw invalid('nothing to change: give --data-locality, --node-selector, --disk-selector or --clear-selectors', 'dataLocality');
  const volume = await new ApiClient(options).patch<VolumeView>(`/v1/volumes/${enc(name)}`, body);
  if (options.json) return printJson(volume);
  out(`volume ${volume.name}: data locality ${volume.dataLocality}, node selector ${tagsCell(volume.nodeSelector)}, disk selector ${tagsCell(volume.diskSelector)}`);
}

export async function volumeExpand(name: string, options: WaitingOptions & { size?: string }): Promise<void> {
  const sizeBytes = sizeOption(options.size);
  const client = new ApiClient(options);
  const wait = timeoutMs(options);
  let volume: VolumeView | null = await client.post<VolumeView>(`/v1/volumes/${enc(name)}/expand`, { sizeBytes });
  // Online: done when the engine serves the new size (when the manager reports that size).
  if (options.wait !== false && volume.state === 'attached' && servedSizeBytes(volume) !== null) {
    volume = await waitForVolume(client, name, {
      what: `volume ${name} to serve ${formatBytes(sizeBytes)}`,
      timeoutMs: wait,
      done: (v) => v === null || v.state !== 'attached' || (servedSizeBytes(v) ?? sizeBytes) >= sizeBytes,
      progress: (v) => ({ fraction: 0.5, label: `expanding to ${formatBytes(sizeBytes)}, ${v.state}` }),
    });
    if (volume === null) throw invalid(`volume ${name} was deleted while expanding`);
  }
  if (options.json) return printJson(volume);
  const when = volume.state === 'attached' ? '' : ' (applied at the next attach)';
  out(`volume ${name}: ${formatBytes(volume.sizeBytes)} (${volume.sizeBytes} bytes)${when}`);
}

export async function volumeWait(name: string, options: WaitingOptions & { state?: string; robustness?: string }): Promise<void> {
  const { state, robustness } = options;
  if (state === undefined && robustness === undefined) throw invalid('say what to wait for: --state STATE and/or --robustness ROBUSTNESS');
  if (state !== undefined && state !== 'deleted' && !VOLUME_STATES.includes(state)) {
    throw invalid(`--state must be one of ${[...VOLUME_STATES, 'deleted'].join(', ')}, got ${JSON.stringify(state)}`, 'state');
  }
  if (robustness !== undefined && !ROBUSTNESS.includes(robustness)) throw invalid(`--robustness must be one of ${ROBUSTNESS.join(', ')}, got ${JSON.stringify(robustness)}`, 'robustness');
  const client = new ApiClient(options);
  const wanted = [state, robustness].filter((x) => x !== undefined).join(' and ');
  const volume = await waitForVolume(client, name, {
    what: `volume ${name} to be ${wanted}`,
    timeoutMs: timeoutMs(options),
    done: (v) => v === null || ((state === undefined || v.state === state) && (robustness === undefined || v.robustness === robustness)),
    progress: rebuildProgress,
  });
  if (volume === null && state !== 'deleted') throw new ZebuError(ErrorCode.NOT_FOUND, `volume ${name} not found`);
  if (options.json) return printJson(volume);
  out(volume === null ? `volume ${name} deleted` : `volume ${name}: ${volume.state}, ${volume.robustness}`);
}

export async function volumeSalvage(name: string, options: CommonOptions & { replica?: string[] }): Promise<void> {
  const body: { replicas?: string[] } = {};
  if (options.replica !== undefined && options.replica.length > 0) body.replicas = options.replica;
  const volume = await new ApiClient(options).post<VolumeView>(`/v1/volumes/${enc(name)}/salvage`, body);
  if (options.json) return printJson(volume);
  out(`volume ${name}: salvage started from ${body.replicas?.join(', ') ?? 'all its replicas'} (${volume.state}); \`zebu volume get ${name}\` and \`zebu events --volume ${name}\` show how it goes`);
}

/** Prints the report; fails (exit 1) when regions still differ. */
export async function volumeVerify(name: string, options: CommonOptions & { repair?: boolean }): Promise<void> {
  const repair = options.repair === true;
  const report = await new ApiClient(options).post<VerifyView>(`/v1/volumes/${enc(name)}/verify`, { repair }, { timeoutMs: VERIFY_TIMEOUT_MS });
  if (options.json) printJson(report);
  else {
    let text = table(['REGIONS', 'REPLICAS', 'DIFFERING', 'REPAIRED', 'DURATION'], [[report.regions, report.replicas.join(','), report.differing.length, report.repaired, formatDuration(report.durationMs)]]);
    if (report.differing.length > 0) {
      const replicas = [...new Set(report.differing.flatMap((d) => Object.keys(d.hashes)))].sort();
      text += `\n${table(['REGION', 'OFFSET', 'LENGTH', ...replicas.map((r) => r.toUpperCase())], report.differing.map((d) => [
        d.region, d.offset, formatBytes(d.length), ...replicas.map((r) => d.hashes[r]?.slice(0, 12) ?? null),
      ]))}`;
    }
    out(text);
  }
  const left = Math.max(0, report.differing.length - report.repaired);
  if (left > 0) {
    throw new ZebuError(ErrorCode.EIO, `${left} region(s) of volume ${name} differ between replicas${repair ? ' and were not repaired' : ' (zebu volume verify --repair copies them from the source replica)'}`);
  }
}

// ---- snapshots --------------------------------------------------------------------------------

export async function snapshotCreate(volume: string, name: string | undefined, options: CommonOptions): Promise<void> {
  const snapshot = await new ApiClient(options).post<SnapshotView>(`/v1/volumes/${enc(volume)}/snapshots`, name === undefined ? {} : { name });
  if (options.json) return printJson(snapshot);
  out(`snapshot ${snapshot.name} of volume ${volume} created`);
}

export async function snapshotList(volume: string, options: CommonOptions): Promise<void> {
  const list = await new ApiClient(options).get<SnapshotView[]>(`/v1/volumes/${enc(volume)}/snapshots`);
  if (options.json) return printJson(list);
  out(table(['NAME', 'CREATED', 'PARENT', 'USED', 'IN CHAIN'], list.map((s) => [s.name, s.createdAt, s.parent, formatBytes(s.sizeBytesUsed), s.inChain])));
}

export async function snapshotDelete(volume: string, name: string, options: CommonOptions): Promise<void> {
  await new ApiClient(options).delete(`/v1/volumes/${enc(volume)}/snapshots/${enc(name)}`);
  out(`snapshot ${name} of volume ${volume} deleted`);
}

export async function snapshotRevert(volume: string, name: string, options: CommonOptions): Promise<void> {
  await new ApiClient(options).post(`/v1/volumes/${enc(volume)}/snapshots/${enc(name)}/revert`);
  out(`volume ${volume} reverted to snapshot ${name}`);
}

// ---- replicas, nodes, disks -------------------------------------------------------------------

export async function replicaList(options: CommonOptions & { volume?: string }): Promise<void> {
  const query = options.volume === undefined ? '' : `?volume=${enc(options.volume)}`;
  const list = await new ApiClient(options).get<ReplicaView[]>(`/v1/replicas${query}`);
  if (options.json) return printJson(list);
  out(replicaRows(list));
}

export async function replicaGet(name: string, options: CommonOptions): Promise<void> {
  const replica = await new ApiClient(options).get<ReplicaView>(`/v1/replicas/${enc(name)}`);
  if (options.json) return printJson(replica);
  out(replicaDetails(replica));
}

export async function replicaMove(name: string, options: CommonOptions & { disk?: string; node?: string }): Promise<void> {
  if (options.disk !== undefined && options.node !== undefined) throw invalid('give --disk or --node, not both', 'disk');
  const body: { diskId?: string; nodeId?: string } = {};
  if (options.disk !== undefined) body.diskId = options.disk;
  if (options.node !== undefined) body.nodeId = options.node;
  const replica = await new ApiClient(options).post<ReplicaView>(`/v1/replicas/${enc(name)}/move`, body);
  if (options.json) return printJson(replica);
  const to = options.disk !== undefined ? `disk ${options.disk}` : options.node !== undefined ? `node ${options.node}` : 'another disk';
  out(`replica ${replica.name} moves from disk ${replica.diskId} to ${to}: a new replica is rebuilt while it serves, then it is removed (see \`zebu replica list --volume ${replica.volumeName}\` and \`zebu events\`)`);
}

/** What an eviction shows: on, off, or done (nothing left). */
function evictionCell(evict: boolean, replicaCount: number): string {
  if (!evict) return '-';
  return replicaCount === 0 ? 'done (empty)' : `${replicaCount} left`;
}

export async function nodeList(options: CommonOptions): Promise<void> {
  const list = await new ApiClient(options).get<NodeView[]>('/v1/nodes');
  if (options.json) return printJson(list);
  out(table(
    ['NAME', 'ADDRESS', 'READY', 'LEADER', 'SCHEDULING', 'REPLICAS', 'EVICTION', 'NBD', 'DISKS', 'TAGS', 'HEARTBEAT'],
    list.map((n) => [n.name, n.address, n.ready, n.leader ? 'yes' : '', n.allowScheduling ? 'on' : 'off', n.replicaCount, evictionCell(n.evict, n.replicaCount), n.nbdAddress, n.disks.join(','), tagsCell(n.tags), n.lastHeartbeatAt]),
  ));
}

function schedulingOption(text: string | undefined): boolean | undefined {
  if (text === undefined) return undefined;
  if (text === 'on' || text === 'off') return text === 'on';
  throw invalid(`--scheduling must be on or off, got ${JSON.stringify(text)}`, 'scheduling');
}

function tagsCell(tags: string[]): string {
  return tags.length === 0 ? '-' : tags.join(',');
}

/** --tag T (repeated) or --clear-tags: the new tag list, or undefined when neither was given. */
function tagsOption(options: { tag?: string[]; clearTags?: boolean }): string[] | undefined {
  if (options.clearTags === true && options.tag !== undefined) throw invalid('--clear-tags and --tag do not go together', 'tags');
  return options.clearTags === true ? [] : options.tag;
}

export async function nodeUpdate(name: string, options: CommonOptions & { scheduling?: string; evict?: boolean; tag?: string[]; clearTags?: boolean }): Promise<void> {
  const body: { allowScheduling?: boolean; evict?: boolean; tags?: string[] } = {};
  const allowScheduling = schedulingOption(options.scheduling);
  if (allowScheduling !== undefined) body.allowScheduling = allowScheduling;
  if (options.evict !== undefined) body.evict = options.evict;
  const tags = tagsOption(options);
  if (tags !== undefined) body.tags = tags;
  if (Object.keys(body).length === 0) throw invalid('say what to change: --scheduling on|off, --evict / --no-evict, --tag TAG / --clear-tags', 'scheduling');
  const node = await new ApiClient(options).patch<NodeView>(`/v1/nodes/${enc(name)}`, body);
  if (options.json) return printJson(node);
  out(`node ${node.name}: scheduling ${node.allowScheduling ? 'on' : 'off'}, tags ${tagsCell(node.tags)}${node.evict ? `, being evicted (${node.replicaCount} replica(s) left)` : ''}`);
}

export async function diskUpdate(name: string, options: CommonOptions & { scheduling?: string; reserved?: string; evict?: boolean; tag?: string[]; clearTags?: boolean }): Promise<void> {
  const body: { allowScheduling?: boolean; storageReservedBytes?: number; evict?: boolean; tags?: string[] } = {};
  const tags = tagsOption(options);
  if (tags !== undefined) body.tags = tags;
  const allowScheduling = schedulingOption(options.scheduling);
  if (allowScheduling !== undefined) body.allowScheduling = allowScheduling;
  if (options.reserved !== undefined) body.storageReservedBytes = parseBytes(options.reserved);
  if (options.evict !== undefined) body.evict = options.evict;
  if (Object.keys(body).length === 0) throw invalid('say what to change: --scheduling on|off, --reserved SIZE, --evict / --no-evict, --tag TAG / --clear-tags', 'scheduling');
  const disk = await new ApiClient(options).patch<DiskView>(`/v1/disks/${enc(name)}`, body);
  if (options.json) return printJson(disk);
  out(`disk ${disk.name}: scheduling ${disk.allowScheduling ? 'on' : 'off'}, reserved ${formatBytes(disk.storageReservedBytes)}, tags ${tagsCell(disk.tags)}${disk.evict ? `, being evicted (${disk.replicaCount} replica(s) left)` : ''}`);
}

export async function diskList(options: CommonOptions): Promise<void> {
  const list = await new ApiClient(options).get<DiskView[]>('/v1/disks');
  if (options.json) return printJson(list);
  out(table(
    ['NAME', 'NODE', 'READY', 'SCHEDULING', 'REPLICAS', 'EVICTION', 'SIZE', 'AVAILABLE', 'SCHEDULED', 'RESERVED', 'TAGS', 'PATH'],
    list.map((d) => [
      d.name, d.nodeId, d.ready, d.allowScheduling ? 'on' : 'off', d.replicaCount, evictionCell(d.evict, d.replicaCount), formatBytes(d.storageMaximumBytes), formatBytes(d.storageAvailableBytes),
      formatBytes(d.storageScheduledBytes), formatBytes(d.storageReservedBytes), tagsCell(d.tags), d.path,
    ]),
  ));
}

// ---- settings and events ----------------------------------------------------------------------

export async function settingList(options: CommonOptions): Promise<void> {
  const list = await new ApiClient(options).get<SettingView[]>('/v1/settings');
  if (options.json) return printJson(list);
  out(table(['NAME', 'VALUE', 'DEFAULT', 'TYPE', 'DESCRIPTION'], list.map((s) => [s.name, s.value, s.default, s.type, s.description])));
}

export async function settingGet(name: string, options: CommonOptions): Promise<void> {
  const setting = await new ApiClient(options).get<SettingView>(`/v1/settings/${enc(name)}`);
  if (options.json) return printJson(setting);
  out(keyValues([['name', setting.name], ['value', setting.value], ['default', setting.default], ['type', setting.type], ['description', setting.description]]));
}

export async function settingSet(name: string, value: string, options: CommonOptions): Promise<void> {
  const setting = await new ApiClient(options).put<SettingView>(`/v1/settings/${enc(name)}`, { value });
  if (options.json) return printJson(setting);
  out(`${setting.name} = ${setting.value}`);
}

export async function events(options: CommonOptions & { volume?: string; limit?: string }): Promise<void> {
  const query = new URLSearchParams();
  if (options.volume !== undefined) query.set('volume', options.volume);
  if (options.limit !== undefined) query.set('limit', String(parsePositiveInt(options.limit, '--limit')));
  const text = query.toString();
  const list = await new ApiClient(options).get<EventView[]>(`/v1/events${text === '' ? '' : `?${text}`}`);
  if (options.json) return printJson(list);
  out(table(['TIME', 'TYPE', 'REASON', 'OBJECT', 'MESSAGE'], list.map((e) => [e.time, e.type, e.reason, `${e.kind}/${e.object}`, e.message])));
}
