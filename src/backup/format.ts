/**
 * The backup format on a target: a contract users' data depends on (README "Backup format").
 * Change it only with a new format number, and keep reading the old ones.
 *
 *   zebu-backupstore.json                      {"format":1} — marks the root of a Zebu target
 *   blocks/HH/HH/<sha256>                      one block (header + payload), named by the
 *                                              SHA-256 of its uncompressed 2 MiB content
 *   volumes/<volume>/volume.json               the volume record (checksummed document)
 *   volumes/<volume>/backups/<backup>.json     a completed backup's manifest (checksummed)
 *   volumes/<volume>/backups/<backup>.partial  the manifest of a backup under way: the blocks
 *                                              it has stored or relies on so far
 *   volumes/<volume>/deleted/<backup>.json     a deleted backup's manifest, kept until the
 *                                              garbage collection has swept its blocks
 *
 * A block file: "ZBLK" | format u8 (1) | method u8 (0 none, 1 zstd) | reserved u16 |
 * uncompressed length u32 | 32-byte SHA-256 of the uncompressed content | payload. The method
 * is in every block, so blocks stay readable whatever a volume's method is later.
 *
 * A checksummed document: the JSON body on one line, then "sha256:<hex of the body line>\n".
 */
import crypto from 'node:crypto';
import zlib from 'node:zlib';
import { promisify } from 'node:util';
import { ZebuError, ErrorCode, assert } from '../errors.ts';

export const FORMAT = 1;
export const BACKUP_BLOCK_BYTES = 2 * 1024 * 1024;
export const STORE_MARKER_KEY = 'zebu-backupstore.json';

export const CompressionMethod = { NONE: 0, ZSTD: 1 } as const;
export type CompressionMethod = (typeof CompressionMethod)[keyof typeof CompressionMethod];
export type CompressionName = 'none' | 'zstd';
export const COMPRESSION_BY_NAME: Record<CompressionName, CompressionMethod> = { none: CompressionMethod.NONE, zstd: CompressionMethod.ZSTD };

const BLOCK_MAGIC = 0x5a424c4b; // ZBLK
export const BLOCK_HEADER_BYTES = 44;

const zstdCompress = promisify(zlib.zstdCompress);
/** Output chunk of zstd: larger than any compressed block (measured: 8x faster than the default 16 KiB, and 2x faster than the block size plus a margin). */
const ZSTD_CHUNK_BYTES = 2 * BACKUP_BLOCK_BYTES;
const zstdDecompress = promisify(zlib.zstdDecompress);

/**
 * Names: what a volume or a backup may be called (also a path part on the target). Longer than
 * the API's names: a backing image's backups go under `Image.NAME` (backing-image-backup.ts).
 */
export const NAME_PATTERN = /^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$/;
export const HASH_PATTERN = /^[0-9a-f]{64}$/;

export function blockKey(hash: string): string {
  assert(HASH_PATTERN.test(hash), `block hash ${hash}`);
  return `blocks/${hash.slice(0, 2)}/${hash.slice(2, 4)}/${hash}`;
}
export function volumeKey(volume: string): string {
  return `volumes/${checkName(volume, 'volume')}/volume.json`;
}
export function manifestKey(volume: string, backup: string): string {
  return `volumes/${checkName(volume, 'volume')}/backups/${checkName(backup, 'backup')}.json`;
}
export function partialKey(volume: string, backup: string): string {
  return `volumes/${checkName(volume, 'volume')}/backups/${checkName(backup, 'backup')}.partial`;
}
/** Segment n (1, 2, …) of a partial manifest: the blocks listed since segment n-1. */
export function partialSegmentKey(volume: string, backup: string, n: number): string {
  assert(Number.isSafeInteger(n) && n >= 1, `partial segment ${n}`);
  return `${partialKey(volume, backup)}.${String(n).padStart(6, '0')}`;
}
export function tombstoneKey(volume: string, backup: string): string {
  return `volumes/${checkName(volume, 'volume')}/deleted/${checkName(backup, 'backup')}.json`;
}

function checkName(name: string, what: string): string {
  if (!NAME_PATTERN.test(name)) throw new ZebuError(ErrorCode.EINVAL, `bad ${what} name ${JSON.stringify(name)}`);
  return name;
}

export function sha256(data: Buffer): string {
  return crypto.createHash('sha256').update(data).digest('hex');
}


export { isAllZero } from '../os/zeros.ts';

const SAMPLE_BYTES = 16 * 1024;
const SAMPLE_WINDOW_LOG = 14;
const SAMPLES = 4;

/** The samples of a block side by side (one compression call: most of a call's cost is its setup). */
const samples = Buffer.alloc(SAMPLE_BYTES * SAMPLES);

/**
 * Whether samples spread over the block do not shrink: then compressing all of it would cost
 * time for nothing (encrypted or already compressed data, random bytes). The samples are
 * compressed together, on the event loop: ~0.2 ms, less than a hand-off to the thread pool and
 * back, and a quarter of what four calls cost. A window no larger than a sample: a small
 * compression context, quickly set up, and no match across samples.
 */
