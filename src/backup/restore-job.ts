/**
 * Restore: writes a backup's blocks into a volume (through its engine), each one checked against
 * its hash after decompression. A missing or corrupt block fails the restore with an error that
 * names the block, its offset and the backup.
 *
 * Incremental apply (DR standby volumes): given the manifest the volume already holds, only the
 * blocks whose hash differs are written, and blocks the new backup no longer has (all zeros now)
 * are zeroed.
 */
import { ZebuError, ErrorCode, assert, toZebuError } from '../errors.ts';
import type { BackupRepository } from './repository.ts';
import { forEachBounded } from './backup-job.ts';
import { BACKUP_BLOCK_BYTES, type Manifest } from './format.ts';

/** Where a restore writes: an attached volume (an engine's data socket). */
export interface BlockWriter {
  write(offset: number, data: Buffer): Promise<void>;
  /** The range reads as zeros afterwards. */
  zero(offset: number, length: number): Promise<void>;
  flush(): Promise<void>;
}

export interface RestoreProgress {
  doneBytes: number;
  totalBytes: number;
}

export interface RestoreJobOptions {
  repo: BackupRepository;
  sink: BlockWriter;
  manifest: Manifest;
  /** What the volume holds already: a backup applied before (standby), or null for a new, all-zero volume. */
  applied: Manifest | null;
  /** What the volume holds is unknown (its applied backup is gone): zero every block the manifest lacks. */
  zeroOthers?: boolean;
  /**
   * Applies of these backups over `applied` stopped midway: any block where one differs from
   * `applied` may hold either, so those are written (or zeroed) again too.
   */
  interrupted?: Manifest[];
  /** The volume's size; at least the manifest's. */
  sizeBytes: number;
  concurrency: number;
  /** Called at the start, after every block and at the end (the caller throttles what it stores). */
  onProgress?: (progress: RestoreProgress) => void;
  signal?: AbortSignal;
}


export interface RestoreResult {
  writtenBlocks: number;
  zeroedBlocks: number;
  bytes: number;
}

export async function runRestore(o: RestoreJobOptions): Promise<RestoreResult> {
  const { manifest } = o;
  if (o.sizeBytes < manifest.sizeBytes) throw new ZebuError(ErrorCode.EINVAL, `backup ${manifest.name} is ${manifest.sizeBytes} bytes; the volume is only ${o.sizeBytes}`);
  const blockLength = (index: number): number => Math.min(BACKUP_BLOCK_BYTES, manifest.sizeBytes - index * BACKUP_BLOCK_BYTES);
  const before = new Map(o.applied?.blocks ?? []);
  const partly = (o.interrupted ?? []).map((m) => new Map(m.blocks));
  const writes = manifest.blocks.filter(([index, hash]) => before.get(index) !== hash || partly.some((p) => p.get(index) !== hash));
  const now = new Set(manifest.blocks.map(([index]) => index));
  const blockCount = Math.ceil(manifest.sizeBytes / BACKUP_BLOCK_BYTES);
  const zeroes = o.zeroOthers
    ? Array.from({ length: blockCount }, (_, i) => i).filter((index) => !now.has(index))
    : [...new Set([...before.keys(), ...partly.flatMap((p) => [...p.keys()])])].filter((index) => !now.has(index) && index < blockCount).sort((a, b) => a - b);
  const totalBytes = writes.reduce((n, [i]) => n + blockLength(i), 0) + zeroes.reduce((n, i) => n + blockLength(i), 0);
  let doneBytes = 0;
  const report = (): void => o.onProgress?.({ doneBytes, totalBytes });
  report();

  await forEachBounded(
    writes,
    o.concurrency,
    async ([index, hash]) => {
      const offset = index * BACKUP_BLOCK_BYTES;
      let data: Buffer;
      try {
        data = await o.repo.readBlock(hash);
      } catch (err) {
        const e = toZebuError(err);
        throw new ZebuError(e.code === ErrorCode.NOT_FOUND ? ErrorCode.EIO : e.code, `backup ${manifest.name} of volume ${manifest.volume}, block at offset ${offset}: ${e.message}`, { cause: err });
      }
      if (data.length !== blockLength(index)) {
        throw new ZebuError(ErrorCode.EIO, `backup ${manifest.name} of volume ${manifest.volume}, block ${hash} at offset ${offset}: ${data.length} bytes, expected ${blockLength(index)}`);
      }
      await o.sink.write(offset, data);
      doneBytes += data.length;
      report();
    },
    o.signal,
  );
  await forEachBounded(
    zeroes,
    o.concurrency,
    async (index) => {
      await o.sink.zero(index * BACKUP_BLOCK_BYTES, blockLength(index));
      doneBytes += blockLength(index);
      report();
    },
    o.signal,
  );
  await o.sink.flush();
  assert(doneBytes === totalBytes, 'every block restored');
  report();
  return { writtenBlocks: writes.length, zeroedBlocks: zeroes.length, bytes: doneBytes };
}
