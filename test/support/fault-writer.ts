/**
 * The fault suite's writer and its ledger.
 *
 * Every 4 KiB block the writer writes names its write: magic, block number, write sequence
 * number, then bytes derived from (seq, block), with a CRC-32 over the block, so a read-back
 * tells exactly which write a block holds (or that it is torn or foreign). The ledger keeps, per
 * block, the writes issued to it in order and two marks:
 *   - lastAcked: the newest write to the block that was acknowledged;
 *   - floor: the newest write acknowledged before an acknowledged FLUSH was sent (or an
 *     acknowledged FUA write) — what must survive any crash, power loss included.
 * The writer never has two overlapping writes in flight, so per block issue order is apply order.
 *
 * After a fault and recovery the checker (fault-checker.ts) reads the volume and holds each block
 * to the ledger: its content must be a write issued to it no older than the floor ("contract"
 * mode: after crashes of every replica) or no older than lastAcked ("acked" mode: faults that
 * left the replicas' page caches alone, where losing any acknowledged write is a bug).
 */
import zlib from 'node:zlib';
import { NbdClient, NbdConnectionLost } from './nbd-client.ts';
import { PausableLoad } from './nbd-session.ts';
import type { Prng } from './fault-prng.ts';

export const BLOCK_BYTES = 4096;
export const SECTOR_BYTES = 512;
/** The write-intent log's region (INTENT_REGION_BYTES in src/replica/intent-log.ts): recovery and verify work in these. */
export const REGION_BYTES = 4 * 1024 * 1024;
const MAGIC = 0x5a464c54; // "ZFLT"
const HEADER_BYTES = 16;

/** Fills buf[at, at+4096) with the content of write `seq` at `block`. */
export function encodeBlock(buf: Buffer, at: number, seq: number, block: number): void {
  buf.writeUInt32BE(MAGIC, at);
  buf.writeUInt32BE(block, at + 4);
  buf.writeUInt32BE(seq, at + 8);
  let x = (Math.imul(seq, 2654435761) ^ Math.imul(block + 1, 40503)) >>> 0 || 7;
  for (let i = HEADER_BYTES; i < BLOCK_BYTES; i += 4) {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    buf.writeUInt32BE(x, at + i);
  }
  buf.writeUInt32BE(zlib.crc32(buf.subarray(at + HEADER_BYTES, at + BLOCK_BYTES)), at + 12);
}

export function blockContent(seq: number, block: number): Buffer {
  const buf = Buffer.allocUnsafe(BLOCK_BYTES);
  encodeBlock(buf, 0, seq, block);
  return buf;
}

const ZERO_BLOCK = Buffer.alloc(BLOCK_BYTES);

/** What one 4 KiB block holds: zeros, an intact write (its seq), or anything else. */
export function identifyBlock(buf: Buffer, at: number, block: number): { kind: 'zero' } | { kind: 'write'; seq: number } | { kind: 'other' } {
  const slice = buf.subarray(at, at + BLOCK_BYTES);
  if (slice.equals(ZERO_BLOCK)) return { kind: 'zero' };
  if (slice.readUInt32BE(0) === MAGIC && slice.readUInt32BE(4) === block && slice.readUInt32BE(12) === zlib.crc32(slice.subarray(HEADER_BYTES))) {
    return { kind: 'write', seq: slice.readUInt32BE(8) };
  }
  return { kind: 'other' };
}

/**
 * Content ids in the ledger: a positive id is a write's seq (data, or zeros for WRITE_ZEROES and
 * TRIM, see zeroWrites); 0 is zeros; a negative id is a torn block observed at a check, whose
 * bytes are kept in `tornBaselines`.
 */
export class Ledger {
  readonly blocks: number;
  readonly history: number[][];
  readonly floor: Int32Array;
  readonly lastAcked: Int32Array;
  readonly zeroWrites = new Set<number>();
  /** Writes sent with FUA (for messages: what made a floor). */
  readonly fuaWrites = new Set<number>();
  readonly tornBaselines = new Map<number, Buffer>();
  private nextTornId = -1;
  nextSeq = 1;
  ackedWrites = 0;
  ackedFlushes = 0;

