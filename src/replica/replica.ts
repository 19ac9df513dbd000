/**
 * One replica of one volume: a directory holding a tree of layers (optional read-only base,
 * immutable snapshots, one writable head). Reads resolve each 4 KiB block to the topmost layer
 * of the head's chain that has it. See docs/replica-format.md.
 *
 * Durability contract (what is persisted before what is acknowledged):
 * - A write/trim/zero is acknowledged once its data is in the head's data file (page cache) and
 *   its presence-map change is queued in memory. Nothing of it is durable yet.
 * - FLUSH acknowledges after: every data file written before the flush arrived is fdatasync'd,
 *   then the journal record carrying the matching map pages and counters is fdatasync'd (see
 *   journal.ts). Map changes whose data was not yet synced never reach the journal.
 * - Layer-tree changes (snapshot, delete, revert, epoch) are written to replica.json by
 *   write-temp, fsync, rename, fsync-dir, after everything they depend on is durable.
 * - After a crash: replica.json is old or new, never torn; the newest intact journal record gives
 *   the counters and map pages; files replica.json does not name are garbage and removed.
 */
import path from 'node:path';
import { createHash } from 'node:crypto';
import { ZebuError, ErrorCode, invalid, assert, toZebuError } from '../errors.ts';
import { isAllZero } from '../os/zeros.ts';
import { BlockMap, BlockState, BLOCK_SIZE, BLOCK_SHIFT, MAP_PAGE_BYTES } from './block-map.ts';
import type { Disk, DiskFile } from './disk.ts';
import { NodeDisk } from './disk.ts';
import { JOURNAL_SLOTS, encodeRecord, decodeRecord, type JournalPage } from './journal.ts';
import {
  META_FILE,
  META_FORMAT,
  DEFAULT_MAX_LAYERS,
  MAX_LAYERS_LIMIT,
  encodeMeta,
  decodeMeta,
  layerIdFor,
  rebuildKindOf,
  validateSizeBytes,
  validateSnapshotName,
  type LayerMeta,
  type ReplicaMeta,
  type RebuildKind,
} from './meta.ts';
import { CopyLeases } from './copy-leases.ts';
import { RangeLock, type RangeLockEntry } from './range-lock.ts';
import { IntentLog, INTENT_REGION_BYTES, INTENT_SLOTS } from './intent-log.ts';
import { holePunchUnavailable } from './native-file-ops.ts';
import { systemClock, type Clock } from '../os/clock.ts';
import type { IntentSummary } from './intent-log.ts';

export interface ReplicaCreateOptions {
  sizeBytes: number;
  maxLayers?: number;
  /** A raw image file used as the read-only bottom layer. */
  backingFile?: string;
  disk?: Disk;
}

export interface ReplicaOpenOptions {
  disk?: Disk;
  /**
   * The write-intent log (default true). false = no log at all: ONLY for a benchmark baseline
   * (after an unclean stop nobody knows where replicas may differ).
   */
  intentLog?: boolean;
  /** Time for the write-intent log (default: the system clock; the simulator's otherwise). */
  clock?: Clock;
}

export interface Extent {
  offset: number;
  length: number;
  /** false: reads as zeros (hole, trimmed or zeroed). */
  data: boolean;
}

export interface SnapshotInfo {
  name: string;
  id: string;
  parent: string | null;
  createdAt: string;
  /** Bytes of blocks this layer holds (data or zero markers). */
  sizeBytesUsed: number;
  /** Whether the snapshot is an ancestor of the current head. */
  inChain: boolean;
}

export interface ReplicaInfo {
  sizeBytes: number;
  blockSizeBytes: number;
  epoch: number;
  revision: number;
  flushedRevision: number;
  /** Whether the previous run ended with a clean close. */
  cleanShutdown: boolean;
  headId: string;
  /** Layer ids from the head down to the bottom of its chain. */
  chain: string[];
  layerCount: number;
  maxLayers: number;
  hasBase: boolean;
  /** The backing image's size (the base layer's); null without one. Absent from older replicas. */
  baseSizeBytes?: number | null;
  /** Being rebuilt (or a rebuild stopped midway): its data is incomplete. */
  rebuilding: boolean;
  /** Which rebuild: a delta one may be done again from the missed-write maps; null when none. */
  rebuildKind: RebuildKind | null;
  /** Size of the in-memory write-intent active set (regions). */
  activeRegions: number;
  intentRegionBytes: number;
  /**
   * The epoch when a journal record last advanced flushedRevision, or when an engine declared the
   * replica in sync (SET_REVISION): 0 for never, or an old replica. Start-up compares it first.
   */
  writeEpoch: number;
  /** Bytes of data files given back to the file system by TRIM and WRITE_ZEROES since start. */
  punchedBytes?: number;
  /** Why TRIM and WRITE_ZEROES give no space back here (no addon, file system); null when they do. */
  holePunchUnavailable?: string | null;
}

interface Layer {
  meta: LayerMeta;
  file: DiskFile;
  /** What reads see. */
  live: BlockMap | null;
  /** What the map file plus the latest journal record hold. */
  durable: BlockMap | null;
  mapFile: DiskFile | null;
}

interface PendingChange {
  layer: Layer;
  start: number;
  count: number;
  state: BlockState;
}

const WHOLE = Number.MAX_SAFE_INTEGER;
const MERGE_CHUNK_BLOCKS = 256;
const ZERO_BLOCK = Buffer.alloc(BLOCK_SIZE);
/** Region-hash buffers kept for reuse (a rebuild hashes a few regions at once). */
const HASH_BUFFERS_KEPT = 4;

function dataPath(dir: string, id: string): string {
  return path.join(dir, `${id}.data`);
}
function mapPath(dir: string, id: string): string {
  return path.join(dir, `${id}.map`);
}

export class Replica {
  readonly dir: string;
  private readonly disk: Disk;
  private meta: ReplicaMeta;
  private readonly layers = new Map<string, Layer>();
  private chain: Layer[] = [];
  private head!: Layer;
  private blockCount: number;
  private readonly lock = new RangeLock();
  /** Rebuild leases: copy writes carry a lease id the engine may revoke (copy-leases.ts). */
  private readonly copyLeases = new CopyLeases();
  /** Buffers regionHash reads into, kept for the next region (see there). */
  private readonly hashBuffers: Buffer[] = [];

  private revision = 0;
  private flushedRevision = 0;
  private journalSeq = 0;
  private previousCleanShutdown = false;
  private writeEpoch = 0;
  /**
   * The epoch in which the newest write not yet flushed was applied. A flush records it as
   * writeEpoch — not the epoch current at the flush: writes of an older engine flushed under a
   * newer one (an expansion at start-up flushes) were not taken in the newer epoch, and claiming
   * so would make a replica that missed writes look newest (found by the simulator).
   */
  private unflushedEpoch = 0;
  /** Bytes given back by punched holes (TRIM, WRITE_ZEROES), and why none are when they are not. */
  private punchedBytes = 0;
  private holePunchUnavailable: string | null = null;
  /** null: opened with intentLog false (benchmark baseline). */
  private intent: IntentLog | null = null;

  private pending: PendingChange[] = [];
  private dirtyData = new Set<Layer>();
  private unsyncedMapFiles = new Set<DiskFile>();
  private flushing: Promise<void> | null = null;
  private flushAgain: Promise<void> | null = null;
  private treeOp: Promise<unknown> = Promise.resolve();
  private epochAdoption: Promise<void> | null = null;

