/**
 * JSON schemas of the REST API: request inputs (validated by fastify) and the views it returns
 * (used only for the OpenAPI document: responses are sent as the service builds them, never
 * filtered through a schema, so a field added to a view is never silently dropped).
 *
 * Field `description`s double as the wording of validation errors ("name must be <description>").
 */
import { VOLUME_NAME, MIN_VOLUME_BYTES, MAX_VOLUME_BYTES } from '../manager/service.ts';

export type JsonSchema = Record<string, unknown>;

/** The service checks the same limits; the schema rejects earlier and documents them. */
const MAX_REPLICAS = 20;
const SNAPSHOT_NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$/;
/** Names of nodes, disks, replicas and settings: chosen by Zebu, only bounded here. */
const OBJECT_NAME_MAX_CHARS = 253;

export const volumeName: JsonSchema = {
  type: 'string',
  pattern: VOLUME_NAME.source,
  description: '1-63 characters of [a-z0-9._-] starting with a letter or digit',
};

export const snapshotName: JsonSchema = {
  type: 'string',
  pattern: SNAPSHOT_NAME.source,
  description: '1-63 characters of [A-Za-z0-9._-] starting with a letter or digit',
};

export const objectName: JsonSchema = {
  type: 'string',
  minLength: 1,
  maxLength: OBJECT_NAME_MAX_CHARS,
  description: `1-${OBJECT_NAME_MAX_CHARS} characters`,
};

export const sizeBytes: JsonSchema = {
  type: 'integer',
  minimum: MIN_VOLUME_BYTES,
  maximum: MAX_VOLUME_BYTES,
  multipleOf: 4096,
  description: `volume size in bytes: a multiple of 4096 between ${MIN_VOLUME_BYTES} and ${MAX_VOLUME_BYTES} (16 TiB)`,
};

const numberOfReplicas: JsonSchema = {
  type: 'integer',
  minimum: 1,
  maximum: MAX_REPLICAS,
  description: `number of replicas, 1-${MAX_REPLICAS} (absent: the default-replica-count setting)`,
};

function object(properties: Record<string, JsonSchema>, required: string[] = []): JsonSchema {
  return { type: 'object', properties, required, additionalProperties: false };
}

// ---- request parts ------------------------------------------------------------------------------

export const backupName: JsonSchema = {
  type: 'string',
  pattern: SNAPSHOT_NAME.source,
  description: '1-63 characters of [A-Za-z0-9._-] starting with a letter or digit',
};

/** Recurring job and group names (checked again, with a clearer message, by the service). */
export const jobName: JsonSchema = {
  type: 'string',
  maxLength: 63,
  description: '1-63 lowercase letters, digits and -, starting and ending with a letter or digit',
};

const recurringJobFields: Record<string, JsonSchema> = {
  task: { type: 'string', enum: ['snapshot', 'snapshot-cleanup', 'snapshot-delete', 'backup', 'backup-force-create'], description: 'what the job does to each volume' },
  cron: { type: 'string', minLength: 1, maxLength: 128, description: 'cron schedule: 5 fields, or 6 with seconds first' },
  timezone: { type: 'string', minLength: 1, maxLength: 64, description: 'IANA time zone the schedule is read in (default UTC)' },
  retain: { type: 'integer', description: 'snapshots or backups the job keeps per volume, 1-250 (default 1)' },
  retainMaxAgeSeconds: { anyOf: [{ type: 'integer' }, { type: 'null' }], description: 'also remove what the job made longer ago than this (never the newest); null: no age limit' },
  concurrency: { type: 'integer', description: 'volumes processed at once, 1-100 (default 1)' },
  groups: { type: 'array', items: jobName, maxItems: 32, description: 'groups the job runs for (volumes join by group; `default`: volumes that name no job and no group)' },
  labels: { type: 'object', additionalProperties: { type: 'string', maxLength: 256 }, maxProperties: 32, description: 'labels (at most 32)' },
};