function looksIncompressible(data: Buffer): boolean {
  if (data.length < SAMPLE_BYTES * SAMPLES * 4) return false;
  const step = Math.floor(data.length / SAMPLES);
  for (let i = 0; i < SAMPLES; i++) data.copy(samples, i * SAMPLE_BYTES, i * step, i * step + SAMPLE_BYTES);
  const packed = zlib.zstdCompressSync(samples, { params: { [zlib.constants.ZSTD_c_compressionLevel]: 1, [zlib.constants.ZSTD_c_windowLog]: SAMPLE_WINDOW_LOG } });
  return packed.length >= samples.length * 0.95;
}

/** Encodes a block: compressed when that makes it smaller, else stored as is. */
export async function encodeBlock(data: Buffer, hash: string, method: CompressionMethod): Promise<Buffer> {
  return Buffer.concat(await encodeBlockParts(data, hash, method));
}

/**
 * The same as its two parts, header and payload, to be written one after the other: a block
 * stored as is is then not copied (the payload is `data` itself).
 */
export async function encodeBlockParts(data: Buffer, hash: string, method: CompressionMethod): Promise<[Buffer, Buffer]> {
  assert(data.length > 0 && data.length <= BACKUP_BLOCK_BYTES, `block of ${data.length} bytes`);
  let payload = data;
  let used: CompressionMethod = CompressionMethod.NONE;
  if (method === CompressionMethod.ZSTD && !looksIncompressible(data)) {
    // One output chunk for the whole block: zlib's default 16 KiB chunks make it 8x slower.
    const packed = await zstdCompress(data, { chunkSize: ZSTD_CHUNK_BYTES, params: { [zlib.constants.ZSTD_c_compressionLevel]: 1 } });
    if (packed.length < data.length) {
      payload = packed;
      used = CompressionMethod.ZSTD;
    }
  }
  const header = Buffer.alloc(BLOCK_HEADER_BYTES);
  header.writeUInt32BE(BLOCK_MAGIC, 0);
  header.writeUInt8(FORMAT, 4);
  header.writeUInt8(used, 5);
  header.writeUInt16BE(0, 6);
  header.writeUInt32BE(data.length, 8);
  assert(header.write(hash, 12, 32, 'hex') === 32, `block name ${hash} is not a SHA-256`);
  return [header, payload];
}

/**
 * Decodes a block and checks it: its header, its length, and the SHA-256 of the uncompressed
 * content against `hash` (the name it was fetched by). Any mismatch is EIO naming the block.
 */
export async function decodeBlock(stored: Buffer, hash: string): Promise<Buffer> {
  const corrupt = (why: string): ZebuError => new ZebuError(ErrorCode.EIO, `block ${hash} is corrupt: ${why}`);
  if (stored.length < BLOCK_HEADER_BYTES || stored.readUInt32BE(0) !== BLOCK_MAGIC) throw corrupt('no block header');
  if (stored.readUInt8(4) !== FORMAT) throw corrupt(`unknown block format ${stored.readUInt8(4)}`);
  const method = stored.readUInt8(5);
  const length = stored.readUInt32BE(8);
  if (length === 0 || length > BACKUP_BLOCK_BYTES) throw corrupt(`length ${length}`);
  if (stored.toString('hex', 12, 44) !== hash) throw corrupt('its header names another block');
  const payload = stored.subarray(BLOCK_HEADER_BYTES);
  let data: Buffer;
  if (method === CompressionMethod.NONE) data = payload;
  else if (method === CompressionMethod.ZSTD) {
    try {
      data = await zstdDecompress(payload, { chunkSize: ZSTD_CHUNK_BYTES, maxOutputLength: BACKUP_BLOCK_BYTES });
    } catch (err) {
      throw corrupt(`cannot decompress: ${(err as Error).message}`);
    }
  } else throw corrupt(`unknown compression method ${method}`);
  if (data.length !== length) throw corrupt(`${data.length} bytes, the header says ${length}`);
  if (sha256(data) !== hash) throw corrupt('its content does not match its SHA-256');
  return data;
}

// ---- checksummed documents ----------------------------------------------------------------------

export function encodeDocument(body: object): Buffer {
  const line = JSON.stringify(body);
  assert(!line.includes('\n'), 'one line');
  return Buffer.from(`${line}\nsha256:${crypto.createHash('sha256').update(line).digest('hex')}\n`);
}

/** Parses a checksummed document; EIO naming `what` when it is damaged. */
export function decodeDocument(data: Buffer, what: string): unknown {
  const text = data.toString('utf8');
  const match = /^([^\n]*)\nsha256:([0-9a-f]{64})\n$/.exec(text);
  if (match === null) throw new ZebuError(ErrorCode.EIO, `${what} is damaged: not a checksummed document`);
  if (crypto.createHash('sha256').update(match[1]).digest('hex') !== match[2]) throw new ZebuError(ErrorCode.EIO, `${what} is damaged: its checksum does not match`);
  try {
    return JSON.parse(match[1]);
  } catch {
    throw new ZebuError(ErrorCode.EIO, `${what} is damaged: its body is not JSON`);
  }
}

