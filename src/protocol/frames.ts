/**
 * The engine <-> replica data protocol: binary frames over TCP, many requests in flight per
 * connection, matched by request id. No JSON on the data path (JSON only in control payloads).
 *
 * Request header, 36 bytes, big-endian:
 *   0 magic u32 "ZBRQ" | 4 op u8 | 5 flags u8 | 6 reserved u16 | 8 requestId u32
 *  12 epoch u64 (hi, lo) | 20 offset u64 (hi, lo) | 28 length u32 | 32 payloadLength u32
 * Response header, 16 bytes:
 *   0 magic u32 "ZBRS" | 4 requestId u32 | 8 status u32 (0 ok, else a wire error) | 12 payloadLength u32
 * An error response's payload is the UTF-8 message.
 */

export const REQUEST_MAGIC = 0x5a425251; // ZBRQ
export const RESPONSE_MAGIC = 0x5a425253; // ZBRS
export const REQUEST_HEADER_BYTES = 36;
export const RESPONSE_HEADER_BYTES = 16;

/** Largest READ/WRITE payload (the NBD frontend's maximum block size is 32 MiB). */
export const MAX_IO_BYTES = 32 * 1024 * 1024;
/** Largest payload of a control request (snapshot names, fault rules). */
export const MAX_CONTROL_BYTES = 64 * 1024;
/** Largest range a BLOCK_STATUS, TRIM or WRITE_ZEROES may cover in one request. */
export const MAX_RANGE_BYTES = 0xffff_ffff;

