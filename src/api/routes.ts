/**
 * The REST API as data: one table of routes, each with its input schemas, its answer and its
 * handler. server.ts registers the table with fastify and openapi.ts describes the same table,
 * so the document cannot drift from what the server accepts.
 */
import type { ManagerService, VolumeCreateInput, VolumeUpdateInput } from '../manager/types.ts';
import type { BackupService, BackupTargetSetInput } from '../manager/backup-types.ts';
import type { RecurringJobServiceImpl } from '../manager/recurring-job-service.ts';
import type { RecurringJobInput } from '../manager/recurring-jobs.ts';
import type { BackingImageServiceImpl } from '../manager/backing-image-service.ts';
import type { BackingImageInput } from '../manager/backing-images.ts';
import { bodies, listOf, params, queries, ref, type JsonSchema } from './schemas.ts';
import { ZebuError, ErrorCode } from '../errors.ts';

export type HttpMethod = 'GET' | 'POST' | 'PUT' | 'PATCH' | 'DELETE';

export interface RouteInput {
  params: Record<string, string>;
  query: Record<string, string | undefined>;
  body: Record<string, unknown>;
  /** Routes that take raw bytes (`consumes`): the request body, streamed, and its declared length. */
  stream?: AsyncIterable<Buffer>;
  contentLength?: number | null;
  /** What the caller's token allows (routes that need a token). */
  access?: TokenAccess;
}

/** The API token may change things; the read-only token may only look (GET). */
export type TokenAccess = 'read-write' | 'read-only';

export interface RouteSpec {
  method: HttpMethod;
  /** fastify syntax: /v1/volumes/:name */
  url: string;
  operationId: string;
  summary: string;
  tag: string;
  /** false: no token needed (only /healthz). */
  auth: boolean;
  params?: JsonSchema;
  querystring?: JsonSchema;
  body?: JsonSchema;
  /** The body may be left out entirely (then it is {}). */
  bodyOptional?: boolean;
  /** Status of a success; 204 sends no body. */
  status: 200 | 201 | 204;
  /** Schema of a success answer (documentation only). */
  response?: JsonSchema;
  /** Content type of a success answer other than JSON. */
  produces?: string;
  /** The route takes raw bytes of this type (streamed to the handler, no size limit) instead of JSON. */
  consumes?: 'application/octet-stream';
  handler: (input: RouteInput) => Promise<unknown>;
}

export interface RouteExtras {
  metrics: () => Promise<string>;
  metricsContentType: string;
  openapi: () => unknown;
}

/** The recurring-job operations the API serves. */
export type RecurringJobService = Pick<RecurringJobServiceImpl, 'listRecurringJobs' | 'getRecurringJob' | 'createRecurringJob' | 'updateRecurringJob' | 'deleteRecurringJob' | 'setVolumeJobs'>;

/** The backing-image operations the API serves. */
export type BackingImageService = Pick<BackingImageServiceImpl, 'listBackingImages' | 'getBackingImage' | 'createBackingImage' | 'uploadBackingImage' | 'backupBackingImage' | 'deleteBackingImage'>;

