/**
 * What the simulated volume may hold, sector by sector, from what the client was told: the
 * reference a read is checked against. A write fills each 512-byte sector with its id and the
 * sector's number, so a read shows which write each sector came from (0: zeros).
 *
 * The workload never overlaps a request with a write in flight on the same sectors, so a sector
 * has one value while nothing failed. It has several candidates only where the outcome is
 * unknown: a write that failed, or a whole-volume power loss (writes since the last durable
 * point may or may not have survived, a torn write in part). A read collapses the candidates to
 * what it saw: a later read must see the same (else replicas differ, or an old one was read).
 */
export const SECTOR_BYTES = 512;

/** The value a sector shows. -1: bytes that no write put there. */
export function sectorValue(buf: Buffer, at: number, sector: number): number {
  const id = buf.readUInt32LE(at);
  const tag = buf.readUInt32LE(at + 4);
  if (id === 0 && tag === 0) {
    for (let i = 0; i < SECTOR_BYTES; i += 4) if (buf.readUInt32LE(at + i) !== 0) return -1;
    return 0;
  }
  if (tag !== sector) return -1;
  for (let i = 8; i < SECTOR_BYTES; i += 8) if (buf.readUInt32LE(at + i) !== id || buf.readUInt32LE(at + i + 4) !== tag) return -1;
  return id;
}

/** The bytes write `id` puts at [offset, offset+length). */
export function writePayload(id: number, offset: number, length: number): Buffer {
  const buf = Buffer.allocUnsafe(length);
  for (let at = 0; at < length; at += SECTOR_BYTES) {
    const sector = (offset + at) / SECTOR_BYTES;
    for (let i = 0; i < SECTOR_BYTES; i += 8) {
      buf.writeUInt32LE(id, at + i);
      buf.writeUInt32LE(sector, at + i + 4);
    }
  }
  return buf;
}

interface Unsure {
  id: number;
  /** The client's acknowledgement number; Infinity while unacknowledged (or failed). */
  ackSeq: number;
}

export class VolumeModel {
  sizeBytes: number;
  /** Per sector: the values it may hold now. */
  private cands: number[][] = [];
  /** Per sector: what a whole-volume power loss may go back to. */
  private durable: number[][] = [];
  /** Per sector: writes since the durable point, oldest first. */
  private after: Unsure[][] = [];
  /** Sectors whose `after` is not empty, or whose candidates a read narrowed. */
  private readonly dirty = new Set<number>();
  /** Writes in flight, by sector (the workload keeps them apart). */
  private readonly busy: Uint8Array[] = [];
  /** Reads in flight, by sector (a write waits for them: what they may see stays one value). */
  private readonly reading: Uint16Array[] = [];
  /** Sectors whose write in flight was so at a whole-volume power loss (see powerLost). */
  private readonly inFlightAtPowerLoss = new Set<number>();
  private ackSeq = 0;
  private durableAckSeq = 0;

  constructor(sizeBytes: number) {
    this.sizeBytes = 0;
    this.grow(sizeBytes);
  }

  grow(sizeBytes: number): void {
    for (let s = this.sizeBytes / SECTOR_BYTES; s < sizeBytes / SECTOR_BYTES; s++) {
      this.cands.push([0]);
      this.durable.push([0]);
      this.after.push([]);
    }
    const busy = new Uint8Array(sizeBytes / SECTOR_BYTES);
    if (this.busy.length > 0) busy.set(this.busy[0]);
    this.busy[0] = busy;
    const reading = new Uint16Array(sizeBytes / SECTOR_BYTES);
    if (this.reading.length > 0) reading.set(this.reading[0]);
    this.reading[0] = reading;
    this.sizeBytes = sizeBytes;
  }

  /** No write in flight there (and, `forWrite`, no read either). */
  isFree(offset: number, length: number, forWrite: boolean): boolean {
    const busy = this.busy[0];
    const reading = this.reading[0];
    for (let s = offset / SECTOR_BYTES; s < (offset + length) / SECTOR_BYTES; s++) if (busy[s] !== 0 || (forWrite && reading[s] !== 0)) return false;
    return true;
  }

  readStarted(offset: number, length: number): void {
    const reading = this.reading[0];
    for (let s = offset / SECTOR_BYTES; s < (offset + length) / SECTOR_BYTES; s++) reading[s]++;
  }