  /** Set when a flush failed: what the disk holds is unknown, so nothing more is acknowledged. */
  private failure: ZebuError | null = null;
  private closed = false;

  private constructor(dir: string, disk: Disk, meta: ReplicaMeta) {
    this.dir = dir;
    this.disk = disk;
    this.meta = meta;
    this.blockCount = meta.sizeBytes / BLOCK_SIZE;
  }

  get sizeBytes(): number {
    return this.meta.sizeBytes;
  }
  get epoch(): number {
    return this.meta.epoch;
  }

  /** Creates a new replica in an empty (or missing) directory. */
  static async create(dir: string, options: ReplicaCreateOptions & Pick<ReplicaOpenOptions, 'intentLog' | 'clock'>): Promise<Replica> {
    const disk = options.disk ?? new NodeDisk();
    validateSizeBytes(options.sizeBytes);
    const maxLayers = options.maxLayers ?? DEFAULT_MAX_LAYERS;
    if (!Number.isInteger(maxLayers) || maxLayers < 2 || maxLayers > MAX_LAYERS_LIMIT) {
      throw invalid(`maxLayers must be an integer from 2 to ${MAX_LAYERS_LIMIT}, got ${maxLayers}`);
    }
    await disk.mkdir(dir);
    const existing = (await disk.readdir(dir)).filter((f) => !f.startsWith('.'));
    if (existing.length > 0) throw new ZebuError(ErrorCode.EXISTS, `replica directory ${dir} is not empty`);

    const now = new Date().toISOString();
    const layers: LayerMeta[] = [];
    let nextLayerId = 1;
    let parent: string | null = null;
    if (options.backingFile !== undefined) {
      const basePath = path.resolve(options.backingFile);
      const file = await disk.open(basePath, 'read').catch((err) => {
        throw new ZebuError(ErrorCode.NOT_FOUND, `backing file ${basePath}: ${(err as Error).message}`);
      });
      const baseSizeBytes = await file.sizeBytes();
      await file.close();
      if (baseSizeBytes > options.sizeBytes) {
        throw invalid(`backing file ${basePath} (${baseSizeBytes} bytes) is larger than the volume (${options.sizeBytes} bytes)`);
      }
      parent = layerIdFor(nextLayerId++);
      layers.push({ id: parent, kind: 'base', parent: null, name: null, createdAt: now, basePath, baseSizeBytes });
    }
    const headId = layerIdFor(nextLayerId++);
    layers.push({ id: headId, kind: 'head', parent, name: null, createdAt: now });
    const meta: ReplicaMeta = { format: META_FORMAT, sizeBytes: options.sizeBytes, epoch: 0, maxLayers, nextLayerId, headId, layers };

    await Replica.createLayerFiles(disk, dir, headId, options.sizeBytes);
    // The first journal record must exist before replica.json: an existing replica.json means
    // a complete replica.
    await disk.writeFileAtomic(
      path.join(dir, JOURNAL_SLOTS[1]),
      encodeRecord({ seq: 1, revision: 0, flushedRevision: 0, clean: true, writeEpoch: 0, pages: [] }),
    );
    await disk.writeFileAtomic(path.join(dir, META_FILE), encodeMeta(meta));
    return Replica.open(dir, { disk, intentLog: options.intentLog, clock: options.clock });
  }

  /**
   * Grows a closed replica to `sizeBytes` (an offline volume expansion): only replica.json
   * changes, atomically. The new blocks are absent in every layer, so they read as zeros; layer
   * data files grow as blocks are written. Never shrinks. Returns the size before.
   */
  static async expandOnDisk(dir: string, sizeBytes: number, disk: Disk = new NodeDisk()): Promise<number> {
    validateSizeBytes(sizeBytes);
    const metaPath = path.join(dir, META_FILE);
    if (!(await disk.exists(metaPath))) throw new ZebuError(ErrorCode.NOT_FOUND, `no replica in ${dir} (${META_FILE} missing)`);
    const meta = decodeMeta(await disk.readFile(metaPath), metaPath);
    const before = meta.sizeBytes;
    if (sizeBytes < before) throw invalid(`replica in ${dir} has ${before} bytes: it cannot shrink to ${sizeBytes}`);
    if (sizeBytes === before) return before;
    meta.sizeBytes = sizeBytes;
    await disk.writeFileAtomic(metaPath, encodeMeta(meta));
    return before;
  }

  static async exists(dir: string, disk: Disk = new NodeDisk()): Promise<boolean> {
    return disk.exists(path.join(dir, META_FILE));
  }

  private static async createLayerFiles(disk: Disk, dir: string, id: string, sizeBytes: number): Promise<void> {
    for (const p of [dataPath(dir, id), mapPath(dir, id)]) {
      if (await disk.exists(p)) await disk.unlink(p);
    }
    const data = await disk.open(dataPath(dir, id), 'create');
    await data.truncate(sizeBytes);
    await data.datasync();
    await data.close();
    const map = await disk.open(mapPath(dir, id), 'create');
    await map.datasync();
    await map.close();
    await disk.syncDir(dir);
  }

  static async open(dir: string, options: ReplicaOpenOptions = {}): Promise<Replica> {
    const disk = options.disk ?? new NodeDisk();
    const metaPath = path.join(dir, META_FILE);
    if (!(await disk.exists(metaPath))) throw new ZebuError(ErrorCode.NOT_FOUND, `no replica in ${dir} (${META_FILE} missing)`);
    const meta = decodeMeta(await disk.readFile(metaPath), metaPath);
    const replica = new Replica(dir, disk, meta);
    try {
      await replica.load(options.intentLog ?? true, options.clock ?? systemClock);
    } catch (err) {
      await replica.closeFiles();
      throw err;
    }
    return replica;
  }

  private async load(withIntentLog: boolean, clock: Clock): Promise<void> {
    for (const lm of this.meta.layers) {
      const layer = await this.openLayer(lm);
      this.layers.set(lm.id, layer);
    }
    this.rebuildChain();

    // Newest intact journal record wins.
    let best: ReturnType<typeof decodeRecord> = null;
    for (const slot of JOURNAL_SLOTS) {
      const p = path.join(this.dir, slot);
      if (!(await this.disk.exists(p))) continue;
      const record = decodeRecord(await this.disk.readFile(p));
      if (record !== null && (best === null || record.seq > best.seq)) best = record;
    }
    if (best === null) throw new ZebuError(ErrorCode.EIO, `replica ${this.dir}: no intact journal record`);
    const touched = new Set<Layer>();
    for (const page of best.pages) {
      const layer = this.layers.get(page.layerId);
      if (layer === undefined || layer.durable === null || layer.live === null) continue; // layer since deleted
      if (page.pageIndex >= layer.durable.pageCount) continue;
      layer.durable.loadPage(page.pageIndex, page.bytes);
      layer.live.loadPage(page.pageIndex, page.bytes);
      assert(layer.mapFile !== null, 'map file open');
      await layer.mapFile.write(Buffer.from(page.bytes), 0, MAP_PAGE_BYTES, page.pageIndex * MAP_PAGE_BYTES);
      touched.add(layer);
    }
    for (const layer of touched) await layer.mapFile!.datasync();
    this.journalSeq = best.seq;
    this.revision = best.revision;
    this.flushedRevision = best.flushedRevision;
    this.previousCleanShutdown = best.clean;
    this.writeEpoch = best.writeEpoch;
    this.unflushedEpoch = best.writeEpoch;
    // From here on the replica may hold unflushed state: record that it is not clean.
    await this.writeJournal([], false);
    await this.removeGarbage();
    if (withIntentLog) {
      this.intent = await IntentLog.open(this.dir, this.disk, (err) => {
        this.failure ??= new ZebuError(err.code, `${err.message}; replica refuses further I/O until reopened`, { cause: err });
      }, undefined, clock);
    }
  }