export const Op = {
  READ: 1,
  WRITE: 2,
  TRIM: 3,
  WRITE_ZEROES: 4,
  FLUSH: 5,
  BLOCK_STATUS: 6,
  INFO: 7,
  OPEN: 8,
  SNAPSHOT_CREATE: 9,
  SNAPSHOT_LIST: 10,
  SNAPSHOT_DELETE: 11,
  SNAPSHOT_REVERT: 12,
  PING: 13,
  FAULT_INJECT: 14,
  /** Grow the replica to `offset` bytes (online volume expansion). */
  EXPAND: 15,
  /** Take `offset` as the write counter, durably (the end of a rebuild). */
  SET_REVISION: 16,
  /** Mark (offset 1) or clear (offset 0) the replica as being rebuilt, durably. */
  SET_REBUILDING: 17,
  /** The write-intent log: JSON {regionBytes, active, pinned, missed: {key: count}}. */
  INTENT_GET: 18,
  /** Start (or extend) the missed-write map of replica key = payload (utf8). */
  MISSED_START: 19,
  /** Payload key -> JSON {regions: number[], partial: [region, bytes copied][]}, or NOT_FOUND. */
  MISSED_GET: 20,
  /** Drop the missed-write map of key = payload. */
  MISSED_DROP: 21,
  /** Payload JSON string[]: drop every missed-write map whose key is not listed. */
  MISSED_PRUNE: 22,
  /** SHA-256 (32 bytes) of the live volume's bytes at offset/length (length <= MAX_IO_BYTES); payload: a snapshot's name to hash its bytes instead. */
  REGION_HASH: 23,
  /** Payload JSON {key, regions: number[], invalid?: boolean}: add to (or invalidate) a missed-write map. */
  MISSED_MERGE: 24,
  /**
   * Payload JSON number[]: these regions are the same and durable on every replica (an engine's
   * start-up compared them and flushed): they leave the write-intent log now, so that a start-up
   * killed midway does not compare them again.
   */
  INTENT_RELEASE: 25,
  /**
   * Payload JSON {snapshot, base, aboveImage?}: extents of offset/length where snapshot (null:
   * the live volume) may differ from its ancestor snapshot base (null: from zeros; with
   * aboveImage: from the backing image); `data` true = changed. For incremental backups, and
   * rebuilds of volumes on a backing image.
   */
  SNAPSHOT_CHANGES: 26,
  /**
   * A rebuild's copy to its target under a region lease: payload = lease id (u64) then the data
   * (`length` bytes). Refused with LEASE_REVOKED once the engine revoked the lease.
   */
  COPY_WRITE: 27,
  /** As COPY_WRITE, the range [offset, offset+length) reading as zeros: payload = lease id (u64). */
  COPY_ZERO: 28,
  /** The engine revokes lease `offset` on the target; answered once its copy writes in flight landed. */
  LEASE_REVOKE: 29,
  /**
   * Payload JSON {key, regions: number[], progress?: [region, bytes][]}: a rebuild copied these
   * regions to replica key; they leave key's missed-write map, except those the write-intent log
   * holds active (written here since, or still in flight: the copy may not have them). `progress`:
   * regions whose first `bytes` were copied (the same rule): MISSED_GET then lists them in
   * `partial`, until a write to one makes it whole again. Applied at arrival, ordered with the
   * writes of the connection.
   */
  MISSED_CLEAR: 30,
  /**
   * A rebuild's copy pulled by its target: the target reads [offset, offset+length) of the live
   * volume from the source replica itself (not through the engine) and writes it as COPY_WRITE
   * would, under the lease. Payload = lease id (u64), then JSON {source: "HOST:PORT", name?,
   * zeros?, snapshot?}: `name` is the source's replica name (checked: a stale address is refused),
   * `zeros` marks a chunk that reads as zeros instead of writing it, `snapshot` reads that
   * snapshot of the source instead of its live volume (a full rebuild's snapshot layers). The request's epoch is used to read
   * the source. A failure of the source is SOURCE_FAILED (the target is fine).
   */
  COPY_FROM: 31,
  /**
   * Frontend -> engine: the replicas the frontend may read from itself (its read view). `offset`
   * = the generation the frontend holds, `length` = how long the engine may hold the request
   * (ms). Answered (JSON ReadView) at once when the engine's generation differs, else when it
   * changes or the hold ends. A view's replica that leaves RW is withdrawn by the answer, written
   * before the answer of any write acknowledged without that replica (docs/architecture.md).
   */
  READ_VIEW: 32,
  /** Frontend -> engine: payload 3 x u64 = reads served from the read view, their bytes and microseconds (for the engine's stats). */
  READ_REPORT: 33,
  /**
   * Frontend -> engine: a replica of the read view failed a direct read itself (its disk, or no
   * answer in time): payload JSON {host, port, instance, error}. The engine takes that replica out
   * as it does one that fails a read of its own, when it is still the same RW replica.
   */
  READ_FAILED: 34,
} as const;
export type Op = (typeof Op)[keyof typeof Op];

export const OpName: Record<number, string> = Object.fromEntries(Object.entries(Op).map(([k, v]) => [v, k]));

/**
 * FLUSH carries the engine's flush sequence number in `offset` (0: unnumbered) and, optionally,
 * an 8-byte payload (u64) `confirmed`: every FLUSH numbered <= confirmed has completed on every
 * replica of the write set. The write-intent log uses both (src/replica/intent-log.ts).
 */
export const FLUSH_CONFIRMED_BYTES = 8;

export function encodeFlushConfirmed(confirmed: number): Buffer {
  const buf = Buffer.allocUnsafe(FLUSH_CONFIRMED_BYTES);
  writeU64(buf, confirmed, 0);
  return buf;
}

/** Replica keys of missed-write maps (the manager's replica names, or host:port). */
export const MISSED_KEY = /^[A-Za-z0-9._:@=-]{1,200}$/;

export const RequestFlag = {
  /** Write: durable before the reply. */
  FUA: 1,
  /**
   * FLUSH: every confirmed region leaves the write-intent log now, however recently written (the
   * engine is at its bound of active regions). Without it, a confirmed region stays until it has
   * been idle for INTENT_IDLE_MS, so a hot region is not activated again and again.
   */
  EVICT: 2,
  /**
   * WRITE_ZEROES: the client asked the range to stay allocated (NBD's NO_HOLE): zeros are marked,
   * no hole is punched. Without it TRIM and WRITE_ZEROES give the data file's blocks back.
   */
  NO_HOLE: 4,
} as const;

