/**
 * Verify a target: every block every completed manifest refers to is read, decompressed and
 * checked against its hash. Each block is checked once however many backups share it; the
 * answer lists the missing and corrupt blocks of each backup.
 */
import { ErrorCode, toZebuError } from '../errors.ts';
import { forEachBounded } from './backup-job.ts';
import { BACKUP_BLOCK_BYTES, type Manifest } from './format.ts';
import type { BackupRepository } from './repository.ts';

export interface BlockProblem {
  hash: string;
  /** Offset of the block in the volume (the first one, when the backup refers to it more than once). */
  offset: number;
  problem: 'missing' | 'corrupt';
  message: string;
}

export interface BackupVerifyResult {
  volume: string;
  backup: string;
  blocks: number;
  problems: BlockProblem[];
  /** The manifest itself could not be read (damaged): the reason. */
  manifestError: string | null;
}

export interface TargetVerifyResult {
  url: string;
  backups: BackupVerifyResult[];
  /** Distinct blocks checked. */
  blocksChecked: number;
  bytesRead: number;
  missingBlocks: number;
  corruptBlocks: number;
  durationMs: number;
}

export async function verifyTarget(repo: BackupRepository, options: { volume?: string; concurrency?: number } = {}): Promise<TargetVerifyResult> {
  const started = Date.now();
  const volumes = options.volume !== undefined ? [options.volume] : await repo.listVolumes();
  const manifests: { volume: string; backup: string; manifest: Manifest | null; error: string | null }[] = [];
  for (const volume of volumes) {
    for (const backup of (await repo.listBackups(volume)).completed) {
      try {
        manifests.push({ volume, backup, manifest: await repo.readManifest(volume, backup), error: null });
      } catch (err) {
        manifests.push({ volume, backup, manifest: null, error: (err as Error).message });
      }
    }
  }
  const hashes = new Set<string>();
  for (const m of manifests) for (const [, hash] of m.manifest?.blocks ?? []) hashes.add(hash);
  const verdicts = new Map<string, { problem: 'missing' | 'corrupt'; message: string } | null>();
  let bytesRead = 0;
  await forEachBounded([...hashes], options.concurrency ?? 4, async (hash) => {
    try {
      bytesRead += (await repo.readBlock(hash)).length;
      verdicts.set(hash, null);
    } catch (err) {
      const e = toZebuError(err);
      if (e.code !== ErrorCode.NOT_FOUND && e.code !== ErrorCode.EIO) throw err;
      verdicts.set(hash, { problem: e.code === ErrorCode.NOT_FOUND ? 'missing' : 'corrupt', message: e.message });
    }
  });
  const result: TargetVerifyResult = { url: repo.url, backups: [], blocksChecked: hashes.size, bytesRead, missingBlocks: 0, corruptBlocks: 0, durationMs: 0 };
  for (const verdict of verdicts.values()) {
    if (verdict?.problem === 'missing') result.missingBlocks++;
    if (verdict?.problem === 'corrupt') result.corruptBlocks++;
  }
  for (const m of manifests) {
    const problems: BlockProblem[] = [];
    const seen = new Set<string>();
    for (const [index, hash] of m.manifest?.blocks ?? []) {
      const verdict = verdicts.get(hash);
      if (verdict == null || seen.has(hash)) continue;
      seen.add(hash);
      problems.push({ hash, offset: index * BACKUP_BLOCK_BYTES, ...verdict });
    }
    result.backups.push({ volume: m.volume, backup: m.backup, blocks: m.manifest?.blocks.length ?? 0, problems, manifestError: m.error });
  }
  result.durationMs = Date.now() - started;
  return result;
}