export const backingImageName: JsonSchema = {
  type: 'string',
  pattern: '^[a-z0-9][a-z0-9._-]{0,62}$',
  description: '1-63 characters of [a-z0-9._-] starting with a letter or digit',
};

export const params = {
  backingImage: object({ name: backingImageName }, ['name']),
  backup: object({ name: backupName }, ['name']),
  recurringJob: object({ name: jobName }, ['name']),
  volume: object({ name: volumeName }, ['name']),
  snapshot: object({ name: volumeName, snapshot: snapshotName }, ['name', 'snapshot']),
  object: object({ name: objectName }, ['name']),
};

const tags = {
  type: 'array', maxItems: 32,
  items: { type: 'string', pattern: '^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$', description: 'a tag: 1-63 characters of [A-Za-z0-9._-], first a letter or digit' },
};

const dataLocality = {
  type: 'string', enum: ['disabled', 'best-effort'],
  description: 'best-effort: keep a replica on the node the volume is attached on (one is moved there when that node can take it); default: the default-data-locality setting',
};

export const bodies = {
  backingImageCreate: object({
    name: backingImageName,
    url: { type: 'string', minLength: 1, maxLength: 2048, description: 'an http:// or https:// URL the image is downloaded from' },
    checksum: { type: 'string', description: 'SHA-512 of the image in hex (128 characters); absent: fixed at the first ready file' },
    minCopies: { type: 'integer', description: 'ready files wanted on different disks, 1-10 (default 2)' },
    nodeSelector: { type: 'array', items: objectName, maxItems: 64, description: 'nodes the files may be on (absent: any)' },
    diskSelector: { type: 'array', items: objectName, maxItems: 256, description: 'disks the files may be on (absent: any)' },
    upload: { type: 'boolean', description: 'true: the image is uploaded afterwards (PUT /v1/backingimages/NAME/upload)' },
    fromVolume: { ...volumeName, description: 'export the image from a snapshot of this (attached) volume' },
    snapshot: { ...snapshotName, description: 'with fromVolume: the snapshot' },
    fromBackup: { ...backupName, description: 'restore the image from this backup' },
  }, ['name']),
  recurringJobCreate: object({ name: jobName, ...recurringJobFields }, ['name', 'task', 'cron']),
  recurringJobUpdate: object(recurringJobFields),
  volumeRecurringJobs: object({
    recurringJobs: { type: 'array', items: jobName, maxItems: 64, description: 'jobs the volume joins by name (replaces the list)' },
    recurringJobGroups: { type: 'array', items: jobName, maxItems: 32, description: 'groups the volume joins (replaces the list; both empty: the group default)' },
  }),
  volumeCreate: {
    ...object(
      {
        name: volumeName,
        sizeBytes,
        numberOfReplicas,
        fromBackup: { ...backupName, description: 'a completed backup to restore into the new volume (sizeBytes then defaults to its size)' },
        standby: { type: 'boolean', description: 'with fromBackup: a DR standby that keeps applying newer backups until activated' },
        backingImage: { ...backingImageName, description: 'a backing image with a ready file: every replica reads it as its base layer (sizeBytes then defaults to its size)' },
        dataLocality,
        nodeSelector: { ...tags, description: 'tags every node holding a replica must carry' },
        diskSelector: { ...tags, description: 'tags every disk holding a replica must carry' },
      },
      ['name'],
    ),
    anyOf: [{ required: ['sizeBytes'] }, { required: ['fromBackup'] }, { required: ['backingImage'] }],
  },
  backupTargetSet: object(
    {
      url: { type: 'string', minLength: 1, maxLength: 1024, description: 'file:///DIR or s3://BUCKET/PREFIX' },
      endpoint: { anyOf: [{ type: 'string', maxLength: 1024 }, { type: 'null' }], description: 'S3: http(s)://HOST[:PORT] of an S3-compatible server (path-style addressing)' },
      region: { anyOf: [{ type: 'string', maxLength: 32 }, { type: 'null' }], description: 'S3 region (default us-east-1)' },
      credentials: {
        anyOf: [
          object({
            accessKeyId: { type: 'string', minLength: 1, maxLength: 512, description: 'S3 access key id' },
            secretAccessKey: { type: 'string', minLength: 1, maxLength: 512, description: 'S3 secret access key' },
            sessionToken: { type: 'string', maxLength: 4096, description: 'S3 session token' },
          }, ['accessKeyId', 'secretAccessKey']),
          { type: 'null' },
        ],
        description: 'S3 credentials (stored, never returned); null removes them; absent keeps them',
      },
    },
    ['url'],
  ),
  backupTargetVerify: object({ volume: volumeName }),
  backupCreate: object(
    {
      volume: volumeName,
      snapshot: snapshotName,
      labels: { type: 'object', additionalProperties: { type: 'string', maxLength: 256 }, maxProperties: 32, description: 'labels kept in the manifest (at most 32)' },
    },
    ['volume'],
  ),
  backupRestore: object(
    {
      name: volumeName,
      numberOfReplicas,
      sizeBytes,
      standby: { type: 'boolean', description: 'a DR standby: keeps applying newer backups of the same volume until activated' },
    },
    ['name'],
  ),
  volumeAttach: object({
    nodeId: objectName,
    maintenance: { type: 'boolean', description: 'attach without an NBD export (needed for snapshot revert)' },
  }),
  volumeExpand: object({ sizeBytes }, ['sizeBytes']),
  volumeUpdate: {
    ...object({
      dataLocality,
      nodeSelector: { ...tags, description: 'tags every node of a new replica must carry (replicas in place stay)' },
      diskSelector: { ...tags, description: 'tags every disk of a new replica must carry (replicas in place stay)' },
    }),
    minProperties: 1,
  },
  snapshotCreate: object({ name: snapshotName }),
  nodeUpdate: object({
    allowScheduling: { type: 'boolean', description: 'whether new replicas may be placed on the node' },
    evict: { type: 'boolean', description: 'true: every replica leaves the node (each rebuilt on another node first); false: stop evicting' },
    tags: { ...tags, description: 'the node\'s tags (replaces them), which volumes select nodes by' },
  }),
  diskUpdate: object({
    allowScheduling: { type: 'boolean', description: 'whether new replicas may be placed on the disk' },
    evict: { type: 'boolean', description: 'true: every replica leaves the disk (each rebuilt on another disk first); false: stop evicting' },
    storageReservedBytes: { type: 'integer', minimum: 0, maximum: Number.MAX_SAFE_INTEGER, description: 'bytes of the disk kept free of replicas' },
    tags: { ...tags, description: 'the disk\'s tags (replaces them), which volumes select disks by' },
  }),
  replicaMove: object({
    diskId: { ...objectName, description: 'the disk to move to' },
    nodeId: { ...objectName, description: 'the node to move to (any of its disks)' },
  }),
  volumeSalvage: object({
    replicas: {
      type: 'array', items: objectName, minItems: 1, maxItems: MAX_REPLICAS * 2,
      description: 'names of the replicas to bring back (absent: every replica of the volume)',
    },
  }),
  volumeVerify: object({ repair: { type: 'boolean', description: 'copy differing regions from the source replica into the others' } }),
  settingSet: object({ value: { type: 'string', maxLength: 4096, description: 'text of at most 4096 characters ("3", "true")' } }, ['value']),
};

