/**
 * One backup: a snapshot of a volume cut into 2 MiB blocks, each stored once on the target, and
 * a manifest that maps every non-zero block to its content hash.
 *
 * Incremental: with a base (the volume's previous completed backup, whose snapshot is still an
 * ancestor of this one), only the blocks the layers above the base snapshot hold are read
 * (SNAPSHOT_CHANGES); every other block is carried over from the base's manifest. Without one,
 * every block the snapshot holds is read, and blocks the target already has are not uploaded.
 *
 * Order of writes, so that no manifest ever refers to a block the target lacks and a crash
 * anywhere loses nothing and leaks little:
 * 1. the partial manifest lists a new block before it becomes visible on the target (a
 *    collection after a crash sees it referenced; deleting the abandoned backup makes it
 *    collectable); its bytes are written meanwhile to a staging name (a directory target), so
 *    the listing's fsync and the write overlap, and many blocks share one listing;
 * 2. blocks are made visible (renamed from staging, or PUT);
 * 3. the completed manifest is written, then the partial one is removed, then the volume record.
 * Blocks carried over or found stored are claimed in the BlockIndex for the job's duration, so a
 * concurrent collection never removes them.
 */
import { ZebuError, ErrorCode, assert, toZebuError } from '../errors.ts';
import type { BackendExtent } from '../protocol/backend.ts';
import type { BackupRepository } from './repository.ts';
import type { StagedObject } from './target.ts';
import { BlockHasher } from './block-hasher.ts';
import {
  BACKUP_BLOCK_BYTES,
  COMPRESSION_BY_NAME,
  FORMAT,
  encodeBlockParts,
  isAllZero,
  type CompressionName,
  type Manifest,
} from './format.ts';

/** What a backup reads: an attached volume's snapshots (an engine's data socket). */
export interface SnapshotReader {
  readSnapshot(name: string, offset: number, length: number): Promise<Buffer>;
  snapshotChanges(name: string, base: string | null, offset: number, length: number): Promise<BackendExtent[]>;
  /** Optional: a buffer readSnapshot returned is no longer used (it may be reused). */
  release?(data: Buffer): void;
}

export interface BackupProgress {
  /** Bytes of the blocks to read that are done (read, and stored or found). */
  doneBytes: number;
  totalBytes: number;
  uploadedBytes: number;
}

export interface BackupJobOptions {
  repo: BackupRepository;
  source: SnapshotReader;
  volume: string;
  name: string;
  snapshot: string;
  sizeBytes: number;
  createdAt: string;
  labels: Record<string, string>;
  compression: CompressionName;
  /** The volume's newest completed backup, or null. Ignored when its snapshot is gone or off the chain. */
  base: Manifest | null;
  /** Blocks read, compressed, hashed and uploaded at once. */
  concurrency: number;
  /** The backing image the volume is on (recorded in the manifest), or null. */
  backingImage?: { name: string; checksum: string } | null;
  /** Called at the start, after every block and at the end (the caller throttles what it stores). */
  onProgress?: (progress: BackupProgress) => void;
  signal?: AbortSignal;
}

/** Blocks staged and waiting for their listing, per read slot (and at least this many in all). */
const PENDING_COMMITS_PER_SLOT = 4;
const MIN_PENDING_COMMITS = 16;

/** SNAPSHOT_CHANGES is asked for this much at a time (its reply is a list of extents). */
const CHANGES_CHUNK_BYTES = 1024 * 1024 * 1024;

