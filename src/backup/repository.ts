/**
 * A backup target seen through the backup format: volume records, manifests (completed, partial,
 * deleted) and blocks, plus the process's index of the blocks the target holds. The jobs
 * (backup-job.ts, restore-job.ts, gc.ts, verify-target.ts) work through this.
 */
import { ZebuError, ErrorCode } from '../errors.ts';
import type { BackupTarget, StagedObject } from './target.ts';
import { BlockIndex } from './block-index.ts';
import {
  FORMAT,
  STORE_MARKER_KEY,
  NAME_PATTERN,
  blockKey,
  decodeBlock,
  decodeDocument,
  decodeManifest,
  decodeVolumeRecord,
  encodeDocument,
  encodeManifest,
  manifestKey,
  partialKey,
  partialSegmentKey,
  encodePartialSegment,
  decodePartialSegment,
  tombstoneKey,
  volumeKey,
  type Manifest,
  type VolumeRecord,
} from './format.ts';

export class BackupRepository {
  readonly target: BackupTarget;
  readonly index = new BlockIndex();

  constructor(target: BackupTarget) {
    this.target = target;
  }

  get url(): string {
    return this.target.url;
  }

  /** Marks an empty target as Zebu's, or checks that the marker there is one this code reads. */
  async init(): Promise<void> {
    const marker = await this.target.get(STORE_MARKER_KEY);
    if (marker === null) {
      await this.target.put(STORE_MARKER_KEY, encodeDocument({ format: FORMAT, createdAt: new Date().toISOString() }));
      return;
    }
    const doc = decodeDocument(marker, `${this.url}/${STORE_MARKER_KEY}`) as { format?: unknown };
    if (doc.format !== FORMAT) throw new ZebuError(ErrorCode.UNSUPPORTED, `backup target ${this.url} has format ${String(doc.format)}; this Zebu reads format ${FORMAT}`);
  }

  // ---- volume records -----------------------------------------------------------------------

  async readVolume(volume: string): Promise<VolumeRecord | null> {
    const data = await this.target.get(volumeKey(volume));
    return data === null ? null : decodeVolumeRecord(data, `volume record of ${volume} on ${this.url}`);
  }

  writeVolume(record: VolumeRecord): Promise<void> {
    return this.target.put(volumeKey(record.volume), encodeDocument(record));
  }

  /** Volume names with a directory on the target (one LIST of `volumes/`, never of blocks). */
  async listVolumes(): Promise<string[]> {
    const listing = await this.target.list('volumes/');
    return listing.prefixes.map((p) => p.slice('volumes/'.length, -1)).filter((name) => NAME_PATTERN.test(name));
  }

  // ---- manifests ----------------------------------------------------------------------------

  async readManifest(volume: string, backup: string): Promise<Manifest | null> {
    const data = await this.target.get(manifestKey(volume, backup));
    return data === null ? null : this.checkManifest(decodeManifest(data, `manifest of backup ${backup} (volume ${volume}) on ${this.url}`), volume, backup);
  }

  /**
   * A backup under way: the head of its partial manifest (written when it starts) with the blocks
   * of all its segments merged in. Segments are written one at a time, each durable before the
   * next starts, so they are read 1, 2, … up to the first one missing (no listing).
   */
  async readPartial(volume: string, backup: string): Promise<Manifest | null> {
    return (await this.readPartialSegments(volume, backup))?.manifest ?? null;
  }

  /** readPartial, and how many segments it has (a retried backup writes the ones after them). */
  async readPartialSegments(volume: string, backup: string): Promise<{ manifest: Manifest; segments: number } | null> {
    const data = await this.target.get(partialKey(volume, backup));
    if (data === null) return null;
    const head = this.checkManifest(decodeManifest(data, `partial manifest of backup ${backup} (volume ${volume}) on ${this.url}`), volume, backup);
    const byIndex = new Map(head.blocks);
    let segments = 0;
    for (;;) {
      const key = partialSegmentKey(volume, backup, segments + 1);
      const seg = await this.target.get(key);
      if (seg === null) break;
      segments++;
      const s = decodePartialSegment(seg, `${key} on ${this.url}`, { volume, backup, segment: segments, sizeBytes: head.sizeBytes });
      // A snapshot never changes: a block index listed again (a retry) has the same content.
      for (const [index, hash] of s.blocks) byIndex.set(index, hash);
    }
    return { manifest: { ...head, blocks: [...byIndex.entries()].sort((a, b) => a[0] - b[0]) }, segments };
  }

  private checkManifest(m: Manifest, volume: string, backup: string): Manifest {
    if (m.volume !== volume || m.name !== backup) throw new ZebuError(ErrorCode.EIO, `manifest at ${manifestKey(volume, backup)} on ${this.url} names backup ${m.name} of volume ${m.volume}`);
    return m;
  }