export const queries = {
  replicas: object({ volume: volumeName }),
  backups: object({ volume: volumeName }),
  events: object({
    volume: volumeName,
    limit: { type: 'string', pattern: '^[0-9]{1,7}$', description: 'a whole number of events, 1-1000' },
  }),
};

// ---- views (responses) --------------------------------------------------------------------------

const nullable = (schema: JsonSchema): JsonSchema => ({ anyOf: [schema, { type: 'null' }] });
const str: JsonSchema = { type: 'string' };
const int: JsonSchema = { type: 'integer' };
const num: JsonSchema = { type: 'number' };
const bool: JsonSchema = { type: 'boolean' };
const time: JsonSchema = { type: 'string', format: 'date-time' };
const replicaMode: JsonSchema = { type: 'string', enum: ['RW', 'WO', 'ERR'] };
const processState: JsonSchema = { type: 'string', enum: ['stopped', 'starting', 'running', 'error'] };
const volumeState: JsonSchema = { type: 'string', enum: ['creating', 'detached', 'attaching', 'attached', 'detaching', 'deleting'] };
const backupState: JsonSchema = { type: 'string', enum: ['pending', 'in-progress', 'completed', 'error'] };
const robustness: JsonSchema = { type: 'string', enum: ['healthy', 'degraded', 'faulted', 'unknown'] };
const jobResult: JsonSchema = { type: 'string', enum: ['running', 'completed', 'skipped', 'suspended', 'error'] };