  constructor(sizeBytes: number) {
    this.blocks = Math.floor(sizeBytes / BLOCK_BYTES);
    this.history = Array.from({ length: this.blocks }, () => [0]);
    this.floor = new Int32Array(this.blocks);
    this.lastAcked = new Int32Array(this.blocks);
  }

  /** Records a write (data or zeros) of `count` blocks from `first`; returns its seq and per-block history indexes. */
  issue(first: number, count: number, zero: boolean): { seq: number; indexes: number[] } {
    const seq = this.nextSeq++;
    if (zero) this.zeroWrites.add(seq);
    const indexes: number[] = [];
    for (let i = 0; i < count; i++) {
      const h = this.history[first + i];
      h.push(seq);
      indexes.push(h.length - 1);
    }
    return { seq, indexes };
  }

  acked(first: number, indexes: number[], fua: boolean): void {
    this.ackedWrites++;
    for (let i = 0; i < indexes.length; i++) {
      const b = first + i;
      if (indexes[i] > this.lastAcked[b]) this.lastAcked[b] = indexes[i];
      if (fua && indexes[i] > this.floor[b]) this.floor[b] = indexes[i];
    }
  }

  /** What a FLUSH sent now will cover: the writes acknowledged so far. */
  flushSent(): Int32Array {
    return Int32Array.from(this.lastAcked);
  }

  flushAcked(covered: Int32Array): void {
    this.ackedFlushes++;
    for (let b = 0; b < this.blocks; b++) if (covered[b] > this.floor[b]) this.floor[b] = covered[b];
  }

  /**
   * After a crash of every replica: writes acknowledged but not flushed may or may not have
   * survived. They stay allowed as content, but no longer count as acknowledged — a FLUSH sent
   * after the crash cannot make durable what the crash already lost. Returns the blocks affected.
   */
  forgetUnflushed(): number {
    let n = 0;
    for (let b = 0; b < this.blocks; b++) {
      if (this.lastAcked[b] > this.floor[b]) {
        this.lastAcked[b] = this.floor[b];
        n++;
      }
    }
    return n;
  }

  /** The expected bytes of content id `id` at `block`. */
  contentOf(id: number, block: number): Buffer {
    if (id === 0 || this.zeroWrites.has(id)) return ZERO_BLOCK;
    if (id < 0) return this.tornBaselines.get(id)!;
    return blockContent(id, block);
  }

  isZeroContent(id: number): boolean {
    return id === 0 || this.zeroWrites.has(id);
  }

  /** After a check: what the volume holds now is every block's only history, and its floor. */
  rebase(block: number, observed: Buffer, at: number): void {
    const id = identifyBlock(observed, at, block);
    let content: number;
    if (id.kind === 'zero') content = 0;
    else if (id.kind === 'write' && !this.zeroWrites.has(id.seq)) content = id.seq;
    else {
      content = this.nextTornId--;
      this.tornBaselines.set(content, Buffer.from(observed.subarray(at, at + BLOCK_BYTES)));
    }
    const old = this.history[block];
    // Torn baselines no longer referenced are dropped (bounded memory over many rounds).
    for (const x of old) if (x < 0 && x !== content) this.tornBaselines.delete(x);
    this.history[block] = [content];
    this.floor[block] = 0;
    this.lastAcked[block] = 0;
  }
}

export interface WriterOptions {
  /** Opens a new NBD connection to the volume (the writer reconnects after a connection loss). */
  connect: () => Promise<NbdClient>;
  ledger: Ledger;
  prng: Prng;
  /** Requests in flight at most. */
  depth?: number;
  /** Regions (REGION_BYTES each) the writes go to; change with setHotRegions. */
  hotRegions: number[];
  regionBytes: number;
  /** Op mix (fractions): flush, FUA write, WRITE_ZEROES, TRIM; the rest are plain writes. */
  flushRate?: number;
  fuaRate?: number;
  zeroRate?: number;
  trimRate?: number;
}

export interface WriterEvent {
  atMs: number;
  what: string;
}

/** Runs seeded random writes and flushes over NBD, recording everything in the ledger. */
export class FaultWriter extends PausableLoad {
  private readonly options: Required<WriterOptions>;
  private readonly ledger: Ledger;
  private readonly busy: Uint8Array;
  /** NBD error replies (the client saw an error). */
  errors = 0;
  /** Requests whose outcome is unknown (connection lost before the reply). */
  unknown = 0;
  readonly errorLog: WriterEvent[] = [];
  private readonly startedMs = Date.now();

