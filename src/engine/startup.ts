/**
 * Which replicas start RW. Pure: replica infos in, modes out. The full recovery story
 * (write-intent logs, delta rebuilds, salvage) replaces the body of this function later; the
 * engine depends only on its signature.
 */
import type { ReplicaInfo } from '../replica/replica.ts';

export interface StartupCandidate {
  address: string;
  info: ReplicaInfo | null;
  error: string | null;
}

export interface StartupDecision {
  mode: 'RW' | 'ERR';
  reason: string;
}

export function chooseStartupModes(sizeBytes: number, candidates: StartupCandidate[]): StartupDecision[] {
  const usable = candidates.map((c) => c.info !== null && c.info.sizeBytes === sizeBytes && !c.info.rebuilding);
  let best: ReplicaInfo | null = null;
  for (const [i, c] of candidates.entries()) {
    if (!usable[i]) continue;
    const info = c.info!;
    if (best === null || info.flushedRevision > best.flushedRevision || (info.flushedRevision === best.flushedRevision && info.revision > best.revision)) {
      best = info;
    }
  }
  return candidates.map((c, i) => {
    if (c.info === null) return { mode: 'ERR', reason: `cannot open replica: ${c.error}` };
    if (c.info.rebuilding) return { mode: 'ERR', reason: 'incomplete rebuild: its copy stopped midway' };
    if (!usable[i]) return { mode: 'ERR', reason: `replica size ${c.info.sizeBytes} differs from the volume size ${sizeBytes}` };
    if (c.info.flushedRevision < best!.flushedRevision || c.info.revision < best!.revision) {
      return { mode: 'ERR', reason: `replica is behind (revision ${c.info.revision}, best ${best!.revision})` };
    }
    return { mode: 'RW', reason: 'up to date' };
  });
}