export async function runBackup(o: BackupJobOptions): Promise<Manifest> {
  assert(o.concurrency >= 1, 'backup concurrency');
  const blockCount = Math.ceil(o.sizeBytes / BACKUP_BLOCK_BYTES);
  const blockLength = (index: number): number => Math.min(BACKUP_BLOCK_BYTES, o.sizeBytes - index * BACKUP_BLOCK_BYTES);
  const { repo } = o;

  // Which blocks to read.
  let base = o.base;
  let toRead: number[];
  try {
    toRead = await changedBlocks(o.source, o.snapshot, base?.snapshot ?? null, o.sizeBytes);
  } catch (err) {
    if (base === null || toZebuError(err).code !== ErrorCode.NOT_FOUND) throw err;
    // The base snapshot was deleted or reverted away from: read the whole snapshot (blocks the
    // target has are still not uploaded again).
    base = null;
    toRead = await changedBlocks(o.source, o.snapshot, null, o.sizeBytes);
  }

  const map = new Map<number, string>();
  const claimed: string[] = [];
  const hasher = new BlockHasher(o.concurrency, BACKUP_BLOCK_BYTES);
  const claim = async (hash: string): Promise<void> => {
    claimed.push(hash);
    await repo.index.claim(hash);
  };
  try {
    if (base !== null) {
      const reread = new Set(toRead);
      for (const [index, hash] of base.blocks) {
        if (index >= blockCount || reread.has(index)) continue;
        await claim(hash);
        // Claimed first, then checked: a block a collection removed before the claim is read again.
        if (repo.index.known.has(hash)) map.set(index, hash);
        else reread.add(index);
      }
      toRead = [...reread].sort((a, b) => a - b);
    }

    const manifest: Manifest = {
      format: FORMAT,
      name: o.name,
      volume: o.volume,
      sizeBytes: o.sizeBytes,
      blockBytes: BACKUP_BLOCK_BYTES,
      snapshot: o.snapshot,
      createdAt: o.createdAt,
      completedAt: null,
      labels: o.labels,
      compression: o.compression,
      base: base?.name ?? null,
      stats: { readBytes: 0, uploadedBytes: 0, uploadedBlocks: 0, reusedBlocks: 0, blocks: 0 },
      blocks: [],
      ...(o.backingImage != null ? { backingImage: o.backingImage } : {}),
    };
    // A retried backup keeps what its earlier attempts listed (their blocks may be on the
    // target) and writes the segments after theirs.
    const earlier = await repo.readPartialSegments(o.volume, o.name);
    const checkpoint = new PartialCheckpoint(repo, manifest, (earlier?.segments ?? 0) + 1);
    await repo.writePartial(manifest);

    const totalBytes = toRead.reduce((n, i) => n + blockLength(i), 0);
    let doneBytes = 0;
    const report = (): void => o.onProgress?.({ doneBytes, totalBytes, uploadedBytes: manifest.stats.uploadedBytes });
    report();

    // A new block is listed in the partial manifest (a write and an fsync) while its bytes are
    // compressed and written (staged); it becomes visible (committed) once both are done, never
    // before it is listed. The commit waits off the read slots, so many blocks share one listing
    // write and a slot moves on as soon as its block is staged.
    const uploading = new Map<string, Promise<void>>();
    const committed: string[] = [];
    const committing = new Set<Promise<void>>();
    const maxCommitting = Math.max(MIN_PENDING_COMMITS, PENDING_COMMITS_PER_SLOT * o.concurrency);
    let commitFailure: unknown = null;
    let stopping = false;
    const method = COMPRESSION_BY_NAME[o.compression];
    const one = async (index: number): Promise<void> => {
      if (commitFailure !== null) throw commitFailure;
      // Staged blocks hold memory on some targets (S3 keeps them until their PUT): bounded.
      while (committing.size >= maxCommitting) await Promise.race(committing);
      const length = blockLength(index);
      const data = await o.source.readSnapshot(o.snapshot, index * BACKUP_BLOCK_BYTES, length);
      try {
        await store(index, data, length);
      } finally {
        o.source.release?.(data);
      }
      doneBytes += length;
      report();
    };
    const store = async (index: number, data: Buffer, length: number): Promise<void> => {
      assert(data.length === length, `snapshot read of ${data.length} bytes, asked ${length}`);
      manifest.stats.readBytes += length;
      if (isAllZero(data)) {
        map.delete(index);
        return;
      }
      // Off the event loop, which meanwhile reads the next blocks (block-hasher.ts).
      const hash = await hasher.hash(data);
      await claim(hash);
      map.set(index, hash);
      // Stored already, or being stored by another block of this backup.
      if (repo.index.known.has(hash) || uploading.has(hash)) return;
      const listed = checkpoint.include(index, hash);
      // Observed below once staged; a failure meanwhile is not an unhandled rejection.
      listed.catch(() => {});
      let bytes = 0;
      const staging = (async (): Promise<StagedObject> => {
        const encoded = await encodeBlockParts(data, hash, method);
        bytes = encoded[0].length + encoded[1].length;
        return repo.stageBlock(hash, encoded);
      })();
      const commit = (async () => {
        const staged = await staging;
        try {
          await listed;
        } catch (err) {
          await staged.discard();
          throw err;
        }
        if (stopping) return staged.discard();
        await staged.commit();
        repo.index.known.add(hash);
        committed.push(hash);
        manifest.stats.uploadedBytes += bytes;
        manifest.stats.uploadedBlocks++;
      })();
      uploading.set(hash, commit);
      committing.add(commit);
      // Settled in the first reaction to the commit, so waiting for `committing` sees it gone.
      const settled = (): void => {
        committing.delete(commit);
        uploading.delete(hash);
      };
      commit.then(settled, (err: unknown) => {
        settled();
        commitFailure ??= err;
      });
      // The slot (and `data`) is free once the bytes are staged.
      await staging;
    };
    try {
      await forEachBounded(toRead, o.concurrency, one, o.signal);
    } catch (err) {
      // Staged blocks not yet committed are dropped (never visible, never leaked).
      stopping = true;
      await Promise.allSettled([...committing]);
      throw err;
    }
    await Promise.allSettled([...committing]);
    if (commitFailure !== null) throw commitFailure;
    assert(committing.size === 0, 'every staged block committed');

    manifest.blocks = [...map.entries()].sort((a, b) => a[0] - b[0]);
    manifest.stats.blocks = manifest.blocks.length;
    manifest.stats.reusedBlocks = manifest.blocks.length - manifest.stats.uploadedBlocks;
    manifest.completedAt = new Date().toISOString();
    // Every block it names is durable before the manifest is.
    try {
      await repo.flushBlocks();
    } catch (err) {
      // Not known to be durable: a retry stores them again instead of trusting them.
      for (const hash of committed) repo.index.known.delete(hash);
      throw err;
    }
    await repo.writeManifest(manifest);
    await repo.deletePartial(o.volume, o.name);
    const record = await repo.readVolume(o.volume).catch(() => null);
    await repo.writeVolume({
      format: FORMAT,
      volume: o.volume,
      sizeBytes: o.sizeBytes,
      compression: o.compression,
      createdAt: record?.createdAt ?? manifest.createdAt,
      lastBackup: o.name,
      lastBackupAt: manifest.completedAt,
    });
    report();
    return manifest;
  } finally {
    for (const hash of claimed) repo.index.release(hash);
    await hasher.close();
  }
}