  writeManifest(m: Manifest): Promise<void> {
    return this.target.put(manifestKey(m.volume, m.name), encodeManifest(m));
  }

  /** The head of a partial manifest (what the backup is; its blocks go to segments). */
  writePartial(m: Manifest): Promise<void> {
    return this.target.put(partialKey(m.volume, m.name), encodeManifest(m));
  }

  /** Segment n of a partial manifest; durable when this resolves. */
  writePartialSegment(volume: string, backup: string, segment: number, blocks: [number, string][]): Promise<void> {
    return this.target.put(partialSegmentKey(volume, backup, segment), encodePartialSegment({ format: FORMAT, volume, backup, segment, blocks }));
  }

  /**
   * Removes a partial manifest: its segments from the last one down, then its head, so that a
   * crash midway leaves segments 1..k with their head, which the next delete finds.
   */
  async deletePartial(volume: string, backup: string): Promise<void> {
    let count = 0;
    while (await this.target.exists(partialSegmentKey(volume, backup, count + 1))) count++;
    for (let n = count; n >= 1; n--) await this.target.delete(partialSegmentKey(volume, backup, n));
    await this.target.delete(partialKey(volume, backup));
  }

  /** Completed and partial backups of a volume (one LIST of its backups directory). */
  async listBackups(volume: string): Promise<{ completed: string[]; partial: string[] }> {
    const listing = await this.target.list(`volumes/${volume}/backups/`);
    const completed: string[] = [];
    const partial: string[] = [];
    for (const key of listing.keys) {
      const file = key.slice(key.lastIndexOf('/') + 1);
      const m = /^(.+)\.(json|partial)$/.exec(file);
      if (m === null || !NAME_PATTERN.test(m[1])) continue;
      (m[2] === 'json' ? completed : partial).push(m[1]);
    }
    return { completed, partial };
  }

  /**
   * Deletes a backup: its manifest is kept as a tombstone (so the garbage collection knows which
   * blocks may have lost their last reference), then removed. Idempotent; a crash in between
   * leaves both, and the collection skips a tombstone whose manifest still exists.
   */
  async deleteBackup(volume: string, backup: string): Promise<boolean> {
    let data = await this.target.get(manifestKey(volume, backup));
    if (data === null) {
      // A backup that never completed: its tombstone lists every block its segments listed.
      const partial = await this.readPartial(volume, backup);
      if (partial === null) return false;
      data = encodeManifest(partial);
    }
    await this.target.put(tombstoneKey(volume, backup), data);
    await this.target.delete(manifestKey(volume, backup));
    await this.deletePartial(volume, backup);
    return true;
  }

  async listTombstones(volume: string): Promise<string[]> {
    const listing = await this.target.list(`volumes/${volume}/deleted/`);
    return listing.keys.map((k) => k.slice(k.lastIndexOf('/') + 1)).filter((f) => f.endsWith('.json')).map((f) => f.slice(0, -'.json'.length)).filter((n) => NAME_PATTERN.test(n));
  }

  async readTombstone(volume: string, backup: string): Promise<Manifest | null> {
    const data = await this.target.get(tombstoneKey(volume, backup));
    return data === null ? null : decodeManifest(data, `deleted manifest of backup ${backup} (volume ${volume}) on ${this.url}`);
  }

  removeTombstone(volume: string, backup: string): Promise<void> {
    return this.target.delete(tombstoneKey(volume, backup));
  }

  // ---- blocks -------------------------------------------------------------------------------

  /**
   * Writes a block's bytes without making it visible (`encoded` may be reused afterwards); its
   * commit() makes it visible, durable only after flushBlocks() (a manifest is written only after that).
   */
  stageBlock(hash: string, encoded: Buffer | readonly Buffer[]): Promise<StagedObject> {
    return this.target.stage(blockKey(hash), encoded);
  }

  flushBlocks(): Promise<void> {
    return this.target.flush();
  }

  /** The block's content, checked against its hash; EIO naming it when missing or corrupt. */
  async readBlock(hash: string): Promise<Buffer> {
    const stored = await this.target.get(blockKey(hash));
    if (stored === null) throw new ZebuError(ErrorCode.NOT_FOUND, `block ${hash} is missing from ${this.url}`);
    return decodeBlock(stored, hash);
  }

  /** Whether the block is on the target (one lookup; no listing). */
  hasBlock(hash: string): Promise<boolean> {
    return this.target.exists(blockKey(hash));
  }

  deleteBlock(hash: string): Promise<void> {
    return this.target.delete(blockKey(hash));
  }

  /** Adds the blocks of a completed manifest to the known set (a partial one may name blocks never uploaded). */
  learn(m: Manifest): void {
    for (const [, hash] of m.blocks) this.index.known.add(hash);
  }

  close(): void {
    this.target.close();
  }
}