// ---- manifests ------------------------------------------------------------------------------------

export interface BackupStats {
  /** Bytes of the volume read from the snapshot to make this backup. */
  readBytes: number;
  /** Bytes of new blocks written to the target (as stored: compressed). */
  uploadedBytes: number;
  uploadedBlocks: number;
  /** Blocks the target already had (same content) or the previous backup carried over. */
  reusedBlocks: number;
  /** Non-zero blocks the backup refers to. */
  blocks: number;
}

export interface Manifest {
  format: number;
  name: string;
  volume: string;
  sizeBytes: number;
  blockBytes: number;
  snapshot: string;
  createdAt: string;
  /** When the backup completed; null in a partial manifest. */
  completedAt: string | null;
  labels: Record<string, string>;
  compression: CompressionName;
  /** The backup whose blocks were carried over (incremental), or null (full read). */
  base: string | null;
  stats: BackupStats;
  /** [block index, SHA-256] of every block that is not all zeros, ascending by index. */
  blocks: [number, string][];
  /**
   * The backing image the volume was on, by name and SHA-512 (absent or null: none). For the
   * record only: the blocks hold every byte of the volume, the image's too.
   */
  backingImage?: { name: string; checksum: string } | null;
}

export function encodeManifest(m: Manifest): Buffer {
  return encodeDocument(m);
}

export function decodeManifest(data: Buffer, what: string): Manifest {
  const m = decodeDocument(data, what) as Manifest;
  const bad = (why: string): ZebuError => new ZebuError(ErrorCode.EIO, `${what} is damaged: ${why}`);
  if (typeof m !== 'object' || m === null) throw bad('not an object');
  if (m.format !== FORMAT) throw bad(`unknown format ${String(m.format)}`);
  if (typeof m.name !== 'string' || typeof m.volume !== 'string' || typeof m.snapshot !== 'string') throw bad('names');
  if (!Number.isSafeInteger(m.sizeBytes) || m.sizeBytes <= 0) throw bad('size');
  if (m.blockBytes !== BACKUP_BLOCK_BYTES) throw bad(`block size ${String(m.blockBytes)}`);
  if (!Array.isArray(m.blocks)) throw bad('block map');
  const count = Math.ceil(m.sizeBytes / m.blockBytes);
  let last = -1;
  for (const entry of m.blocks) {
    if (!Array.isArray(entry) || !Number.isSafeInteger(entry[0]) || entry[0] <= last || entry[0] >= count || !HASH_PATTERN.test(entry[1])) throw bad('block map entry');
    last = entry[0];
  }
  return m;
}

export interface VolumeRecord {
  format: number;
  volume: string;
  sizeBytes: number;
  compression: CompressionName;
  createdAt: string;
  /** The newest completed backup, when it was written. */
  lastBackup: string | null;
  lastBackupAt: string | null;
}

export function decodeVolumeRecord(data: Buffer, what: string): VolumeRecord {
  const v = decodeDocument(data, what) as VolumeRecord;
  if (typeof v !== 'object' || v === null || v.format !== FORMAT || typeof v.volume !== 'string') throw new ZebuError(ErrorCode.EIO, `${what} is damaged: not a volume record`);
  return v;
}

// ---- partial manifest segments -------------------------------------------------------------------

/** What a backup under way listed in one write: blocks it may upload, in the order listed. */
export interface PartialSegment {
  format: number;
  volume: string;
  backup: string;
  segment: number;
  blocks: [number, string][];
}

export function encodePartialSegment(s: PartialSegment): Buffer {
  return encodeDocument(s);
}

export function decodePartialSegment(data: Buffer, what: string, expect: { volume: string; backup: string; segment: number; sizeBytes: number }): PartialSegment {
  const s = decodeDocument(data, what) as PartialSegment;
  const bad = (why: string): ZebuError => new ZebuError(ErrorCode.EIO, `${what} is damaged: ${why}`);
  if (typeof s !== 'object' || s === null) throw bad('not an object');
  if (s.format !== FORMAT) throw bad(`unknown format ${String(s.format)}`);
  if (s.volume !== expect.volume || s.backup !== expect.backup || s.segment !== expect.segment) throw bad(`it names segment ${String(s.segment)} of backup ${String(s.backup)} (volume ${String(s.volume)})`);
  if (!Array.isArray(s.blocks)) throw bad('block list');
  const count = Math.ceil(expect.sizeBytes / BACKUP_BLOCK_BYTES);
  for (const entry of s.blocks) {
    if (!Array.isArray(entry) || !Number.isSafeInteger(entry[0]) || entry[0] < 0 || entry[0] >= count || !HASH_PATTERN.test(entry[1])) throw bad('block list entry');
  }
  return s;
}