export function apiRoutes(
  service: ManagerService, backups: BackupService | null, extras: RouteExtras, recurringJobs: RecurringJobService | null = null, backingImages: BackingImageService | null = null,
): RouteSpec[] {
  const route = (spec: Omit<RouteSpec, 'auth' | 'status'> & { auth?: boolean; status?: RouteSpec['status'] }): RouteSpec => ({ auth: true, status: 200, ...spec });
  const limit = (text: string | undefined): number | undefined => (text === undefined ? undefined : Number(text));
  return [
    route({
      method: 'GET', url: '/healthz', operationId: 'health', tag: 'system', auth: false,
      summary: 'Liveness of the API server (no token needed)',
      response: ref('Health'),
      handler: async () => ({ ok: true }),
    }),
    route({
      method: 'GET', url: '/v1/access', operationId: 'access', tag: 'system',
      summary: 'What the token presented allows (the web UI hides what a read-only token may not do)',
      response: ref('Access'),
      handler: async ({ access }) => ({ access: access ?? 'read-write' }),
    }),
    route({
      method: 'GET', url: '/metrics', operationId: 'metrics', tag: 'system',
      summary: 'Prometheus metrics: volume state and robustness, replica modes, per-volume I/O',
      produces: extras.metricsContentType,
      response: { type: 'string' },
      handler: () => extras.metrics(),
    }),
    route({
      method: 'GET', url: '/v1/openapi.json', operationId: 'openapi', tag: 'system',
      summary: 'This API as an OpenAPI 3.1 document',
      response: { type: 'object' },
      handler: async () => extras.openapi(),
    }),

    // ---- volumes
    route({
      method: 'GET', url: '/v1/volumes', operationId: 'listVolumes', tag: 'volumes', summary: 'List volumes',
      response: listOf('Volume'),
      handler: () => service.listVolumes(),
    }),
    route({
      method: 'POST', url: '/v1/volumes', operationId: 'createVolume', tag: 'volumes', summary: 'Create a volume (its replicas are placed now)',
      body: bodies.volumeCreate, status: 201, response: ref('Volume'),
      handler: ({ body }) => service.createVolume(body as unknown as VolumeCreateInput),
    }),
    route({
      method: 'POST', url: '/v1/volumes/:name/activate', operationId: 'activateVolume', tag: 'volumes',
      summary: 'Activate a DR standby volume: the newest backup of its source is applied, then it can be attached (returns at once: poll the volume)',
      params: params.volume, response: ref('Volume'),
      handler: ({ params: p }) => service.activateVolume(p.name),
    }),
    route({
      method: 'GET', url: '/v1/volumes/:name', operationId: 'getVolume', tag: 'volumes', summary: 'Get a volume',
      params: params.volume, response: ref('Volume'),
      handler: ({ params: p }) => service.getVolume(p.name),
    }),
    route({
      method: 'DELETE', url: '/v1/volumes/:name', operationId: 'deleteVolume', tag: 'volumes',
      summary: 'Delete a detached volume (state deleting; it disappears once its replicas are removed)',
      params: params.volume, response: ref('Volume'),
      handler: ({ params: p }) => service.deleteVolume(p.name),
    }),
    route({
      method: 'POST', url: '/v1/volumes/:name/attach', operationId: 'attachVolume', tag: 'volumes',
      summary: 'Attach a volume (returns at once, state attaching: poll the volume). While a recurring job or replica moves hold the volume, or it is still detaching, the attach is recorded (pendingAttach) and made once it is detached',
      params: params.volume, body: bodies.volumeAttach, bodyOptional: true, response: ref('Volume'),
      handler: ({ params: p, body }) => service.attachVolume(p.name, body as { nodeId?: string; maintenance?: boolean }),
    }),
    route({
      method: 'POST', url: '/v1/volumes/:name/detach', operationId: 'detachVolume', tag: 'volumes',
      summary: 'Detach a volume (returns at once: poll the volume)',
      params: params.volume, response: ref('Volume'),
      handler: ({ params: p }) => service.detachVolume(p.name),
    }),
    route({
      method: 'POST', url: '/v1/volumes/:name/expand', operationId: 'expandVolume', tag: 'volumes',
      summary: 'Grow a volume (online when attached, else at the next attach); never shrinks',
      params: params.volume, body: bodies.volumeExpand, response: ref('Volume'),
      handler: ({ params: p, body }) => service.expandVolume(p.name, body.sizeBytes as number),
    }),
    route({
      method: 'PATCH', url: '/v1/volumes/:name', operationId: 'updateVolume', tag: 'volumes',
      summary: 'Change a volume\'s settings (data locality)',
      params: params.volume, body: bodies.volumeUpdate, response: ref('Volume'),
      handler: ({ params: p, body }) => service.updateVolume(p.name, body as VolumeUpdateInput),
    }),
    route({
      method: 'POST', url: '/v1/volumes/:name/salvage', operationId: 'salvageVolume', tag: 'volumes',
      summary: 'Bring a faulted volume back: a new engine starts on the chosen replicas (default: all) and picks the source (returns at once)',
      params: params.volume, body: bodies.volumeSalvage, bodyOptional: true, response: ref('Volume'),
      handler: ({ params: p, body }) => service.salvageVolume(p.name, body as { replicas?: string[] }),
    }),
    route({
      method: 'POST', url: '/v1/volumes/:name/verify', operationId: 'verifyVolume', tag: 'volumes',
      summary: 'Compare the replicas of an attached volume region by region (and repair differences when asked); answers when done',
      params: params.volume, body: bodies.volumeVerify, bodyOptional: true, response: ref('Verify'),
      handler: ({ params: p, body }) => service.verifyVolume(p.name, body as { repair?: boolean }),
    }),

    // ---- snapshots
    route({
      method: 'GET', url: '/v1/volumes/:name/snapshots', operationId: 'listSnapshots', tag: 'snapshots', summary: 'List the snapshots of a volume',
      params: params.volume, response: listOf('Snapshot'),
      handler: ({ params: p }) => service.listSnapshots(p.name),
    }),
    route({
      method: 'POST', url: '/v1/volumes/:name/snapshots', operationId: 'createSnapshot', tag: 'snapshots', summary: 'Snapshot an attached volume',
      params: params.volume, body: bodies.snapshotCreate, bodyOptional: true, status: 201, response: ref('Snapshot'),
      handler: ({ params: p, body }) => service.createSnapshot(p.name, body.name as string | undefined),
    }),
    route({
      method: 'DELETE', url: '/v1/volumes/:name/snapshots/:snapshot', operationId: 'deleteSnapshot', tag: 'snapshots', summary: 'Delete a snapshot of an attached volume',
      params: params.snapshot, status: 204,
      handler: ({ params: p }) => service.deleteSnapshot(p.name, p.snapshot),
    }),
    route({
      method: 'POST', url: '/v1/volumes/:name/snapshots/:snapshot/revert', operationId: 'revertSnapshot', tag: 'snapshots',
      summary: 'Revert a volume attached in maintenance mode to a snapshot',
      params: params.snapshot, status: 204,
      handler: ({ params: p }) => service.revertSnapshot(p.name, p.snapshot),
    }),

    // ---- replicas
    route({
      method: 'GET', url: '/v1/replicas', operationId: 'listReplicas', tag: 'replicas', summary: 'List replicas, optionally of one volume',
      querystring: queries.replicas, response: listOf('Replica'),
      handler: ({ query }) => service.listReplicas(query.volume === undefined ? {} : { volume: query.volume }),
    }),
    route({
      method: 'GET', url: '/v1/replicas/:name', operationId: 'getReplica', tag: 'replicas', summary: 'Get a replica',
      params: params.object, response: ref('Replica'),
      handler: ({ params: p }) => service.getReplica(p.name),
    }),
    route({
      method: 'POST', url: '/v1/replicas/:name/move', operationId: 'moveReplica', tag: 'replicas',
      summary: 'Move a replica to another disk or node with no downtime: a new replica is rebuilt while this one serves, then this one is removed (returns at once)',
      params: params.object, body: bodies.replicaMove, response: ref('Replica'),
      handler: ({ params: p, body }) => service.moveReplica(p.name, (body ?? {}) as { diskId?: string; nodeId?: string }),
    }),

    // ---- nodes and disks
    route({
      method: 'GET', url: '/v1/nodes', operationId: 'listNodes', tag: 'nodes', summary: 'List nodes',
      response: listOf('Node'),
      handler: () => service.listNodes(),
    }),
    route({
      method: 'GET', url: '/v1/nodes/:name', operationId: 'getNode', tag: 'nodes', summary: 'Get a node',
      params: params.object, response: ref('Node'),
      handler: ({ params: p }) => service.getNode(p.name),
    }),
    route({
      method: 'PATCH', url: '/v1/nodes/:name', operationId: 'updateNode', tag: 'nodes', summary: 'Change a node (scheduling on/off, eviction)',
      params: params.object, body: bodies.nodeUpdate, response: ref('Node'),
      handler: ({ params: p, body }) => service.updateNode(p.name, body as { allowScheduling?: boolean; evict?: boolean }),
    }),
    route({
      method: 'GET', url: '/v1/disks', operationId: 'listDisks', tag: 'disks', summary: 'List disks',
      response: listOf('Disk'),
      handler: () => service.listDisks(),
    }),
    route({
      method: 'GET', url: '/v1/disks/:name', operationId: 'getDisk', tag: 'disks', summary: 'Get a disk',
      params: params.object, response: ref('Disk'),
      handler: ({ params: p }) => service.getDisk(p.name),
    }),
    route({
      method: 'PATCH', url: '/v1/disks/:name', operationId: 'updateDisk', tag: 'disks', summary: 'Change a disk (scheduling on/off, reserved bytes, eviction)',
      params: params.object, body: bodies.diskUpdate, response: ref('Disk'),
      handler: ({ params: p, body }) => service.updateDisk(p.name, body as { allowScheduling?: boolean; storageReservedBytes?: number; evict?: boolean }),
    }),

    // ---- settings and events
    route({
      method: 'GET', url: '/v1/settings', operationId: 'listSettings', tag: 'settings', summary: 'List settings with their values and defaults',
      response: listOf('Setting'),
      handler: () => service.listSettings(),
    }),
    route({
      method: 'GET', url: '/v1/settings/:name', operationId: 'getSetting', tag: 'settings', summary: 'Get a setting',
      params: params.object, response: ref('Setting'),
      handler: ({ params: p }) => service.getSetting(p.name),
    }),
    route({
      method: 'PUT', url: '/v1/settings/:name', operationId: 'setSetting', tag: 'settings', summary: 'Set a setting (checked against its type and range)',
      params: params.object, body: bodies.settingSet, response: ref('Setting'),
      handler: ({ params: p, body }) => service.setSetting(p.name, body.value as string),
    }),
    route({
      method: 'GET', url: '/v1/events', operationId: 'listEvents', tag: 'events', summary: 'Events, newest first',
      querystring: queries.events, response: listOf('Event'),
      handler: ({ query }) => {
        const filter: { volume?: string; limit?: number } = {};
        if (query.volume !== undefined) filter.volume = query.volume;
        if (query.limit !== undefined) filter.limit = limit(query.limit);
        return service.listEvents(filter);
      },
    }),
    ...(backups === null ? [] : backupRoutes(backups, route)),
    ...(recurringJobs === null ? [] : recurringJobRoutes(recurringJobs, route)),
    ...(backingImages === null ? [] : backingImageRoutes(backingImages, route)),
    ...(backups === null ? [] : [route({
      method: 'POST', url: '/v1/backups/:name/restore', operationId: 'restoreBackup', tag: 'backups',
      summary: 'Restore a backup into a new volume (or a DR standby); returns at once: poll the volume',
      params: params.backup, body: bodies.backupRestore, status: 201, response: ref('Volume'),
      handler: ({ params: p, body }) => service.createVolume({
        name: body.name as string,
        fromBackup: p.name,
        ...(body.numberOfReplicas !== undefined ? { numberOfReplicas: body.numberOfReplicas as number } : {}),
        ...(body.sizeBytes !== undefined ? { sizeBytes: body.sizeBytes as number } : {}),
        ...(body.standby !== undefined ? { standby: body.standby as boolean } : {}),
      }),
    })]),
  ];
}