  private async openLayer(lm: LayerMeta): Promise<Layer> {
    if (lm.kind === 'base') {
      assert(lm.basePath !== undefined, 'base path');
      const file = await this.disk.open(lm.basePath, 'read');
      const sizeBytes = await file.sizeBytes();
      if (sizeBytes !== lm.baseSizeBytes) {
        await file.close();
        throw new ZebuError(ErrorCode.EIO, `backing file ${lm.basePath} changed size: ${sizeBytes} bytes, expected ${lm.baseSizeBytes}`);
      }
      return { meta: lm, file, live: null, durable: null, mapFile: null };
    }
    const file = await this.disk.open(dataPath(this.dir, lm.id), 'readwrite');
    const mapFile = await this.disk.open(mapPath(this.dir, lm.id), 'readwrite');
    const live = new BlockMap(this.blockCount);
    const durable = new BlockMap(this.blockCount);
    const mapBytes = await mapFile.sizeBytes();
    const page = Buffer.alloc(MAP_PAGE_BYTES);
    for (let pageIndex = 0; pageIndex * MAP_PAGE_BYTES < mapBytes && pageIndex < live.pageCount; pageIndex++) {
      page.fill(0);
      await mapFile.read(page, 0, MAP_PAGE_BYTES, pageIndex * MAP_PAGE_BYTES);
      live.loadPage(pageIndex, page);
      durable.loadPage(pageIndex, page);
    }
    return { meta: lm, file, live, durable, mapFile };
  }

  private async removeGarbage(): Promise<void> {
    const keep = new Set<string>([META_FILE, ...JOURNAL_SLOTS, ...INTENT_SLOTS]);
    for (const lm of this.meta.layers) {
      if (lm.kind === 'base') continue;
      keep.add(`${lm.id}.data`);
      keep.add(`${lm.id}.map`);
    }
    for (const name of await this.disk.readdir(this.dir)) {
      if (keep.has(name) || name.startsWith('.')) continue;
      if (/^L\d{8}\.(data|map)$/.test(name) || name.endsWith('.tmp')) await this.disk.unlink(path.join(this.dir, name));
    }
  }

  private rebuildChain(): void {
    const chain: Layer[] = [];
    let id: string | null = this.meta.headId;
    while (id !== null) {
      const layer = this.layers.get(id);
      assert(layer !== undefined, `layer ${id} in chain`);
      chain.push(layer);
      id = layer.meta.parent;
      assert(chain.length <= this.meta.layers.length, 'layer chain has a cycle');
    }
    this.chain = chain;
    this.head = chain[0];
    assert(this.head.meta.kind === 'head', 'top of chain is the head');
  }

  // ---- checks -------------------------------------------------------------------------------

  private checkUsable(): void {
    if (this.closed) throw new ZebuError(ErrorCode.CLOSED, `replica ${this.dir} is closed`);
    if (this.failure !== null) throw this.failure;
  }