/** A view: every listed property is present (null where the type allows). */
function view(properties: Record<string, JsonSchema>): JsonSchema {
  return { type: 'object', properties, required: Object.keys(properties) };
}

export const views: Record<string, JsonSchema> = {
  VolumeReplicaSummary: view({
    name: str, nodeId: str, diskId: str, mode: nullable(replicaMode), state: processState,
    rebuildProgress: nullable({ type: 'number', minimum: 0, maximum: 1 }), failedAt: nullable(time),
  }),
  Volume: view({
    name: str, sizeBytes: int, currentSizeBytes: nullable(int), numberOfReplicas: int, state: volumeState, robustness, nodeId: nullable(str),
    frontend: bool, endpoint: nullable({ type: 'string', description: 'nbd://HOST:PORT/NAME while attached with a frontend' }),
    epoch: int, replicas: { type: 'array', items: { $ref: '#/components/schemas/VolumeReplicaSummary' } },
    rebuilding: bool, message: nullable(str), createdAt: time,
    rebuildLeases: nullable({ ...view({ grants: int, recalls: int, revokes: int, replays: int, copiersLost: int, writesWaited: int, longestWaitMs: num }), description: 'the running engine\'s rebuild region leases: granted, recalled by client writes, revoked after rebuild-lease-recall-timeout-ms, regions replayed after a revoke, copier processes lost while they copied (their regions copied again), client writes that waited for a lease (or a verify\'s claim) on their range and the longest wait in ms' }),
    lastRecovery: nullable({ $ref: '#/components/schemas/Recovery' }), lastVerify: nullable({ $ref: '#/components/schemas/Verify' }),
    engineLink: nullable({ $ref: '#/components/schemas/EngineLink' }),
    restore: nullable(view({
      backup: str, sourceVolume: str, standby: bool, state: backupState, applied: nullable(str),
      progress: { type: 'number', minimum: 0, maximum: 1 }, doneBytes: int, totalBytes: int, bytesPerSecond: num, message: nullable(str), completedAt: nullable(time),
    })),
    backingImage: nullable(view({ name: str, checksum: str })),
    dataLocality, nodeSelector: { type: 'array', items: str }, diskSelector: { type: 'array', items: str },
    heldByJob: nullable(view({ job: str, task: str, node: str, since: time })),
    pendingAttach: nullable(view({ nodeId: str, maintenance: bool, requestedAt: time })),
    lastBackup: nullable(str), lastBackupAt: nullable(time), recoveryPointAt: nullable(time), recoveryPointAgeSeconds: nullable(int),
    recurringJobs: {
      type: 'array',
      items: view({ name: str, task: str, nextRunAt: nullable(time), result: nullable(jobResult), message: nullable(str), at: nullable(time) }),
    },
  }),
  RecurringJob: view({
    name: str, task: str, cron: str, timezone: str, retain: int, retainMaxAgeSeconds: nullable(int), concurrency: int,
    groups: { type: 'array', items: str }, labels: { type: 'object', additionalProperties: str }, createdAt: time,
    lastRunAt: nullable(time), nextRunAt: nullable(time), members: { type: 'array', items: str },
    results: { type: 'array', items: view({ volume: str, result: jobResult, message: nullable(str), at: time }) },
  }),
  BackingImage: view({
    name: str,
    source: { type: 'object', properties: { type: { type: 'string', enum: ['download', 'upload', 'export-from-volume', 'restore'] } }, required: ['type'] },
    state: { type: 'string', enum: ['ready', 'in-progress', 'pending', 'failed'] },
    checksum: nullable(str), expectedChecksum: nullable(str), sizeBytes: int, minCopies: int, readyCopies: int,
    nodeSelector: { type: 'array', items: str }, diskSelector: { type: 'array', items: str },
    files: {
      type: 'array',
      items: view({
        disk: str, node: str, state: { type: 'string', enum: ['pending', 'starting', 'in-progress', 'ready', 'failed', 'unknown', 'cleaning'] },
        progress: { type: 'number', minimum: 0, maximum: 1 }, message: nullable(str), since: time, from: str,
      }),
    },
    refetch: view({ attempts: int, maxAttempts: int, notBefore: nullable(time), message: nullable(str) }),
    backup: nullable(view({ targetUrl: str, backup: str, at: time })), backupError: nullable(str),
    message: nullable(str), createdAt: time, deleting: bool,
  }),
  VolumeRecurringJobs: view({
    volume: str, recurringJobs: { type: 'array', items: str }, recurringJobGroups: { type: 'array', items: str }, jobs: { type: 'array', items: str },
  }),
  BackupTarget: view({
    name: str, url: str, endpoint: nullable(str), region: nullable(str), credentials: { type: 'string', enum: ['set', 'none'] },
    available: nullable(bool), message: nullable(str), checkedAt: nullable(time), lastSyncAt: nullable(time), lastGcAt: nullable(time),
    lastGc: nullable(view({ tombstones: int, removedBlocks: int, keptClaimed: int })), backups: int,
  }),
  Backup: view({
    name: str, volume: str, snapshot: str, state: backupState, progress: { type: 'number', minimum: 0, maximum: 1 }, doneBytes: int, totalBytes: int,
    bytesPerSecond: num, message: nullable(str), labels: { type: 'object', additionalProperties: str }, url: str, requestedAt: time,
    startedAt: nullable(time), completedAt: nullable(time), sizeBytes: int, base: nullable(str), backingImage: nullable(view({ name: str, checksum: str })), uploadedBytes: nullable(int), readBytes: nullable(int),
    blocks: nullable(int), deleting: bool,
  }),
  BackupSync: view({ volumes: int, added: { type: 'array', items: str }, removed: { type: 'array', items: str }, durationMs: num }),
  BackupGc: view({ tombstones: int, candidates: int, removedBlocks: int, keptClaimed: int, manifestsRead: int }),
  BackupTargetVerify: view({
    url: str, blocksChecked: int, bytesRead: int, missingBlocks: int, corruptBlocks: int, durationMs: num,
    backups: {
      type: 'array',
      items: view({
        volume: str, backup: str, blocks: int, manifestError: nullable(str),
        problems: { type: 'array', items: view({ hash: str, offset: int, problem: { type: 'string', enum: ['missing', 'corrupt'] }, message: str }) },
      }),
    },
  }),
  EngineLink: view({
    state: { type: 'string', enum: ['OPEN', 'CLOSE', 'REOPENING'], description: 'OPEN: forwarding to the engine; CLOSE: no engine, client requests held; REOPENING: held requests re-issued to a new engine' },
    stateSince: time, reopens: int, reissued: int, hangs: int, longestHoldMs: num, held: int,
    lastClose: nullable(view({ at: time, kind: { type: 'string', enum: ['engine-lost', 'engine-hung', 'frontend-restarted'] }, cause: str, outstanding: int })),
  }),
  Recovery: view({
    at: time, clean: bool, source: nullable(str), checkedRegions: int, regions: int, bytes: int, durationMs: num,
    deltaReplicas: { type: 'array', items: str }, erredReplicas: { type: 'array', items: str },
  }),
  VerifyDifference: view({
    region: int, offset: int, length: int,
    hashes: { type: 'object', additionalProperties: str, description: 'replica name -> SHA-256 (hex) of the region on it' },
  }),
  Verify: view({
    at: time, repair: bool, regions: int,
    replicas: { type: 'array', items: str, description: 'the replicas compared (those RW when it ran)' },
    differing: { type: 'array', items: { $ref: '#/components/schemas/VerifyDifference' } },
    repaired: int, durationMs: num,
  }),
  Snapshot: view({ name: str, createdAt: time, parent: nullable(str), sizeBytesUsed: int, inChain: bool }),
  Replica: view({
    name: str, volumeName: str, nodeId: str, diskId: str, dataPath: str, sizeBytes: int,
    desireState: { type: 'string', enum: ['running', 'stopped'] }, state: processState, mode: nullable(replicaMode),
    address: nullable(str), pid: nullable(int), restarts: int,
    rebuild: nullable(view({ copiedBytes: int, totalBytes: int, delta: bool })),
    healthyAt: nullable(time), failedAt: nullable(time), message: nullable(str),
    leaving: nullable({
      ...view({ reason: str, diskId: nullable(str), nodeId: nullable(str), requestedAt: nullable(time) }),
      description: 'the replica is to leave its disk (moved, or its disk or node evicted): a new replica is built first, then it is removed',
    }),
  }),
  Node: view({
    name: str, address: str, allowScheduling: bool, ready: bool, lastHeartbeatAt: nullable(time),
    nbdAddress: nullable(str), disks: { type: 'array', items: str }, evict: bool, replicaCount: int,
    leader: { type: 'boolean', description: 'its manager runs the cluster\'s controllers and serves the API now' },
    agentEndpoint: { ...nullable(str), description: 'HOST:PORT where the leader reaches its agent (a cluster store); null on one machine' },
    tags: { type: 'array', items: str },
  }),
  Disk: view({
    name: str, nodeId: str, path: str, allowScheduling: bool, storageReservedBytes: int, storageMaximumBytes: int,
    storageAvailableBytes: int, storageScheduledBytes: int, ready: bool, message: nullable(str), evict: bool, replicaCount: int,
    tags: { type: 'array', items: str },
  }),
  Setting: view({ name: str, value: str, default: str, type: { type: 'string', enum: ['int', 'bool', 'string'] }, description: str }),
  Event: view({
    time, type: { type: 'string', enum: ['Normal', 'Warning'] }, reason: str, message: str, kind: str, object: str, volume: nullable(str),
  }),
  Error: view({
    error: {
      type: 'object',
      properties: {
        code: { type: 'string', description: 'EINVAL, UNAUTHORIZED, NOT_FOUND, EXISTS, CONFLICT, BUSY, ENOSPC, EIO, ...' },
        message: str,
        field: { type: 'string', description: 'the request field at fault (400 only)' },
      },
      required: ['code', 'message'],
    },
  }),
  Health: view({ ok: { const: true } }),
  Access: view({ access: { enum: ['read-write', 'read-only'], description: 'what the token presented allows: read-only may only look (GET)' } }),
};

export const ref = (name: keyof typeof views & string): JsonSchema => ({ $ref: `#/components/schemas/${name}` });
export const listOf = (name: keyof typeof views & string): JsonSchema => ({ type: 'array', items: ref(name) });
