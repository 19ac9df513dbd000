/**
 * Garbage collection of a target's blocks: mark and sweep, started from the tombstones that
 * deleting a backup leaves (repository.ts deleteBackup).
 *
 * - Candidates: the blocks of the tombstones whose manifest is gone. No listing of blocks: a
 *   block can only have lost its last reference when a manifest that named it was deleted.
 * - Mark: every block named by a completed or partial manifest of any volume on the target.
 * - Sweep: candidates not marked are removed, except those a running backup claims
 *   (block-index.ts); then the tombstones are removed.
 * A crash at any point leaves the tombstones that were not finished; the next run recomputes
 * everything from the target and completes the job. Nothing a manifest names is ever removed.
 */
import type { BackupRepository } from './repository.ts';

export interface GcResult {
  /** Deleted backups whose blocks were collected. */
  tombstones: number;
  candidates: number;
  removedBlocks: number;
  /** Candidates kept because a running backup relies on them. */
  keptClaimed: number;
  /** Manifests read to mark referenced blocks. */
  manifestsRead: number;
}

export async function runGc(repo: BackupRepository): Promise<GcResult> {
  const result: GcResult = { tombstones: 0, candidates: 0, removedBlocks: 0, keptClaimed: 0, manifestsRead: 0 };
  const volumes = await repo.listVolumes();
  const tombstones: { volume: string; backup: string; blocks: string[] }[] = [];
  const candidates = new Set<string>();
  const listings = new Map<string, { completed: string[]; partial: string[] }>();
  for (const volume of volumes) {
    const listing = await repo.listBackups(volume);
    listings.set(volume, listing);
    const live = new Set([...listing.completed, ...listing.partial]);
    for (const backup of await repo.listTombstones(volume)) {
      // A delete that stopped midway: the manifest still counts, the tombstone waits.
      if (live.has(backup)) continue;
      const m = await repo.readTombstone(volume, backup);
      const blocks = m?.blocks.map(([, hash]) => hash) ?? [];
      tombstones.push({ volume, backup, blocks });
      for (const hash of blocks) candidates.add(hash);
    }
  }
  result.tombstones = tombstones.length;
  result.candidates = candidates.size;
  if (tombstones.length === 0) return result;

  // Mark: one manifest at a time, keeping only the candidates' fate in memory.
  for (const [volume, listing] of listings) {
    for (const backup of listing.completed) {
      const m = await repo.readManifest(volume, backup);
      result.manifestsRead++;
      if (m !== null) for (const [, hash] of m.blocks) candidates.delete(hash);
    }
    for (const backup of listing.partial) {
      const m = await repo.readPartial(volume, backup);
      result.manifestsRead++;
      if (m !== null) for (const [, hash] of m.blocks) candidates.delete(hash);
    }
  }

  const kept = new Set<string>();
  for (const hash of candidates) {
    if (await repo.index.sweep(hash, () => repo.deleteBlock(hash))) result.removedBlocks++;
    else kept.add(hash);
  }
  result.keptClaimed = kept.size;
  // A tombstone with a block a running backup claimed waits for the next collection: by then
  // that backup's manifest names the block, or it failed and the block is collectable again.
  for (const { volume, backup, blocks } of tombstones) {
    if (!blocks.some((hash) => kept.has(hash))) await repo.removeTombstone(volume, backup);
  }
  return result;
}