type RouteMaker = (spec: Omit<RouteSpec, 'auth' | 'status'> & { auth?: boolean; status?: RouteSpec['status'] }) => RouteSpec;

function backingImageRoutes(images: BackingImageService, route: RouteMaker): RouteSpec[] {
  return [
    route({
      method: 'GET', url: '/v1/backingimages', operationId: 'listBackingImages', tag: 'backing images',
      summary: 'List backing images: state, checksum, and every file with its disk, state and progress',
      response: listOf('BackingImage'),
      handler: () => images.listBackingImages(),
    }),
    route({
      method: 'POST', url: '/v1/backingimages', operationId: 'createBackingImage', tag: 'backing images',
      summary: 'Create a backing image: downloaded from an http(s) URL, uploaded afterwards, or exported from a volume\'s snapshot (returns at once: poll the image until ready)',
      body: bodies.backingImageCreate, status: 201, response: ref('BackingImage'),
      handler: ({ body }) => images.createBackingImage(body as BackingImageInput & { name?: unknown }),
    }),
    route({
      method: 'GET', url: '/v1/backingimages/:name', operationId: 'getBackingImage', tag: 'backing images', summary: 'Get a backing image',
      params: params.backingImage, response: ref('BackingImage'),
      handler: ({ params: p }) => images.getBackingImage(p.name),
    }),
    route({
      method: 'PUT', url: '/v1/backingimages/:name/upload', operationId: 'uploadBackingImage', tag: 'backing images',
      summary: 'Send the bytes of an upload image (application/octet-stream); answers once they are written and verified',
      params: params.backingImage, consumes: 'application/octet-stream', response: ref('BackingImage'),
      handler: ({ params: p, stream, contentLength }) => {
        if (stream === undefined) throw new ZebuError(ErrorCode.EINVAL, 'send the image as the request body with Content-Type: application/octet-stream');
        return images.uploadBackingImage(p.name, stream, contentLength ?? null);
      },
    }),
    route({
      method: 'POST', url: '/v1/backingimages/:name/backup', operationId: 'backupBackingImage', tag: 'backing images',
      summary: 'Store the image in the backup target (once per content: its SHA-512 names it); answers when it is there',
      params: params.backingImage, response: ref('BackingImage'), bodyOptional: true,
      handler: ({ params: p }) => images.backupBackingImage(p.name),
    }),
    route({
      method: 'DELETE', url: '/v1/backingimages/:name', operationId: 'deleteBackingImage', tag: 'backing images',
      summary: 'Delete a backing image (its files are removed, then the image)',
      params: params.backingImage, response: ref('BackingImage'),
      handler: ({ params: p }) => images.deleteBackingImage(p.name),
    }),
  ];
}