  readEnded(offset: number, length: number): void {
    const reading = this.reading[0];
    for (let s = offset / SECTOR_BYTES; s < (offset + length) / SECTOR_BYTES; s++) reading[s]--;
  }

  /** Write `id` (0: zeroes or trim) to the range starts. */
  writeStarted(id: number, offset: number, length: number): void {
    const busy = this.busy[0];
    for (let s = offset / SECTOR_BYTES; s < (offset + length) / SECTOR_BYTES; s++) {
      busy[s] = 1;
      this.after[s].push({ id, ackSeq: Infinity });
      this.dirty.add(s);
    }
  }

  /** It was acknowledged (`fua`: durable with it), or failed (`ok` false: it may or may not be there). */
  writeEnded(id: number, offset: number, length: number, ok: boolean, fua: boolean): void {
    const busy = this.busy[0];
    const seq = ++this.ackSeq;
    for (let s = offset / SECTOR_BYTES; s < (offset + length) / SECTOR_BYTES; s++) {
      busy[s] = 0;
      const entries = this.after[s];
      const i = entries.findLastIndex((e) => e.id === id);
      // In flight at a power loss and acknowledged without FUA: it may be lost whatever the flushes say.
      const unsure = this.inFlightAtPowerLoss.delete(s) && !fua;
      if (ok && !unsure) {
        this.cands[s] = [id];
        if (fua) {
          this.durable[s] = [id];
          this.after[s] = entries.slice(i + 1);
        } else if (i >= 0) entries[i].ackSeq = seq;
      } else if (!this.cands[s].includes(id)) {
        this.cands[s].push(id);
      }
    }
  }

  /** A flush is sent: returns what it will make durable (acknowledgements up to now). */
  flushStarted(): number {
    return this.ackSeq;
  }

  /** A flush sent when `covered` was current was acknowledged. */
  flushEnded(covered: number): void {
    if (covered <= this.durableAckSeq) return;
    this.durableAckSeq = covered;
    for (const s of [...this.dirty]) {
      const entries = this.after[s];
      const last = entries.findLastIndex((e) => e.ackSeq <= covered);
      if (last >= 0) {
        this.durable[s] = [entries[last].id];
        this.after[s] = entries.slice(last + 1);
      } else if (entries.length === 0) {
        // Nothing written since: what reads settled on is what is on disk.
        this.durable[s] = this.cands[s].slice();
      }
      if (this.after[s].length === 0) this.dirty.delete(s);
    }
  }

  /**
   * Every replica lost power at once: unflushed writes may or may not have survived, even when a
   * flush is acknowledged afterwards (the client is not told of the power loss; NBD promises
   * durability only from a flush on, and the flush after the loss covers what the new engine
   * holds). A write in flight at that moment is as unsure, whenever its acknowledgement comes: a
   * dead engine may have sent it just before (the frontend still delivers it), and what it
   * acknowledged was lost with the rest.
   */
  powerLost(): void {
    const busy = this.busy[0];
    for (let s = 0; s < busy.length; s++) if (busy[s] !== 0) this.inFlightAtPowerLoss.add(s);
    for (const s of this.dirty) {
      const values = new Set(this.durable[s]);
      for (const e of this.after[s]) values.add(e.id);
      this.cands[s] = [...values];
      this.durable[s] = [...values];
      this.after[s] = this.after[s].filter((e) => e.ackSeq === Infinity && this.busy[0][s] !== 0);
    }
  }

  /**
   * Checks a read of [offset, offset+length) that did not overlap a write in flight; returns the
   * problems (empty: fine) and narrows the candidates to what was read.
   */
  checkRead(offset: number, data: Buffer): string[] {
    const problems: string[] = [];
    for (let at = 0; at < data.length; at += SECTOR_BYTES) {
      const s = (offset + at) / SECTOR_BYTES;
      const got = sectorValue(data, at, s);
      const allowed = this.cands[s];
      if (got === -1) problems.push(`sector ${s} (byte ${offset + at}): bytes no write put there; expected write ${allowed.join(' or ')}`);
      else if (!allowed.includes(got)) problems.push(`sector ${s} (byte ${offset + at}): write ${got}; expected write ${allowed.join(' or ')}`);
      else if (allowed.length > 1) {
        this.cands[s] = [got];
        this.dirty.add(s);
      }
      if (problems.length >= 5) break;
    }
    return problems;
  }
}