  private checkRange(offset: number, length: number): void {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0) {
      throw invalid(`bad range offset=${offset} length=${length}`);
    }
    if (offset + length > this.meta.sizeBytes) {
      throw invalid(`range ${offset}+${length} is beyond the end of the volume (${this.meta.sizeBytes} bytes)`);
    }
  }

  /**
   * Epoch fencing: lower epochs are rejected; a higher one is persisted before any request
   * carrying it is served.
   */
  async checkEpoch(epoch: number): Promise<void> {
    if (epoch === this.meta.epoch) return;
    if (!Number.isSafeInteger(epoch) || epoch < 0) throw invalid(`bad epoch ${epoch}`);
    if (epoch < this.meta.epoch) {
      throw new ZebuError(ErrorCode.FENCED, `epoch ${epoch} is older than this replica's epoch ${this.meta.epoch}`);
    }
    while (this.epochAdoption !== null) await this.epochAdoption;
    if (epoch <= this.meta.epoch) return this.checkEpoch(epoch);
    this.epochAdoption = this.writeMeta({ ...this.meta, epoch }).finally(() => {
      this.epochAdoption = null;
    });
    await this.epochAdoption;
  }

  private async writeMeta(next: ReplicaMeta): Promise<void> {
    const metaPath = path.join(this.dir, META_FILE);
    const before = encodeMeta(this.meta);
    try {
      await this.disk.writeFileAtomic(metaPath, encodeMeta(next));
    } catch (err) {
      // A failure after the rename (the directory sync) leaves the new tree on disk while memory
      // holds the old one: serving on would acknowledge writes to a layer the disk no longer
      // names. Only a failure that provably left the old file in place is harmless.
      const onDisk = await this.disk.readFile(metaPath).catch(() => null);
      if (onDisk === null || !onDisk.equals(before)) {
        this.failure = new ZebuError(ErrorCode.EIO, `replica ${this.dir}: metadata update failed midway, replica refuses I/O until reopened: ${(err as Error).message}`, { cause: err });
      }
      throw toZebuError(err);
    }
    this.meta = next;
  }

  // ---- data path ------------------------------------------------------------------------------

  /** Reads `length` bytes at `offset` into `out` at `outOffset`. */
  read(offset: number, length: number, out: Buffer, outOffset = 0): Promise<void> {
    return this.readChain(null, offset, length, out, outOffset);
  }

  /** Reads the volume as it was when snapshot `name` was taken. */
  readSnapshot(name: string, offset: number, length: number, out: Buffer, outOffset = 0): Promise<void> {
    return this.readChain(name, offset, length, out, outOffset);
  }

  private async readChain(snapshot: string | null, offset: number, length: number, out: Buffer, outOffset: number): Promise<void> {
    this.checkUsable();
    this.checkRange(offset, length);
    assert(out.length >= outOffset + length, 'read buffer too small');
    if (length === 0) return;
    const entry = await this.lock.acquireAsync(Math.floor(offset / BLOCK_SIZE), Math.ceil((offset + length) / BLOCK_SIZE), true);
    try {
      // The chain is taken under the lock: a tree change holds every block while it swaps it.
      await this.readResolved(offset, length, out, outOffset, snapshot === null ? this.chain : this.snapshotChain(snapshot));
    } catch (err) {
      throw toZebuError(err);
    } finally {
      this.lock.release(entry);
    }
  }

  /**
   * Where snapshot `name` may differ from its ancestor snapshot `base` (null: from an empty
   * volume), in order, merged: `data` true where a layer above `base` in the snapshot's chain
   * holds the block (written, trimmed or zeroed since), false where none does (the bytes are
   * `base`'s). A backup reads only the former. NOT_FOUND when `base` is not an ancestor.
   *
   * `name` null: the live volume. `aboveImage`: the backing image (base layer) counts as `base`
   * would: false where the bytes are the image's — what a rebuild onto a replica that has the
   * same image need not copy.
   */
  async snapshotChanges(name: string | null, base: string | null, offset: number, length: number, aboveImage = false): Promise<Extent[]> {
    this.checkUsable();
    this.checkRange(offset, length);
    const extents: Extent[] = [];
    if (length === 0) return extents;
    const first = Math.floor(offset / BLOCK_SIZE);
    const end = Math.ceil((offset + length) / BLOCK_SIZE);
    const entry = await this.lock.acquireAsync(first, end, true);
    try {
      const chain = name === null ? this.chain : this.snapshotChain(name);
      let above = aboveImage ? chain.filter((layer) => layer.meta.kind !== 'base') : chain;
      if (base !== null) {
        const baseLayer = this.findSnapshot(base);
        const at = chain.indexOf(baseLayer);
        if (at < 0) throw new ZebuError(ErrorCode.NOT_FOUND, `snapshot ${base} is not an ancestor of snapshot ${name}`);
        above = chain.slice(0, at);
      }
      // Present runs of every layer above base, then their union.
      const runs: [number, number][] = [];
      for (const layer of above) {
        if (layer.live === null) {
          const baseEnd = Math.min(end, Math.ceil(layer.meta.baseSizeBytes! / BLOCK_SIZE));
          if (baseEnd > first) runs.push([first, baseEnd]);
          continue;
        }
        for (let block = first; block < end; ) {
          const n = layer.live.runLength(block, end - block);
          if (layer.live.get(block) !== BlockState.ABSENT) runs.push([block, block + n]);
          block += n;
        }
      }
      runs.sort((a, b) => a[0] - b[0]);
      const endByte = offset + length;
      let cursor = offset;
      const push = (stop: number, data: boolean): void => {
        if (stop <= cursor) return;
        const last = extents[extents.length - 1];
        if (last !== undefined && last.data === data) last.length += stop - cursor;
        else extents.push({ offset: cursor, length: stop - cursor, data });
        cursor = stop;
      };
      for (const [start, stop] of runs) {
        push(Math.max(offset, start * BLOCK_SIZE), false);
        push(Math.min(endByte, stop * BLOCK_SIZE), true);
      }
      push(endByte, false);
    } catch (err) {
      throw toZebuError(err);
    } finally {
      this.lock.release(entry);
    }
    return extents;
  }

  private snapshotChain(name: string): Layer[] {
    const chain: Layer[] = [];
    for (let layer: Layer | undefined = this.findSnapshot(name); layer !== undefined; ) {
      chain.push(layer);
      layer = layer.meta.parent === null ? undefined : this.layers.get(layer.meta.parent);
    }
    return chain;
  }

  /**
   * Reads through the chain; the caller holds a lock covering the range. A range that many runs
   * make up (random small writes leave a region fragmented) is read with the runs' file reads in
   * flight together, or, when only the head holds data, with one read of the head's file over
   * the whole range and zeros put where the head holds none: one system call instead of one per
   * run (a 4 MiB region written 4 KiB at a time can be hundreds of runs).
   */
  private async readResolved(offset: number, length: number, out: Buffer, outOffset: number, chain = this.chain): Promise<void> {
    const endByte = offset + length;
    const endBlock = Math.ceil(endByte / BLOCK_SIZE);
    const firstBlock = Math.floor(offset / BLOCK_SIZE);
    const [firstLayer, firstRun] = this.resolveRun(firstBlock, endBlock - firstBlock, chain);
    if (firstBlock + firstRun >= endBlock) {
      // One layer supplies the whole range (most reads): one file read, no bookkeeping.
      if (firstLayer === null) {
        out.fill(0, outOffset, outOffset + length);
        return;
      }
      const got = await firstLayer.file.read(out, outOffset, length, offset);
      if (got < length) {
        // Only a base image shorter than the volume reads short; beyond its end is zeros.
        assert(firstLayer.meta.kind === 'base', `short read from layer ${firstLayer.meta.id}`);
        out.fill(0, outOffset + got, outOffset + length);
      }
      return;
    }
    const runs: { layer: Layer | null; start: number; end: number }[] = [
      { layer: firstLayer, start: offset, end: (firstBlock + firstRun) * BLOCK_SIZE },
    ];
    let dataRuns = firstLayer === null ? 0 : 1;
    for (let block = firstBlock + firstRun; block < endBlock; ) {
      const [layer, runBlocks] = this.resolveRun(block, endBlock - block, chain);
      runs.push({ layer, start: Math.max(offset, block * BLOCK_SIZE), end: Math.min(endByte, (block + runBlocks) * BLOCK_SIZE) });
      if (layer !== null) dataRuns++;
      block += runBlocks;
    }
    const head = chain[0];
    if (dataRuns > 1 && runs.every((r) => r.layer === null || r.layer === head) && head.live !== null) {
      // Only the head supplies data: its file over the whole range, then zeros where it holds none.
      const got = await head.file.read(out, outOffset, length, offset);
      // A file shorter than the range (the volume grew since it was written) ends in zeros.
      if (got < length) out.fill(0, outOffset + got, outOffset + length);
      for (const r of runs) if (r.layer === null) out.fill(0, outOffset + (r.start - offset), outOffset + (r.end - offset));
      return;
    }
    await Promise.all(runs.map(async (r) => {
      const dest = outOffset + (r.start - offset);
      const want = r.end - r.start;
      if (r.layer === null) {
        out.fill(0, dest, dest + want);
        return;
      }
      const got = await r.layer.file.read(out, dest, want, r.start);
      // Only a base image shorter than the volume reads short; beyond its end is zeros.
      if (got < want) {
        assert(r.layer.meta.kind === 'base', `short read from layer ${r.layer.meta.id}`);
        out.fill(0, dest + got, dest + want);
      }
    }));
  }

  /** The layer that supplies `block` (null: zeros) and how many following blocks it also supplies. */
  private resolveRun(block: number, limit: number, chain: Layer[]): [Layer | null, number] {
    const source = this.resolveBlock(block, chain);
    if (chain.length === 1 && chain[0].live !== null) {
      return [source, chain[0].live.runLength(block, limit)];
    }
    let n = 1;
    while (n < limit && this.resolveBlock(block + n, chain) === source) n++;
    return [source, n];
  }

  private resolveBlock(block: number, chain: Layer[]): Layer | null {
    for (const layer of chain) {
      if (layer.live === null) {
        // Base image: present wherever the file has bytes.
        return block * BLOCK_SIZE < layer.meta.baseSizeBytes! ? layer : null;
      }
      const state = layer.live.get(block);
      if (state === BlockState.DATA) return layer;
      if (state === BlockState.ZERO) return null;
    }
    return null;
  }

  /** Writes `length` bytes of `data` from `dataOffset` at volume `offset`. */
  write(offset: number, data: Buffer, dataOffset = 0, length = data.length - dataOffset): Promise<void> {
    return this.writeData(offset, data, dataOffset, length, this.intent);
  }

  /** A write, in the write-intent log `intent` (null: not logged: a rebuild's copy). */
  private async writeData(offset: number, data: Buffer, dataOffset: number, length: number, intent: IntentLog | null): Promise<void> {
    this.checkUsable();
    this.checkRange(offset, length);
    assert(data.length >= dataOffset + length, 'write buffer too small');
    if (length === 0) return;
    const first = Math.floor(offset / BLOCK_SIZE);
    const end = Math.ceil((offset + length) / BLOCK_SIZE);
    // The epoch the write arrived in (a newer engine may open the replica while it is applied).
    const epoch = this.meta.epoch;
    // Regions already active (the common case) cost no promise here.
    const activation = intent === null ? null : intent.enter(offset, length);
    // The lock is asked for at arrival, before the activation is waited for: overlapping writes
    // apply in arrival order even when a later one finds its region already recorded (it does
    // not wait) while an earlier one still waits for the record that names it.
    const granted = this.lock.acquireAsync(first, end, false);
    let ok = false;
    let entry: RangeLockEntry | null = null;
    try {
      entry = await this.lockedAfter(activation, granted);
      this.checkUsable();
      await this.writeLocked(offset, data, dataOffset, length);
      this.revision++;
      this.unflushedEpoch = Math.max(this.unflushedEpoch, epoch);
      ok = true;
    } catch (err) {
      throw toZebuError(err);
    } finally {
      if (entry !== null) this.lock.release(entry);
      intent?.exit(offset, length, ok);
    }
  }

  /**
   * The range lock `granted` (asked for at arrival), once the write-intent `activation` (if any)
   * is durable. An activation that fails still waits for its place in the lock's order and gives
   * it back at once: no entry is left behind to block later requests.
   */
  private async lockedAfter(activation: Promise<void> | null, granted: Promise<RangeLockEntry>): Promise<RangeLockEntry> {
    if (activation !== null) {
      try {
        await activation;
      } catch (err) {
        void granted.then((entry) => this.lock.release(entry));
        throw err;
      }
    }
    return granted;
  }

  private async writeLocked(offset: number, data: Buffer, dataOffset: number, length: number): Promise<void> {
    const head = this.head;
    const live = head.live!;
    const first = Math.floor(offset / BLOCK_SIZE);
    const end = Math.ceil((offset + length) / BLOCK_SIZE);
    const headPartial = offset % BLOCK_SIZE !== 0 && live.get(first) !== BlockState.DATA;
    const tailPartial = (offset + length) % BLOCK_SIZE !== 0 && live.get(end - 1) !== BlockState.DATA;
    if (headPartial || tailPartial) {
      // A block the head does not hold yet is written whole: read it through the chain, merge.
      const spanStart = first * BLOCK_SIZE;
      const span = Buffer.allocUnsafe((end - first) * BLOCK_SIZE);
      if (headPartial) await this.readResolved(spanStart, BLOCK_SIZE, span, 0);
      if (tailPartial && (end - 1 !== first || !headPartial)) {
        await this.readResolved((end - 1) * BLOCK_SIZE, BLOCK_SIZE, span, span.length - BLOCK_SIZE);
      }
      data.copy(span, offset - spanStart, dataOffset, dataOffset + length);
      // Only the blocks that needed merging are written whole; the rest is the caller's bytes.
      const writeStart = headPartial ? spanStart : offset;
      const writeEnd = tailPartial ? end * BLOCK_SIZE : offset + length;
      await head.file.write(span, writeStart - spanStart, writeEnd - writeStart, writeStart);
    } else {
      await head.file.write(data, dataOffset, length, offset);
    }
    this.markRange(head, first, end - first, BlockState.DATA);
  }

  private markRange(layer: Layer, start: number, count: number, state: BlockState): void {
    layer.live!.setRange(start, count, state);
    this.pending.push({ layer, start, count, state });
    this.dirtyData.add(layer);
  }

  /** TRIM and WRITE_ZEROES: the range reads back as zeros, whatever older layers hold. */
  zero(offset: number, length: number, options?: { noHole?: boolean }): Promise<void> {
    return this.zeroData(offset, length, this.intent, options?.noHole !== true);
  }

  /**
   * Zeros, in the write-intent log `intent` (null: not logged: a rebuild's copy); `punch`: the
   * head's file gives the whole blocks back (a hole), else their space stays allocated.
   */
  private async zeroData(offset: number, length: number, intent: IntentLog | null, punch = true): Promise<void> {
    this.checkUsable();
    this.checkRange(offset, length);
    if (length === 0) return;
    const first = Math.floor(offset / BLOCK_SIZE);
    const end = Math.ceil((offset + length) / BLOCK_SIZE);
    const epoch = this.meta.epoch;
    const activation = intent === null ? null : intent.enter(offset, length);
    // Asked for at arrival: see writeData.
    const granted = this.lock.acquireAsync(first, end, false);
    let ok = false;
    let entry: RangeLockEntry | null = null;
    try {
      entry = await this.lockedAfter(activation, granted);
      this.checkUsable();
      const fullFirst = Math.ceil(offset / BLOCK_SIZE);
      const fullEnd = Math.floor((offset + length) / BLOCK_SIZE);
      // Partial blocks at the edges are ordinary writes of zeros.
      if (fullFirst > fullEnd) {
        await this.writeZeroBytes(offset, length);
      } else {
        if (offset < fullFirst * BLOCK_SIZE) await this.writeZeroBytes(offset, fullFirst * BLOCK_SIZE - offset);
        if (fullEnd * BLOCK_SIZE < offset + length) await this.writeZeroBytes(fullEnd * BLOCK_SIZE, offset + length - fullEnd * BLOCK_SIZE);
        if (fullEnd > fullFirst) {
          // With nothing below the head, "absent" already reads as zeros and costs no map pages.
          const state = this.chain.length === 1 ? BlockState.ABSENT : BlockState.ZERO;
          this.markRange(this.head, fullFirst, fullEnd - fullFirst, state);
          // The map now says the blocks read as zeros, so their bytes in the head's file are
          // garbage: give them back. (Before the map is flushed a crash may leave the old map
          // over a hole: the range then reads zeros, which the unacknowledged-until-flush zero
          // allows, and the write-intent log has the region resynced anyway.)
          if (punch && this.holePunchUnavailable === null) await this.punchHead(fullFirst * BLOCK_SIZE, (fullEnd - fullFirst) * BLOCK_SIZE);
        }
      }
      this.revision++;
      this.unflushedEpoch = Math.max(this.unflushedEpoch, epoch);
      ok = true;
    } catch (err) {
      throw toZebuError(err);
    } finally {
      if (entry !== null) this.lock.release(entry);
      intent?.exit(offset, length, ok);
    }
  }

  private async punchHead(offset: number, length: number): Promise<void> {
    if (await this.head.file.punchHole(offset, length)) {
      this.punchedBytes += length;
    } else {
      // Found once, then not tried again: the blocks still read as zeros through the map.
      this.holePunchUnavailable = holePunchUnavailable() ?? `the file system of ${this.dir} cannot punch holes`;
    }
  }

  private writeZeroBytes(offset: number, length: number): Promise<void> {
    assert(length < BLOCK_SIZE, 'partial zero fits in a block');
    return this.writeLocked(offset, ZERO_BLOCK, 0, length);
  }

  /** Extents of data and of zeros (holes, trimmed, zeroed) in the range, in order, merged. */
  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    this.checkUsable();
    this.checkRange(offset, length);
    const extents: Extent[] = [];
    if (length === 0) return extents;
    const endByte = offset + length;
    let block = Math.floor(offset / BLOCK_SIZE);
    const endBlock = Math.ceil(endByte / BLOCK_SIZE);
    while (block < endBlock) {
      const [layer, runBlocks] = this.resolveRun(block, endBlock - block, this.chain);
      const start = Math.max(offset, block * BLOCK_SIZE);
      const stop = Math.min(endByte, (block + runBlocks) * BLOCK_SIZE);
      const isData = layer !== null;
      const last = extents[extents.length - 1];
      if (last !== undefined && last.data === isData) last.length += stop - start;
      else extents.push({ offset: start, length: stop - start, data: isData });
      block += runBlocks;
    }
    return extents;
  }

  // ---- flush --------------------------------------------------------------------------------

  /** Makes every write completed before this call durable. Concurrent calls share work. */
  flush(): Promise<void> {
    try {
      this.checkUsable();
    } catch (err) {
      return Promise.reject(err);
    }
    if (this.flushing === null) {
      this.flushing = this.flushOnce().finally(() => {
        this.flushing = null;
      });
      return this.flushing;
    }
    // A flush is running, but it may have captured its work before our writes completed:
    // queue one more that starts after it, shared by everyone who arrives meanwhile.
    if (this.flushAgain === null) {
      const running = this.flushing;
      this.flushAgain = running
        .catch(() => {})
        .then(() => {
          this.flushAgain = null;
          return this.flush();
        });
    }
    return this.flushAgain;
  }

  private async flushOnce(): Promise<void> {
    if (this.pending.length === 0 && this.dirtyData.size === 0 && this.revision === this.flushedRevision) return;
    const pending = this.pending;
    const dirty = this.dirtyData;
    const revision = this.revision;
    this.pending = [];
    this.dirtyData = new Set();
    try {
      for (const layer of dirty) await layer.file.datasync();
      const pages = new Map<Layer, Set<number>>();
      for (const change of pending) {
        let set = pages.get(change.layer);
        if (set === undefined) pages.set(change.layer, (set = new Set()));
        const s = set;
        change.layer.durable?.setRange(change.start, change.count, change.state, (pageIndex) => s.add(pageIndex));
      }
      const journalPages: JournalPage[] = [];
      for (const [layer, indexes] of pages) {
        if (!this.layers.has(layer.meta.id)) continue; // deleted meanwhile (revert)
        for (const pageIndex of indexes) {
          const bytes = layer.durable!.page(pageIndex) ?? new Uint8Array(MAP_PAGE_BYTES);
          journalPages.push({ layerId: layer.meta.id, pageIndex, bytes: Uint8Array.from(bytes) });
        }
      }
      await this.writeJournal(journalPages, false, revision);
      for (const page of journalPages) {
        const layer = this.layers.get(page.layerId)!;
        await layer.mapFile!.write(Buffer.from(page.bytes.buffer, page.bytes.byteOffset, MAP_PAGE_BYTES), 0, MAP_PAGE_BYTES, page.pageIndex * MAP_PAGE_BYTES);
        this.unsyncedMapFiles.add(layer.mapFile!);
      }
    } catch (err) {
      this.failure = new ZebuError(toZebuError(err).code === ErrorCode.ENOSPC ? ErrorCode.ENOSPC : ErrorCode.EIO,
        `replica ${this.dir}: flush failed, replica refuses further I/O until reopened: ${(err as Error).message}`, { cause: err });
      throw this.failure;
    }
  }

  /** Commits a journal record (see journal.ts for the order of steps). */
  private async writeJournal(pages: JournalPage[], clean: boolean, flushedRevision = this.flushedRevision, epochInSync?: number): Promise<void> {
    for (const file of this.unsyncedMapFiles) await file.datasync();
    this.unsyncedMapFiles.clear();
    const seq = this.journalSeq + 1;
    const writeEpoch = epochInSync ?? (flushedRevision !== this.flushedRevision ? this.unflushedEpoch : this.writeEpoch);
    const record = encodeRecord({ seq, revision: flushedRevision, flushedRevision, clean, writeEpoch, pages });
    const slotPath = path.join(this.dir, JOURNAL_SLOTS[seq % 2]);
    const slot = await this.disk.open(slotPath, (await this.disk.exists(slotPath)) ? 'readwrite' : 'create');
    try {
      await slot.write(record, 0, record.length, 0);
      await slot.datasync();
    } finally {
      await slot.close();
    }
    this.journalSeq = seq;
    this.flushedRevision = flushedRevision;
    this.writeEpoch = writeEpoch;
    this.unflushedEpoch = Math.max(this.unflushedEpoch, writeEpoch);
  }

  // ---- layer tree ---------------------------------------------------------------------------

  /** Runs tree-changing operations one at a time. */
  private serialTreeOp<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.treeOp.catch(() => {}).then(fn);
    this.treeOp = run;
    return run;
  }

  private async withAllBlocks<T>(fn: () => Promise<T>): Promise<T> {
    const entry: RangeLockEntry = await this.lock.acquireAsync(0, WHOLE, false);
    try {
      return await fn();
    } finally {
      this.lock.release(entry);
    }
  }

  /**
   * Online expansion: grows the volume to `sizeBytes` (never shrinks). Waits for in-flight I/O
   * (all blocks locked), flushes, then replaces replica.json; the new blocks read as zeros.
   */
  expand(sizeBytes: number): Promise<ReplicaInfo> {
    return this.serialTreeOp(async () => {
      this.checkUsable();
      validateSizeBytes(sizeBytes);
      if (sizeBytes < this.meta.sizeBytes) throw invalid(`a replica cannot shrink: it has ${this.meta.sizeBytes} bytes, asked ${sizeBytes}`);
      if (sizeBytes === this.meta.sizeBytes) return this.info();
      return this.withAllBlocks(async () => {
        await this.flush();
        await this.writeMeta({ ...this.meta, sizeBytes });
        this.blockCount = sizeBytes / BLOCK_SIZE;
        for (const layer of this.layers.values()) {
          layer.live?.grow(this.blockCount);
          layer.durable?.grow(this.blockCount);
        }
        return this.info();
      });
    });
  }

  /**
   * Marks the replica as being rebuilt (durably, in replica.json) before any data is copied into
   * it, and clears the mark once the copy is complete: a replica whose rebuild stopped midway
   * (engine or replica crash) is never taken for a complete one. The kind says what the next
   * engine may do about it: a delta can be copied again, a full copy must start over.
   */
  setRebuilding(kind: RebuildKind | null): Promise<ReplicaInfo> {
    return this.serialTreeOp(async () => {
      this.checkUsable();
      if (rebuildKindOf(this.meta) !== kind) {
        const next: ReplicaMeta = { ...this.meta };
        if (kind === null) delete next.rebuilding;
        else next.rebuilding = kind;
        await this.writeMeta(next);
      }
      return this.info();
    });
  }

  /**
   * After a rebuild, the copy holds what the source holds: it takes the source's write counter,
   * durably (a flush writes it to the journal), so that the next engine start sees it up to date.
   */
  async setRevision(revision: number): Promise<ReplicaInfo> {
    this.checkUsable();
    if (!Number.isSafeInteger(revision) || revision < 0) throw invalid(`revision must be a whole number >= 0, got ${revision}`);
    // The caller (a rebuild) has quiesced the volume: no write races this.
    await this.flush();
    this.revision = revision;
    // The engine says: in sync as of this epoch (start-up compares writeEpoch first).
    await this.writeJournal([], false, revision, this.meta.epoch);
    return this.info();
  }

  /** Flushes, freezes the head as snapshot `name` and starts a new empty head. */
  snapshotCreate(name: string): Promise<SnapshotInfo> {
    return this.serialTreeOp(async () => {
      this.checkUsable();
      validateSnapshotName(name);
      if (this.meta.layers.some((l) => l.name === name)) throw new ZebuError(ErrorCode.EXISTS, `snapshot ${name} exists`);
      if (this.meta.layers.length >= this.meta.maxLayers) {
        // A refused request (EINVAL), not a failing disk: the engine must not take the replica out.
        throw new ZebuError(ErrorCode.EINVAL, `replica has ${this.meta.layers.length} layers, the maximum is ${this.meta.maxLayers}; delete snapshots first`);
      }
      // Maps go (durably) before the tree changes: a crash between leaves no map for a changed chain.
      await this.intent?.invalidateAllMissed();
      return this.withAllBlocks(async () => {
        await this.flush();
        const newId = layerIdFor(this.meta.nextLayerId);
        await Replica.createLayerFiles(this.disk, this.dir, newId, this.meta.sizeBytes);
        const createdAt = new Date().toISOString();
        const oldHeadId = this.meta.headId;
        const next: ReplicaMeta = {
          ...this.meta,
          nextLayerId: this.meta.nextLayerId + 1,
          headId: newId,
          layers: [
            ...this.meta.layers.map((l) => (l.id === oldHeadId ? { ...l, kind: 'snapshot' as const, name, createdAt } : l)),
            { id: newId, kind: 'head' as const, parent: oldHeadId, name: null, createdAt },
          ],
        };
        const layer = await this.openLayer(next.layers[next.layers.length - 1]);
        await this.writeMeta(next).catch(async (err) => {
          await layer.file.close();
          await layer.mapFile!.close();
          throw err;
        });
        for (const lm of next.layers) {
          const existing = this.layers.get(lm.id);
          if (existing !== undefined) existing.meta = lm;
        }
        this.layers.set(newId, layer);
        this.rebuildChain();
        return this.snapshotInfo(this.layers.get(oldHeadId)!);
      });
    });
  }

  snapshotList(): SnapshotInfo[] {
    this.checkUsable();
    return [...this.layers.values()].filter((l) => l.meta.kind === 'snapshot').map((l) => this.snapshotInfo(l));
  }

  private snapshotInfo(layer: Layer): SnapshotInfo {
    let blocks = 0;
    layer.live?.forEachPresentRun((_s, count) => {
      blocks += count;
    });
    return {
      name: layer.meta.name!,
      id: layer.meta.id,
      parent: layer.meta.parent,
      createdAt: layer.meta.createdAt,
      sizeBytesUsed: blocks * BLOCK_SIZE,
      inChain: this.chain.includes(layer),
    };
  }

  private findSnapshot(name: string): Layer {
    validateSnapshotName(name);
    for (const layer of this.layers.values()) {
      if (layer.meta.kind === 'snapshot' && layer.meta.name === name) return layer;
    }
    throw new ZebuError(ErrorCode.NOT_FOUND, `snapshot ${name} not found`);
  }

  /** Deletes a snapshot: its blocks that a child lacks are merged into that child first. */
  snapshotDelete(name: string): Promise<void> {
    return this.serialTreeOp(async () => {
      this.checkUsable();
      const victim = this.findSnapshot(name);
      await this.intent?.invalidateAllMissed();
      const children = [...this.layers.values()].filter((l) => l.meta.parent === victim.meta.id);
      for (const child of children) await this.mergeInto(victim, child);
      await this.flush();
      await this.withAllBlocks(async () => {
        const next: ReplicaMeta = {
          ...this.meta,
          layers: this.meta.layers
            .filter((l) => l.id !== victim.meta.id)
            .map((l) => (l.parent === victim.meta.id ? { ...l, parent: victim.meta.parent } : l)),
        };
        await this.writeMeta(next);
        for (const lm of next.layers) this.layers.get(lm.id)!.meta = lm;
        this.layers.delete(victim.meta.id);
        this.rebuildChain();
      });
      await this.dropLayerFiles(victim);
    });
  }

  private async mergeInto(from: Layer, child: Layer): Promise<void> {
    const runs: [number, number, BlockState][] = [];
    from.live!.forEachPresentRun((start, count, state) => runs.push([start, count, state]));
    const buf = Buffer.allocUnsafe(MERGE_CHUNK_BLOCKS * BLOCK_SIZE);
    for (const [runStart, runCount, state] of runs) {
      for (let start = runStart; start < runStart + runCount; start += MERGE_CHUNK_BLOCKS) {
        const count = Math.min(MERGE_CHUNK_BLOCKS, runStart + runCount - start);
        // The head takes writes meanwhile: copy each chunk under the range lock so that a block the
        // head has written is never overwritten with the older snapshot's bytes.
        const entry = await this.lock.acquireAsync(start, start + count, false);
        try {
          let block = start;
          while (block < start + count) {
            const childLive = child.live!;
            const n = childLive.runLength(block, start + count - block);
            if (childLive.get(block) === BlockState.ABSENT) {
              if (state === BlockState.DATA) {
                const bytes = n * BLOCK_SIZE;
                const got = await from.file.read(buf, 0, bytes, block * BLOCK_SIZE);
                assert(got === bytes, `short read merging layer ${from.meta.id}`);
                await child.file.write(buf, 0, bytes, block * BLOCK_SIZE);
              }
              this.markRange(child, block, n, state);
            }
            block += n;
          }
        } finally {
          this.lock.release(entry);
        }
      }
    }
  }

  private async dropLayerFiles(layer: Layer): Promise<void> {
    this.pending = this.pending.filter((c) => c.layer !== layer);
    this.dirtyData.delete(layer);
    if (layer.mapFile !== null) this.unsyncedMapFiles.delete(layer.mapFile);
    await layer.file.close().catch(() => {});
    await layer.mapFile?.close().catch(() => {});
    await this.disk.unlink(dataPath(this.dir, layer.meta.id)).catch(() => {});
    await this.disk.unlink(mapPath(this.dir, layer.meta.id)).catch(() => {});
  }

  /** Discards the head and starts a new empty head on top of snapshot `name`. */
  snapshotRevert(name: string): Promise<void> {
    return this.serialTreeOp(async () => {
      this.checkUsable();
      const target = this.findSnapshot(name);
      await this.intent?.invalidateAllMissed();
      await this.withAllBlocks(async () => {
        const oldHead = this.head;
        const newId = layerIdFor(this.meta.nextLayerId);
        await Replica.createLayerFiles(this.disk, this.dir, newId, this.meta.sizeBytes);
        const next: ReplicaMeta = {
          ...this.meta,
          nextLayerId: this.meta.nextLayerId + 1,
          headId: newId,
          layers: [
            ...this.meta.layers.filter((l) => l.id !== oldHead.meta.id),
            { id: newId, kind: 'head' as const, parent: target.meta.id, name: null, createdAt: new Date().toISOString() },
          ],
        };
        const layer = await this.openLayer(next.layers[next.layers.length - 1]);
        await this.writeMeta(next);
        this.layers.delete(oldHead.meta.id);
        this.layers.set(newId, layer);
        this.rebuildChain();
        await this.dropLayerFiles(oldHead);
        this.revision++;
        this.unflushedEpoch = this.meta.epoch;
        await this.flush();
      });
    });
  }

  // ---- rebuild copies under leases (see copy-leases.ts) -----------------------------------------

  /**
   * A rebuild's copy write (zero: the range reads as zeros) under lease `leaseId`, refused with
   * LEASE_REVOKED once the engine revoked that lease. The lease is checked and counted before
   * anything is awaited, so a revoke that arrives later waits for this write.
   */
  async copyWrite(leaseId: number, offset: number, data: Buffer | null, length: number): Promise<void> {
    this.copyLeases.begin(this.meta.epoch, leaseId);
    try {
      // Not in the write-intent log: the engine keeps what is left to copy in missed-write maps
      // on the other replicas, and takes a region out of them only once the copy is durable here
      // (rebuild-sequence.ts). Logged, every region copied since the last confirmed flush would
      // be copied again by a rebuild that goes on after a stop.
      if (data === null) await this.zeroData(offset, length, null);
      else await this.writeData(offset, data, 0, data.length, null);
    } finally {
      this.copyLeases.end(leaseId);
    }
  }

  /** See BlockBackend.copyPull: the lease covers the source read too, so a revoke waits for the whole pull. */
  async copyPull(leaseId: number, offset: number, length: number, zeros: boolean, read: () => Promise<Buffer>): Promise<void> {
    this.checkUsable();
    this.checkRange(offset, length);
    this.copyLeases.begin(this.meta.epoch, leaseId);
    try {
      const data = await read();
      assert(data.length === length, 'copy pull: the source returned a short read');
      // Not in the write-intent log (see copyWrite).
      if (zeros && isAllZero(data)) await this.zeroData(offset, length, null);
      else await this.writeData(offset, data, 0, length, null);
    } finally {
      this.copyLeases.end(leaseId);
    }
  }

  /** The engine revokes lease `leaseId`: later copy writes with it are refused; resolves once its writes in flight landed. */
  leaseRevoke(leaseId: number): Promise<void> {
    return this.copyLeases.revoke(this.meta.epoch, leaseId);
  }

  // ---- info and lifecycle -------------------------------------------------------------------

  info(): ReplicaInfo {
    return {
      sizeBytes: this.meta.sizeBytes,
      blockSizeBytes: BLOCK_SIZE,
      epoch: this.meta.epoch,
      revision: this.revision,
      flushedRevision: this.flushedRevision,
      cleanShutdown: this.previousCleanShutdown,
      headId: this.meta.headId,
      chain: this.chain.map((l) => l.meta.id),
      layerCount: this.meta.layers.length,
      maxLayers: this.meta.maxLayers,
      hasBase: this.meta.layers.some((l) => l.kind === 'base'),
      baseSizeBytes: this.meta.layers.find((l) => l.kind === 'base')?.baseSizeBytes ?? null,
      rebuilding: rebuildKindOf(this.meta) !== null,
      rebuildKind: rebuildKindOf(this.meta),
      activeRegions: this.intent?.activeCount ?? 0,
      intentRegionBytes: INTENT_REGION_BYTES,
      writeEpoch: this.writeEpoch,
      punchedBytes: this.punchedBytes,
      holePunchUnavailable: this.holePunchUnavailable,
    };
  }

  // ---- write-intent log (see intent-log.ts) ---------------------------------------------------

  /** FLUSH bookkeeping at its arrival, before flush() (the data server calls both in order). */
  flushArrived(seq: number, confirmed: number, evict = false): void {
    this.intent?.flushArrived(seq, confirmed, evict);
  }

  /** A new engine opened the replica (OPEN). */
  engineOpened(): void {
    this.intent?.engineOpened();
  }

  /** Without a log (benchmark baseline) the log reads empty and holds no missed-write maps. */
  intentGet(): IntentSummary {
    this.checkUsable();
    return this.intent?.summary() ?? { regionBytes: INTENT_REGION_BYTES, active: [], pinned: [], missed: {}, invalidMissed: [] };
  }

  /** Synchronous in memory at the call (ordered with FLUSH); resolves once durable. */
  missedStart(key: string): Promise<void> {
    try {
      this.checkUsable();
    } catch (err) {
      return Promise.reject(err);
    }
    return this.intent?.missedStart(key) ?? Promise.resolve();
  }

  /** Hands a map over (a rebuild copies the source's maps): see IntentLog.missedMerge. */
  async missedMerge(key: string, regions: number[], invalidated: boolean): Promise<void> {
    this.checkUsable();
    const regionCount = Math.ceil(this.meta.sizeBytes / INTENT_REGION_BYTES);
    for (const r of regions) {
      if (!Number.isSafeInteger(r) || r < 0 || r >= regionCount) throw invalid(`region ${r} is outside the volume (${regionCount} regions)`);
    }
    await this.intent?.missedMerge(key, regions, invalidated);
  }

  /** A rebuild copied these regions (and the front of those in `progress`) to replica `key`: see IntentLog.missedClear. */
  async missedClear(key: string, regions: number[], progress: [number, number][] = []): Promise<void> {
    this.checkUsable();
    const regionCount = Math.ceil(this.meta.sizeBytes / INTENT_REGION_BYTES);
    for (const r of [...regions, ...progress.map(([region]) => region)]) {
      if (!Number.isSafeInteger(r) || r < 0 || r >= regionCount) throw invalid(`region ${r} is outside the volume (${regionCount} regions)`);
    }
    for (const [, upTo] of progress) {
      if (!Number.isSafeInteger(upTo) || upTo <= 0 || upTo >= INTENT_REGION_BYTES || upTo % 4096 !== 0) throw invalid(`a region copied up to ${upTo} bytes: not whole 4 KiB blocks inside a region`);
    }
    await this.intent?.missedClear(key, regions, progress);
  }

  missedGet(key: string): number[] {
    this.checkUsable();
    if (this.intent === null) throw new ZebuError(ErrorCode.NOT_FOUND, `no missed-write map for ${key} (no write-intent log)`);
    return this.intent.missedGet(key);
  }

  /** Regions of key's map a rebuild copied in part: [region, bytes copied from its start]. */
  missedPartial(key: string): [number, number][] {
    return this.intent?.missedPartial(key) ?? [];
  }

  async missedDrop(key: string): Promise<void> {
    this.checkUsable();
    await this.intent?.missedDrop(key);
  }

  async missedPrune(keep: string[]): Promise<void> {
    this.checkUsable();
    await this.intent?.missedPrune(keep);
  }

  /** See IntentLog.release: the engine vouches that these regions are the same and durable everywhere. */
  async intentRelease(regions: number[]): Promise<void> {
    this.checkUsable();
    this.intent?.release(regions);
  }

  /**
   * SHA-256 of the bytes in the range as the live volume (snapshot null) or snapshot `snapshot`
   * reads them, through the chain (holes as zeros).
   */
  async regionHash(offset: number, length: number, snapshot: string | null = null): Promise<Buffer> {
    this.checkUsable();
    this.checkRange(offset, length);
    const hash = createHash('sha256');
    // A reused buffer: a fresh 4 MiB one per region faults in (and zeroes) every page, which cost
    // more than reading and hashing the region (a resumed rebuild hashes whole snapshots).
    // Not given back after a failed read: a read of it still in flight could land in it later.
    const chunk = this.hashBuffers.pop() ?? Buffer.allocUnsafeSlow(INTENT_REGION_BYTES);
    for (let at = offset; at < offset + length; ) {
      const n = Math.min(chunk.length, offset + length - at);
      await this.readChain(snapshot, at, n, chunk, 0);
      hash.update(chunk.subarray(0, n));
      at += n;
    }
    if (this.hashBuffers.length < HASH_BUFFERS_KEPT) this.hashBuffers.push(chunk);
    return hash.digest();
  }

  /** Flushes, marks the replica clean and closes its files. */
  async close(): Promise<void> {
    if (this.closed) return;
    await this.treeOp.catch(() => {});
    if (this.failure === null) {
      await this.withAllBlocks(async () => {
        await this.flush();
        await this.writeJournal([], true);
        for (const file of this.unsyncedMapFiles) await file.datasync();
        this.unsyncedMapFiles.clear();
      });
      await this.intent?.close();
    }
    this.closed = true;
    await this.closeFiles();
  }

  /** Closes files without flushing: what a crash leaves behind, minus the page cache loss. */
  async abandon(): Promise<void> {
    this.closed = true;
    await this.closeFiles();
  }

  private async closeFiles(): Promise<void> {
    await this.intent?.abandon();
    for (const layer of this.layers.values()) {
      await layer.file.close().catch(() => {});
      await layer.mapFile?.close().catch(() => {});
    }
  }
}

export { BLOCK_SIZE, BLOCK_SHIFT };