export interface RequestHeader {
  op: number;
  flags: number;
  requestId: number;
  epoch: number;
  offset: number;
  length: number;
  payloadLength: number;
}

const TWO_32 = 2 ** 32;

export function writeU64(buf: Buffer, value: number, at: number): void {
  buf.writeUInt32BE(Math.floor(value / TWO_32), at);
  buf.writeUInt32BE(value >>> 0, at + 4);
}

export function readU64(buf: Buffer, at: number): number {
  // Above 2^53 the value is not exact: callers range-check it, so it can only be rejected.
  return buf.readUInt32BE(at) * TWO_32 + buf.readUInt32BE(at + 4);
}

export function encodeRequestHeader(buf: Buffer, h: RequestHeader): void {
  buf.writeUInt32BE(REQUEST_MAGIC, 0);
  buf[4] = h.op;
  buf[5] = h.flags;
  buf.writeUInt16BE(0, 6);
  buf.writeUInt32BE(h.requestId, 8);
  writeU64(buf, h.epoch, 12);
  writeU64(buf, h.offset, 20);
  buf.writeUInt32BE(h.length, 28);
  buf.writeUInt32BE(h.payloadLength, 32);
}

export function decodeRequestHeader(buf: Buffer): RequestHeader {
  return {
    op: buf[4],
    flags: buf[5],
    requestId: buf.readUInt32BE(8),
    epoch: readU64(buf, 12),
    offset: readU64(buf, 20),
    length: buf.readUInt32BE(28),
    payloadLength: buf.readUInt32BE(32),
  };
}

export function encodeResponseHeader(buf: Buffer, requestId: number, status: number, payloadLength: number): void {
  buf.writeUInt32BE(RESPONSE_MAGIC, 0);
  buf.writeUInt32BE(requestId, 4);
  buf.writeUInt32BE(status, 8);
  buf.writeUInt32BE(payloadLength, 12);
}

/** Largest payload a request of this op may carry. */
export function maxPayloadFor(op: number): number {
  if (op === Op.WRITE) return MAX_IO_BYTES;
  if (op === Op.COPY_WRITE) return LEASE_ID_BYTES + MAX_IO_BYTES;
  return MAX_CONTROL_BYTES;
}

/** READ_REPORT's payload: reads, bytes, microseconds (u64 each). */
export const READ_REPORT_BYTES = 24;

/** COPY_WRITE and COPY_ZERO start their payload with the lease id. */
export const LEASE_ID_BYTES = 8;

export interface WireExtent {
  offset: number;
  length: number;
  data: boolean;
}

const EXTENT_BYTES = 13;

export function encodeExtents(extents: WireExtent[]): Buffer {
  const buf = Buffer.allocUnsafe(4 + extents.length * EXTENT_BYTES);
  buf.writeUInt32BE(extents.length, 0);
  let at = 4;
  for (const e of extents) {
    writeU64(buf, e.offset, at);
    buf.writeUInt32BE(e.length, at + 8);
    buf[at + 12] = e.data ? 1 : 0;
    at += EXTENT_BYTES;
  }
  return buf;
}

export function decodeExtents(buf: Buffer): WireExtent[] {
  const count = buf.readUInt32BE(0);
  if (buf.length !== 4 + count * EXTENT_BYTES) throw new Error(`extent list of ${count} entries has ${buf.length} bytes`);
  const out: WireExtent[] = [];
  for (let i = 0, at = 4; i < count; i++, at += EXTENT_BYTES) {
    out.push({ offset: readU64(buf, at), length: buf.readUInt32BE(at + 8), data: buf[at + 12] === 1 });
  }
  return out;
}
