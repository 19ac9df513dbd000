/**
 * The flush journal: two slot files written alternately. A record holds the counters and the
 * full image of every presence-map page that changed since the previous record. It is the
 * commit point of a flush:
 *
 *   1. fdatasync the data files written since the last flush
 *   2. fdatasync the map files written when the previous record was applied
 *   3. write record N to slot N % 2, fdatasync it            <- the flush is durable here
 *   4. write the record's pages into the map files (synced at step 2 of the next flush)
 *
 * A torn record fails its checksum and the other slot (record N-1, whose pages step 2 made
 * durable in the map files) is used. Replaying a record is idempotent.
 */
import { crc32 } from 'node:zlib';
import { assert } from '../errors.ts';
import { MAP_PAGE_BYTES } from './block-map.ts';

export const JOURNAL_SLOTS = ['journal.0', 'journal.1'] as const;
const MAGIC = 0x5a4a4e4c; // "ZJNL"
const HEADER_BYTES = 24;

export interface JournalCounters {
  revision: number;
  flushedRevision: number;
  clean: boolean;
  /** The epoch when a record last advanced flushedRevision (absent in old records: 0). */
  writeEpoch: number;
}

export interface JournalPage {
  layerId: string;
  pageIndex: number;
  bytes: Uint8Array;
}

export interface JournalRecord extends JournalCounters {
  seq: number;
  pages: JournalPage[];
}

export function encodeRecord(record: JournalRecord): Buffer {
  const head = Buffer.from(
    JSON.stringify({
      revision: record.revision,
      flushedRevision: record.flushedRevision,
      clean: record.clean,
      writeEpoch: record.writeEpoch,
      pages: record.pages.map((p) => [p.layerId, p.pageIndex]),
    }),
  );
  const bodyBytes = 4 + head.length + record.pages.length * MAP_PAGE_BYTES;
  const buf = Buffer.alloc(HEADER_BYTES + bodyBytes);
  buf.writeUInt32BE(MAGIC, 0);
  buf.writeUInt32BE(Math.floor(record.seq / 2 ** 32), 4);
  buf.writeUInt32BE(record.seq >>> 0, 8);
  buf.writeUInt32BE(bodyBytes, 12);
  let at = HEADER_BYTES;
  buf.writeUInt32BE(head.length, at);
  at += 4;
  head.copy(buf, at);
  at += head.length;
  for (const page of record.pages) {
    assert(page.bytes.length === MAP_PAGE_BYTES, 'journal page size');
    buf.set(page.bytes, at);
    at += MAP_PAGE_BYTES;
  }
  buf.writeUInt32BE(crc32(buf.subarray(HEADER_BYTES)), 16);
  buf.writeUInt32BE(crc32(buf.subarray(0, 20)), 20);
  return buf;
}

/** Decodes a slot file; null when empty, torn or corrupt. */
export function decodeRecord(buf: Buffer): JournalRecord | null {
  if (buf.length < HEADER_BYTES) return null;
  if (buf.readUInt32BE(0) !== MAGIC) return null;
  if (crc32(buf.subarray(0, 20)) !== buf.readUInt32BE(20)) return null;
  const bodyBytes = buf.readUInt32BE(12);
  if (buf.length < HEADER_BYTES + bodyBytes) return null;
  const body = buf.subarray(HEADER_BYTES, HEADER_BYTES + bodyBytes);
  if (crc32(body) !== buf.readUInt32BE(16)) return null;
  const seq = buf.readUInt32BE(4) * 2 ** 32 + buf.readUInt32BE(8);
  const headLength = body.readUInt32BE(0);
  const head = JSON.parse(body.subarray(4, 4 + headLength).toString('utf8')) as {
    revision: number;
    flushedRevision: number;
    clean: boolean;
    writeEpoch?: number;
    pages: [string, number][];
  };
  let at = 4 + headLength;
  const pages: JournalPage[] = [];
  for (const [layerId, pageIndex] of head.pages) {
    pages.push({ layerId, pageIndex, bytes: body.subarray(at, at + MAP_PAGE_BYTES) });
    at += MAP_PAGE_BYTES;
  }
  assert(at === body.length, 'journal record length');
  return { seq, revision: head.revision, flushedRevision: head.flushedRevision, clean: head.clean, writeEpoch: head.writeEpoch ?? 0, pages };
}
