/**
 * Checks after a fault. checkVolume reads the whole volume over NBD and holds every block to the
 * writer's ledger (fault-writer.ts); compareReplicaDirs opens stopped replica directories with
 * Replica.open — independently of the engine's verify — and compares them region by region.
 */
import crypto from 'node:crypto';
import { Replica } from '../../src/replica/replica.ts';
import { DataClient } from '../../src/protocol/client.ts';
import type { NbdClient } from './nbd-client.ts';
import { BLOCK_BYTES, SECTOR_BYTES, identifyBlock, type Ledger } from './fault-writer.ts';

/**
 * 'acked': no acknowledged write may be lost (the fault left the replicas' page caches alone:
 * a replica, the engine or the frontend was killed, a disk failed, a link went dark).
 * 'contract': only writes acknowledged before an acknowledged flush (or FUA) must be there
 * (every replica crashed or lost power).
 */
export type CheckMode = 'acked' | 'contract';

export interface Violation {
  block: number;
  found: string;
  /** The oldest content the block may hold, and the newest acknowledged one. */
  floor: string;
  lastAcked: string;
}

export interface CheckReport {
  blocks: number;
  /** Blocks that broke the rule of the mode: must be 0. */
  lost: number;
  /** The first violations, for the message. */
  violations: Violation[];
  /** Blocks made of sectors of several allowed writes (legal for writes not yet flushed). */
  torn: number;
  /** Blocks older than their newest acknowledged write but not older than the floor (legal in 'contract' mode). */
  unflushedLost: number;
  /** Blocks written since the previous check that hold an acknowledged write of this round. */
  written: number;
}

const READ_CHUNK_BYTES = 1024 * 1024;
const READERS = 4;
const MAX_VIOLATIONS_KEPT = 100;

function describe(ledger: Ledger, id: number): string {
  if (id === 0) return 'zeros (initial)';
  if (id < 0) return 'torn block seen at the previous check';
  return `${ledger.zeroWrites.has(id) ? 'zero/trim' : 'write'} #${id}${ledger.fuaWrites.has(id) ? ' (FUA)' : ''}`;
}

/** Whether every 512-byte sector of the block matches the same sector of one of the candidates. */
export function sectorsFromCandidates(ledger: Ledger, block: number, slice: Buffer, candidates: number[]): boolean {
  const contents = candidates.map((id) => ledger.contentOf(id, block));
  for (let s = 0; s < BLOCK_BYTES; s += SECTOR_BYTES) {
    const sector = slice.subarray(s, s + SECTOR_BYTES);
    if (!contents.some((c) => c.subarray(s, s + SECTOR_BYTES).equals(sector))) return false;
  }
  return true;
}

/** Reads the whole volume over `client` (parallel 1 MiB reads); throws on an NBD error. */
export async function readVolume(client: NbdClient, sizeBytes: number): Promise<Buffer> {
  const out = Buffer.allocUnsafe(sizeBytes);
  let next = 0;
  const reader = async (): Promise<void> => {
    while (next < sizeBytes) {
      const offset = next;
      next += READ_CHUNK_BYTES;
      const length = Math.min(READ_CHUNK_BYTES, sizeBytes - offset);
      const { errno, data } = await client.read(offset, length);
      if (errno !== 0) throw new Error(`NBD READ ${offset}+${length} failed with errno ${errno}`);
      data.copy(out, offset);
    }
  };
  await Promise.all(Array.from({ length: READERS }, reader));
  return out;
}

/** Holds every block of `volume` (the whole volume's bytes) to the ledger. */
export function checkContent(ledger: Ledger, volume: Buffer, mode: CheckMode): CheckReport {
  const report: CheckReport = { blocks: ledger.blocks, lost: 0, violations: [], torn: 0, unflushedLost: 0, written: 0 };
  for (let b = 0; b < ledger.blocks; b++) {
    const at = b * BLOCK_BYTES;
    const history = ledger.history[b];
    const from = mode === 'acked' ? Math.max(ledger.floor[b], ledger.lastAcked[b]) : ledger.floor[b];
    const candidates = history.slice(from);
    const id = identifyBlock(volume, at, b);
    let matchedIndex = -1;
    if (id.kind === 'zero') {
      for (let i = history.length - 1; i >= from; i--) if (ledger.isZeroContent(history[i])) { matchedIndex = i; break; }
    } else if (id.kind === 'write') {
      const i = history.lastIndexOf(id.seq);
      if (i >= from) matchedIndex = i;
    }
    if (matchedIndex < 0) {
      const slice = volume.subarray(at, at + BLOCK_BYTES);
      if (id.kind === 'other' && sectorsFromCandidates(ledger, b, slice, candidates)) {
        report.torn++;
        continue;
      }
      report.lost++;
      if (report.violations.length < MAX_VIOLATIONS_KEPT) {
        const found = id.kind === 'zero' ? 'zeros' : id.kind === 'write' ? `write #${id.seq}${history.includes(id.seq) ? ' (older than allowed)' : ' (never written to this block)'}` : 'bytes no write produced';
        report.violations.push({ block: b, found, floor: describe(ledger, history[ledger.floor[b]]), lastAcked: describe(ledger, history[ledger.lastAcked[b]]) });
      }
      continue;
    }
    if (matchedIndex < ledger.lastAcked[b]) report.unflushedLost++;
    if (history.length > 1 && matchedIndex > 0) report.written++;
  }
  return report;
}