  constructor(options: WriterOptions) {
    super(options.connect, 'writer');
    this.options = { depth: 8, flushRate: 0.06, fuaRate: 0.03, zeroRate: 0.03, trimRate: 0.02, ...options };
    this.ledger = options.ledger;
    this.busy = new Uint8Array(this.ledger.blocks);
  }

  /** Connections lost with requests possibly unanswered. */
  get disconnects(): number {
    return this.session.disconnects;
  }

  setHotRegions(regions: number[]): void {
    if (regions.length === 0) throw new Error('at least one hot region');
    this.options.hotRegions = regions;
  }

  get inFlight(): number {
    return this.inflight;
  }

  private note(what: string): void {
    if (this.errorLog.length < 50) this.errorLog.push({ atMs: Date.now() - this.startedMs, what });
  }

  /** Connects and starts writing. */
  async start(): Promise<void> {
    this.paused = false;
    await this.session.start();
  }

  /**
   * Waits until the writer has seen its connection die and every request on it has settled
   * (after the frontend was killed): from then on no reply from before the fault can arrive.
   */
  async connectionLost(timeoutMs = 30_000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (this.session.client !== null || this.inflight > 0) {
      if (Date.now() > deadline) throw new Error(`writer: connection still up (${this.inflight} in flight) ${timeoutMs} ms after the fault`);
      await new Promise((r) => setTimeout(r, 5));
    }
  }

  protected pump(): void {
    const o = this.options;
    const random = o.prng;
    while (this.session.running && !this.paused && this.session.client !== null && this.inflight < o.depth) {
      const client = this.session.client;
      const r = random.next();
      if (r < o.flushRate) {
        const covered = this.ledger.flushSent();
        this.inflight++;
        client.flush().then(
          (errno) => {
            if (errno === 0) this.ledger.flushAcked(covered);
            else {
              this.errors++;
              this.note(`FLUSH errno ${errno}`);
            }
          },
          (err) => this.lostReply(err),
        ).finally(() => this.settled());
        continue;
      }
      const count = 1 + random.int(8);
      const region = random.pick(o.hotRegions);
      const regionBlocks = o.regionBytes / BLOCK_BYTES;
      let first = region * regionBlocks + random.int(regionBlocks);
      if (first + count > this.ledger.blocks) first = this.ledger.blocks - count;
      let overlaps = false;
      for (let i = 0; i < count; i++) if (this.busy[first + i] !== 0) overlaps = true;
      if (overlaps) {
        // Writes to the same block never overlap in flight: skip this pick, try again next time.
        if (this.inflight > 0) return;
        continue;
      }
      const kindRoll = random.next();
      const zero = kindRoll < o.zeroRate + o.trimRate;
      const trim = kindRoll < o.trimRate;
      const fua = !zero && random.chance(o.fuaRate / (1 - o.flushRate));
      const { seq, indexes } = this.ledger.issue(first, count, zero);
      if (fua) this.ledger.fuaWrites.add(seq);
      for (let i = 0; i < count; i++) this.busy[first + i] = 1;
      const offset = first * BLOCK_BYTES;
      const length = count * BLOCK_BYTES;
      let sent: Promise<number>;
      if (trim) sent = client.trim(offset, length);
      else if (zero) sent = client.writeZeroes(offset, length);
      else {
        const data = Buffer.allocUnsafe(length);
        for (let i = 0; i < count; i++) encodeBlock(data, i * BLOCK_BYTES, seq, first + i);
        sent = client.write(offset, data, { fua });
      }
      this.inflight++;
      sent.then(
        (errno) => {
          if (errno === 0) this.ledger.acked(first, indexes, fua);
          else {
            this.errors++;
            this.note(`${trim ? 'TRIM' : zero ? 'WRITE_ZEROES' : 'WRITE'} ${offset}+${length} errno ${errno}`);
          }
        },
        (err) => this.lostReply(err),
      ).finally(() => {
        for (let i = 0; i < count; i++) this.busy[first + i] = 0;
        this.settled();
      });
    }
  }

  private lostReply(err: unknown): void {
    this.unknown++;
    if (!(err instanceof NbdConnectionLost)) this.note(`request failed: ${(err as Error).message}`);
  }
}