/** Indexes of the 2 MiB blocks that hold a change (sorted). */
async function changedBlocks(source: SnapshotReader, snapshot: string, base: string | null, sizeBytes: number): Promise<number[]> {
  const out: number[] = [];
  let last = -1;
  for (let offset = 0; offset < sizeBytes; offset += CHANGES_CHUNK_BYTES) {
    const length = Math.min(CHANGES_CHUNK_BYTES, sizeBytes - offset);
    for (const extent of await source.snapshotChanges(snapshot, base, offset, length)) {
      if (!extent.data) continue;
      const first = Math.floor(extent.offset / BACKUP_BLOCK_BYTES);
      const end = Math.ceil((extent.offset + extent.length) / BACKUP_BLOCK_BYTES);
      for (let i = Math.max(first, last + 1); i < end; i++) out.push(i);
      last = Math.max(last, end - 1);
    }
  }
  return out;
}

/**
 * The partial manifest's segments: the new blocks a backup will upload, each segment written
 * before any block it lists becomes visible. Callers wait for a write that includes their block;
 * writes are one at a time, so blocks arriving while one is in flight share the next. Each
 * segment holds only what was listed since the previous one: the bytes written grow with the
 * volume, not with its square.
 */
class PartialCheckpoint {
  private readonly repo: BackupRepository;
  private readonly manifest: Manifest;
  private pending: [number, string][] = [];
  private segment: number;
  private writing: Promise<void> | null = null;
  private next: Promise<void> | null = null;

  constructor(repo: BackupRepository, manifest: Manifest, firstSegment: number) {
    assert(firstSegment >= 1, 'partial segments are numbered from 1');
    this.repo = repo;
    this.manifest = manifest;
    this.segment = firstSegment;
  }

  include(index: number, hash: string): Promise<void> {
    this.pending.push([index, hash]);
    return this.flush();
  }

  /** Resolves once a write that started after this call has completed. */
  private flush(): Promise<void> {
    if (this.writing === null) {
      this.writing = this.write().finally(() => {
        this.writing = null;
      });
      return this.writing;
    }
    if (this.next === null) {
      this.next = this.writing.catch(() => {}).then(() => {
        this.next = null;
        return this.flush();
      });
    }
    return this.next;
  }

  private async write(): Promise<void> {
    const blocks = this.pending;
    if (blocks.length === 0) return;
    this.pending = [];
    try {
      await this.repo.writePartialSegment(this.manifest.volume, this.manifest.name, this.segment, blocks);
    } catch (err) {
      // The segment may or may not be there: the next write puts it again, with these blocks too.
      this.pending = [...blocks, ...this.pending];
      throw err;
    }
    this.segment++;
  }
}

/** Runs `fn` over `items` with at most `limit` at once; the first failure stops the rest. */
export async function forEachBounded<T>(items: T[], limit: number, fn: (item: T) => Promise<void>, signal?: AbortSignal): Promise<void> {
  let next = 0;
  let failure: unknown = null;
  const worker = async (): Promise<void> => {
    while (failure === null && next < items.length) {
      if (signal?.aborted) {
        failure = signal.reason ?? new ZebuError(ErrorCode.CLOSED, 'cancelled');
        break;
      }
      const item = items[next++];
      try {
        await fn(item);
      } catch (err) {
        if (failure === null) failure = err;
      }
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
  if (failure !== null) throw failure;
}