/**
 * Reads the volume, checks it against the ledger, makes what it read durable (FLUSH) and
 * takes it as the new baseline of every block. Returns the report.
 */
export async function checkAndRebase(client: NbdClient, ledger: Ledger, mode: CheckMode): Promise<CheckReport> {
  const volume = await readVolume(client, ledger.blocks * BLOCK_BYTES);
  const report = checkContent(ledger, volume, mode);
  const errno = await client.flush();
  if (errno !== 0) throw new Error(`FLUSH after the check failed with errno ${errno}`);
  for (let b = 0; b < ledger.blocks; b++) ledger.rebase(b, volume, b * BLOCK_BYTES);
  return report;
}

/** One line per violation (the first `max`), for assertion messages. */
export function describeViolations(report: CheckReport, max = 10): string {
  return report.violations
    .slice(0, max)
    .map((v) => `block ${v.block} (offset ${v.block * BLOCK_BYTES}): holds ${v.found}; must be at least ${v.floor} (newest acked: ${v.lastAcked})`)
    .join('\n');
}

export interface OfflineDifference {
  region: number;
  offset: number;
  /** sha256 (first 16 hex digits) of the region on each replica directory, in argument order. */
  hashes: string[];
}

/**
 * Opens each stopped replica directory with Replica.open and compares the live volume's bytes
 * region by region (independent of the engine's verify). The replicas are left as they were
 * (abandon: no flush, no clean mark written).
 */
export async function compareReplicaDirs(dirs: string[], regionBytes: number): Promise<{ regions: number; differing: OfflineDifference[] }> {
  const replicas: Replica[] = [];
  try {
    for (const dir of dirs) replicas.push(await Replica.open(dir));
    const sizeBytes = replicas[0].info().sizeBytes;
    for (const [i, r] of replicas.entries()) {
      if (r.info().sizeBytes !== sizeBytes) throw new Error(`replica ${dirs[i]} has ${r.info().sizeBytes} bytes, ${dirs[0]} ${sizeBytes}`);
    }
    const differing: OfflineDifference[] = [];
    const buffers = replicas.map(() => Buffer.allocUnsafe(regionBytes));
    let regions = 0;
    for (let offset = 0; offset < sizeBytes; offset += regionBytes) {
      const length = Math.min(regionBytes, sizeBytes - offset);
      await Promise.all(replicas.map((r, i) => r.read(offset, length, buffers[i])));
      regions++;
      const first = buffers[0].subarray(0, length);
      if (buffers.every((b) => b.subarray(0, length).equals(first))) continue;
      differing.push({
        region: offset / regionBytes,
        offset,
        hashes: buffers.map((b) => crypto.createHash('sha256').update(b.subarray(0, length)).digest('hex').slice(0, 16)),
      });
    }
    return { regions, differing };
  } finally {
    for (const r of replicas) await r.abandon().catch(() => {});
  }
}

/**
 * Compares running replicas region by region through the replica protocol (READ with the current
 * epoch), independently of the engine: for use while no write is in flight and no rebuild runs.
 */
export async function compareReplicasOnline(
  ports: number[],
  options: { secret: Buffer; epoch: number; sizeBytes: number; regionBytes: number },
): Promise<{ regions: number; differing: OfflineDifference[] }> {
  const clients = await Promise.all(ports.map((port) => DataClient.connect({ port, secret: options.secret, epoch: options.epoch, requestTimeoutMs: 30_000 })));
  try {
    const differing: OfflineDifference[] = [];
    let regions = 0;
    for (let offset = 0; offset < options.sizeBytes; offset += options.regionBytes) {
      const length = Math.min(options.regionBytes, options.sizeBytes - offset);
      const buffers = await Promise.all(clients.map((c) => c.read(offset, length)));
      regions++;
      if (buffers.every((b) => b.equals(buffers[0]))) continue;
      differing.push({
        region: offset / options.regionBytes,
        offset,
        hashes: buffers.map((b) => crypto.createHash('sha256').update(b).digest('hex').slice(0, 16)),
      });
    }
    return { regions, differing };
  } finally {
    for (const c of clients) c.close();
  }
}

/** The live volume's bytes of a stopped replica directory (Replica.open, then abandon: nothing written back). */
export async function readReplicaDir(dir: string): Promise<Buffer> {
  const replica = await Replica.open(dir);
  try {
    const sizeBytes = replica.info().sizeBytes;
    const out = Buffer.allocUnsafe(sizeBytes);
    const chunk = 4 * 1024 * 1024;
    for (let offset = 0; offset < sizeBytes; offset += chunk) await replica.read(offset, Math.min(chunk, sizeBytes - offset), out, offset);
    return out;
  } finally {
    await replica.abandon().catch(() => {});
  }
}