function recurringJobRoutes(jobs: RecurringJobService, route: RouteMaker): RouteSpec[] {
  return [
    route({
      method: 'GET', url: '/v1/recurringjobs', operationId: 'listRecurringJobs', tag: 'recurring jobs',
      summary: 'List recurring jobs: schedule, next and last run, the volumes each covers and their last results',
      response: listOf('RecurringJob'),
      handler: () => jobs.listRecurringJobs(),
    }),
    route({
      method: 'POST', url: '/v1/recurringjobs', operationId: 'createRecurringJob', tag: 'recurring jobs',
      summary: 'Create a recurring job (snapshot, snapshot-cleanup, snapshot-delete, backup, backup-force-create on a cron schedule)',
      body: bodies.recurringJobCreate, status: 201, response: ref('RecurringJob'),
      handler: ({ body }) => jobs.createRecurringJob(body),
    }),
    route({
      method: 'GET', url: '/v1/recurringjobs/:name', operationId: 'getRecurringJob', tag: 'recurring jobs', summary: 'Get a recurring job',
      params: params.recurringJob, response: ref('RecurringJob'),
      handler: ({ params: p }) => jobs.getRecurringJob(p.name),
    }),
    route({
      method: 'PATCH', url: '/v1/recurringjobs/:name', operationId: 'updateRecurringJob', tag: 'recurring jobs',
      summary: 'Change fields of a recurring job (checked as a whole; a new schedule starts from now)',
      params: params.recurringJob, body: bodies.recurringJobUpdate, response: ref('RecurringJob'),
      handler: ({ params: p, body }) => jobs.updateRecurringJob(p.name, body as RecurringJobInput),
    }),
    route({
      method: 'DELETE', url: '/v1/recurringjobs/:name', operationId: 'deleteRecurringJob', tag: 'recurring jobs',
      summary: 'Delete a recurring job (volumes stop naming it; what it made is kept)',
      params: params.recurringJob, response: ref('RecurringJob'),
      handler: ({ params: p }) => jobs.deleteRecurringJob(p.name),
    }),
    route({
      method: 'PUT', url: '/v1/volumes/:name/recurringjobs', operationId: 'setVolumeRecurringJobs', tag: 'recurring jobs',
      summary: 'Set the recurring jobs (by name) and groups a volume joins; with neither it is in the group default',
      params: params.volume, body: bodies.volumeRecurringJobs, response: ref('VolumeRecurringJobs'),
      handler: ({ params: p, body }) => jobs.setVolumeJobs(p.name, body),
    }),
  ];
}

