/**
 * replica.json: what a replica is (size, layer tree, epoch). It changes rarely (create,
 * snapshot, delete, revert, a new epoch) and is always replaced atomically. Counters and presence
 * map pages, which change at every flush, live in the journal instead.
 */
import { crc32 } from 'node:zlib';
import { ZebuError, ErrorCode, invalid } from '../errors.ts';
import { BLOCK_SIZE } from './block-map.ts';

export const META_FILE = 'replica.json';
export const META_FORMAT = 1;
export const MAX_VOLUME_BYTES = 2 ** 44; // 16 TiB: block numbers stay below 2^32
export const DEFAULT_MAX_LAYERS = 256;
export const MAX_LAYERS_LIMIT = 1000;
const SNAPSHOT_NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$/;

export type LayerKind = 'base' | 'snapshot' | 'head';

export interface LayerMeta {
  id: string;
  kind: LayerKind;
  parent: string | null;
  /** Snapshot name; null for the head and the base. */
  name: string | null;
  createdAt: string;
  /** Base layer only: absolute path of the read-only image file and its size. */
  basePath?: string;
  baseSizeBytes?: number;
}

export interface ReplicaMeta {
  format: number;
  sizeBytes: number;
  epoch: number;
  maxLayers: number;
  nextLayerId: number;
  headId: string;
  layers: LayerMeta[];
  /**
   * Set while an engine copies the volume into this replica: until cleared it is no source.
   * `true` (or 'full'): a whole copy; 'delta': a copy of the regions it missed, which the next
   * engine may do again from the same missed-write maps.
   */
  rebuilding?: boolean | RebuildKind;
}

/** What a rebuild copies: the whole volume, or only the regions a replica missed. */
export type RebuildKind = 'full' | 'delta';

/** The rebuild a replica's metadata says stopped midway (or is under way), if any. */
export function rebuildKindOf(meta: ReplicaMeta): RebuildKind | null {
  if (meta.rebuilding === 'delta') return 'delta';
  return meta.rebuilding === true || meta.rebuilding === 'full' ? 'full' : null;
}

export function validateSizeBytes(sizeBytes: number): void {
  if (!Number.isSafeInteger(sizeBytes) || sizeBytes <= 0) throw invalid(`size must be a positive integer number of bytes, got ${sizeBytes}`);
  if (sizeBytes % BLOCK_SIZE !== 0) throw invalid(`size must be a multiple of ${BLOCK_SIZE} bytes, got ${sizeBytes}`);
  if (sizeBytes > MAX_VOLUME_BYTES) throw invalid(`size must be at most ${MAX_VOLUME_BYTES} bytes (16 TiB), got ${sizeBytes}`);
}

export function validateSnapshotName(name: unknown): asserts name is string {
  if (typeof name !== 'string' || !SNAPSHOT_NAME.test(name)) {
    throw invalid(`snapshot name must be 1-63 characters of [A-Za-z0-9._-] starting with a letter or digit, got ${JSON.stringify(name)}`);
  }
}

export function layerIdFor(n: number): string {
  return `L${String(n).padStart(8, '0')}`;
}

export function encodeMeta(meta: ReplicaMeta): Buffer {
  const body = JSON.stringify(meta);
  return Buffer.from(JSON.stringify({ crc32: crc32(body), body }) + '\n');
}

export function decodeMeta(raw: Buffer, where: string): ReplicaMeta {
  const corrupt = (why: string) => new ZebuError(ErrorCode.EIO, `replica metadata ${where} is unreadable: ${why}`);
  let outer: { crc32?: unknown; body?: unknown };
  try {
    outer = JSON.parse(raw.toString('utf8'));
  } catch (err) {
    throw corrupt(`not JSON (${(err as Error).message})`);
  }
  if (typeof outer.body !== 'string' || typeof outer.crc32 !== 'number') throw corrupt('missing body or checksum');
  if (crc32(outer.body) !== outer.crc32) throw corrupt('checksum mismatch');
  const meta = JSON.parse(outer.body) as ReplicaMeta;
  if (meta.format !== META_FORMAT) throw corrupt(`format ${meta.format} is not ${META_FORMAT}`);
  validateSizeBytes(meta.sizeBytes);
  const ids = new Set(meta.layers.map((l) => l.id));
  if (!ids.has(meta.headId)) throw corrupt('head layer missing');
  if (meta.rebuilding !== undefined && typeof meta.rebuilding !== 'boolean' && meta.rebuilding !== 'full' && meta.rebuilding !== 'delta') {
    throw corrupt(`rebuilding mark ${JSON.stringify(meta.rebuilding)} is none of true, false, "full", "delta"`);
  }
  for (const layer of meta.layers) {
    if (layer.parent !== null && !ids.has(layer.parent)) throw corrupt(`layer ${layer.id} has unknown parent ${layer.parent}`);
  }
  return meta;
}