function backupRoutes(backups: BackupService, route: RouteMaker): RouteSpec[] {
  return [
    route({
      method: 'GET', url: '/v1/backuptargets', operationId: 'listBackupTargets', tag: 'backups', summary: 'The backup target (a list of at most one; credentials are never shown)',
      response: listOf('BackupTarget'),
      handler: async () => {
        try {
          return [await backups.getBackupTarget()];
        } catch (err) {
          if ((err as { code?: string }).code === 'ZEBU_ERR_NOT_FOUND') return [];
          throw err;
        }
      },
    }),
    route({
      method: 'GET', url: '/v1/backuptargets/default', operationId: 'getBackupTarget', tag: 'backups', summary: 'The backup target and whether it was reachable at the last check',
      response: ref('BackupTarget'),
      handler: () => backups.getBackupTarget(),
    }),
    route({
      method: 'PUT', url: '/v1/backuptargets/default', operationId: 'setBackupTarget', tag: 'backups',
      summary: 'Set the backup target (file:///DIR or s3://BUCKET/PREFIX); it is checked at once and its backups listed into the catalog',
      body: bodies.backupTargetSet, response: ref('BackupTarget'),
      handler: ({ body }) => backups.setBackupTarget(body as unknown as BackupTargetSetInput),
    }),
    route({
      method: 'POST', url: '/v1/backuptargets/default/check', operationId: 'checkBackupTarget', tag: 'backups', summary: 'Check that the target is reachable and writable (a probe object is written, read and removed)',
      response: ref('BackupTarget'),
      handler: () => backups.checkBackupTarget(),
    }),
    route({
      method: 'POST', url: '/v1/backuptargets/default/sync', operationId: 'syncBackupTarget', tag: 'backups', summary: 'Rebuild the catalog from the target: backups found there are added, those gone are removed',
      response: ref('BackupSync'),
      handler: () => backups.syncBackupTarget(),
    }),
    route({
      method: 'POST', url: '/v1/backuptargets/default/verify', operationId: 'verifyBackupTarget', tag: 'backups',
      summary: 'Read every block every backup refers to and check its hash; missing and corrupt blocks are listed by backup (answers when done)',
      body: bodies.backupTargetVerify, bodyOptional: true, response: ref('BackupTargetVerify'),
      handler: ({ body }) => backups.verifyBackupTarget(body as { volume?: string }),
    }),
    route({
      method: 'POST', url: '/v1/backuptargets/default/gc', operationId: 'gcBackupTarget', tag: 'backups', summary: 'Remove the blocks no backup refers to any more (runs by itself after deletes)',
      response: ref('BackupGc'),
      handler: () => backups.gcBackupTarget(),
    }),
    route({
      method: 'GET', url: '/v1/backups', operationId: 'listBackups', tag: 'backups', summary: 'List backups in the catalog, optionally of one volume',
      querystring: queries.backups, response: listOf('Backup'),
      handler: ({ query }) => backups.listBackups(query.volume === undefined ? {} : { volume: query.volume }),
    }),
    route({
      method: 'POST', url: '/v1/backups', operationId: 'createBackup', tag: 'backups',
      summary: 'Back up a volume (from a new snapshot, or the one named); returns at once (state pending): poll the backup',
      body: bodies.backupCreate, status: 201, response: ref('Backup'),
      handler: ({ body }) => backups.createBackup(body as { volume: string; snapshot?: string; labels?: Record<string, string> }),
    }),
    route({
      method: 'GET', url: '/v1/backups/:name', operationId: 'getBackup', tag: 'backups', summary: 'Get a backup (state, progress, what it uploaded)',
      params: params.backup, response: ref('Backup'),
      handler: ({ params: p }) => backups.getBackup(p.name),
    }),
    route({
      method: 'DELETE', url: '/v1/backups/:name', operationId: 'deleteBackup', tag: 'backups',
      summary: 'Delete a backup from the target and the catalog (its blocks no other backup uses are collected); returns at once',
      params: params.backup, response: ref('Backup'),
      handler: ({ params: p }) => backups.deleteBackup(p.name),
    }),
  ];
}
