/**
 * Backing images, the rules without the I/O: what an image is (and which input is refused), what
 * its files on disks are, and what the controller does next for an image — fetch its first file,
 * copy a ready file to another disk, or fetch it again when no file is left that can be used.
 * Everything here is a pure function of its arguments (the clock is one).
 *
 * Recovery, the point of these rules: when no file is ready and every file is `failed`, or
 * `unknown` for longer than the recovery wait (its disk or node is gone, unreachable or removed),
 * those files are cleaned up and the image is fetched again — from its URL, or for the other
 * sources from a copy of the image kept in the backup target. While any file is ready nothing is
 * fetched from the source: copies are made from a ready file. Fetching again backs off (doubling,
 * capped) and gives up after a limit, and the status says so.
 */
import { invalid } from '../errors.ts';
import type { BackingImageSource, BackingImageSpec, FileState, BackingImageFile, RefetchStatus } from '../cluster/object-types.ts';
import { FILE_STATES, writtenByManager } from '../cluster/object-types.ts';
export type { BackingImageSource, BackingImageSpec, FileState, BackingImageFile, RefetchStatus };
export { FILE_STATES, writtenByManager };

export const BACKING_IMAGE_NAME = /^[a-z0-9][a-z0-9._-]{0,62}$/;
const SNAPSHOT_NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$/;
const CHECKSUM = /^[0-9a-f]{128}$/;
export const MAX_MIN_COPIES = 10;
const MAX_URL_CHARS = 2048;
/** Fetching again: first wait, cap, and how many times before giving up. */
export const REFETCH_FIRST_WAIT_MS = 10_000;
export const REFETCH_MAX_WAIT_MS = 10 * 60_000;
export const REFETCH_MAX_ATTEMPTS = 10;

/** What a user sends to create an image; exactly one source. */
export interface BackingImageInput {
  url?: unknown;
  upload?: unknown;
  fromVolume?: unknown;
  snapshot?: unknown;
  fromBackup?: unknown;
  checksum?: unknown;
  minCopies?: unknown;
  nodeSelector?: unknown;
  diskSelector?: unknown;
}

export function checkBackingImageName(name: unknown, field = 'name'): string {
  if (typeof name !== 'string' || !BACKING_IMAGE_NAME.test(name)) {
    throw invalid(`backing image name must be 1-63 characters of [a-z0-9._-] starting with a letter or digit (got ${JSON.stringify(name)})`, field);
  }
  return name;
}

function checkSource(input: BackingImageInput): BackingImageSource {
  const given = (['url', 'upload', 'fromVolume', 'fromBackup'] as const).filter((k) => input[k] !== undefined && input[k] !== null && input[k] !== false);
  if (given.length !== 1) {
    throw invalid(`give exactly one source: url (download), upload, fromVolume with snapshot (export), or fromBackup (restore)${given.length > 1 ? ` (got ${given.join(', ')})` : ''}`, 'source');
  }
  if (input.snapshot !== undefined && given[0] !== 'fromVolume') throw invalid('snapshot goes with fromVolume', 'snapshot');
  switch (given[0]) {
    case 'url': {
      const text = input.url;
      if (typeof text !== 'string' || text.length > MAX_URL_CHARS) throw invalid(`url must be an http:// or https:// URL of at most ${MAX_URL_CHARS} characters`, 'url');
      let url: URL;
      try {
        url = new URL(text);
      } catch {
        throw invalid(`url ${JSON.stringify(text)} is not a URL (expected http(s)://HOST/PATH)`, 'url');
      }
      if (url.protocol !== 'http:' && url.protocol !== 'https:') throw invalid(`url ${JSON.stringify(text)}: only http:// and https:// are downloaded`, 'url');
      if (url.hostname === '') throw invalid(`url ${JSON.stringify(text)} names no host`, 'url');
      return { type: 'download', url: url.href };
    }
    case 'upload':
      if (input.upload !== true) throw invalid('upload must be true (the bytes are sent afterwards)', 'upload');
      return { type: 'upload' };
    case 'fromVolume': {
      if (typeof input.fromVolume !== 'string' || !BACKING_IMAGE_NAME.test(input.fromVolume)) throw invalid(`fromVolume must be a volume name (got ${JSON.stringify(input.fromVolume)})`, 'fromVolume');
      if (typeof input.snapshot !== 'string' || !SNAPSHOT_NAME.test(input.snapshot)) throw invalid('an image exported from a volume is taken from one of its snapshots: give snapshot', 'snapshot');
      return { type: 'export-from-volume', volume: input.fromVolume, snapshot: input.snapshot };
    }
    case 'fromBackup':
      if (typeof input.fromBackup !== 'string' || !SNAPSHOT_NAME.test(input.fromBackup)) throw invalid(`fromBackup must be a backup name (got ${JSON.stringify(input.fromBackup)})`, 'fromBackup');
      return { type: 'restore', backup: input.fromBackup };
  }
}

function nameList(value: unknown, field: string): string[] {
  if (value === undefined || value === null) return [];
  if (!Array.isArray(value) || value.some((v) => typeof v !== 'string' || v.length === 0 || v.length > 253)) throw invalid(`${field} must be a list of names`, field);
  return [...new Set(value as string[])].sort();
}

/** A full spec from a user's input, or EINVAL naming the field at fault. */
export function validateBackingImage(input: BackingImageInput): BackingImageSpec {
  const source = checkSource(input);
  let expectedChecksum: string | null = null;
  if (input.checksum !== undefined && input.checksum !== null) {
    if (typeof input.checksum !== 'string' || !CHECKSUM.test(input.checksum.toLowerCase())) throw invalid('checksum must be a SHA-512 in hex (128 characters)', 'checksum');
    expectedChecksum = input.checksum.toLowerCase();
  }
  const minCopies = input.minCopies ?? 2;
  if (typeof minCopies !== 'number' || !Number.isInteger(minCopies) || minCopies < 1 || minCopies > MAX_MIN_COPIES) {
    throw invalid(`minCopies must be a whole number from 1 to ${MAX_MIN_COPIES} (got ${JSON.stringify(input.minCopies)})`, 'minCopies');
  }
  return { source, expectedChecksum, minCopies, nodeSelector: nameList(input.nodeSelector, 'nodeSelector'), diskSelector: nameList(input.diskSelector, 'diskSelector') };
}

/** A disk as the controller sees it for an image. */
export interface DiskForImage {
  name: string;
  nodeId: string;
  /** The disk is ready and its node is up. */
  usable: boolean;
  /** Why it is not usable (for the file's message). */
  problem: string | null;
  allowScheduling: boolean;
  availableBytes: number;
}

/**
 * Files whose disk or node is gone, not ready or down become `unknown` (with why, from when);
 * the others are as they were. A file that is unknown stays so until its agent reports it again.
 */
export function observeFiles(files: readonly BackingImageFile[], disks: readonly DiskForImage[], now: Date): BackingImageFile[] {
  const byName = new Map(disks.map((d) => [d.name, d]));
  return files.map((f) => {
    if (f.state === 'unknown' || f.state === 'cleaning') return f;
    const disk = byName.get(f.diskId);
    const problem = disk === undefined ? `disk ${f.diskId} is gone` : disk.usable ? null : disk.problem ?? `disk ${f.diskId} is not usable`;
    if (problem === null) return f;
    return { ...f, state: 'unknown' as const, message: `${problem} (the file was ${f.state})`, transitionAt: now.toISOString() };
  });
}

export type ImagePlan =
  /** Nothing to do now (the reason is for the status). */
  | { action: 'wait'; reason: string | null }
  /** The first file (no file exists or is on its way): fetch it onto `disk`. */
  | { action: 'fetch'; disk: string; from: 'source' | 'backup' }
  /** More copies: from a ready file to another disk. */
  | { action: 'copy'; from: string; to: string }
  /** Failed files next to a ready one: removed, so that their disks can get a good copy. */
  | { action: 'clean'; disks: string[]; reason: string }
  /** Every file is lost: remove them (`cleanup`), then fetch again (when `from` is not null). */
  | { action: 'refetch'; cleanup: string[]; from: 'source' | 'backup' | null; reason: string };

export interface PlanInput {
  spec: BackingImageSpec;
  files: readonly BackingImageFile[];
  disks: readonly DiskForImage[];
  /** The image's size when known (a disk needs that much free space), else 0. */
  sizeBytes: number;
  refetch: RefetchStatus;
  /** A copy of the image is kept in the backup target (it can be restored from there). */
  hasBackup: boolean;
  /** How long a file may be unknown before it counts as lost. */
  recoveryWaitSeconds: number;
  /**
   * The node whose disks a fetch from the source may go to (the manager's, for sources whose
   * bytes pass through it: upload, export, restore); absent or null: any.
   */
  fetchNode?: string | null;
  /**
   * Disks a volume's replica (not failed) needs the image on: they come before the `minCopies`
   * spread, and a failed file there is not removed while the replica may still read it.
   */
  neededOn?: readonly string[];
  now: Date;
}

/** Where the image's bytes can be fetched from once no file is ready; null with why when nowhere. */
export function refetchSource(source: BackingImageSource, hasBackup: boolean): { from: 'source' | 'backup' | null; why: string | null } {
  // A URL and a backup can be read again; an upload is gone once received, and a volume's
  // snapshot may be gone or changed: those come back only from the image's own backup.
  if (source.type === 'download' || source.type === 'restore') return { from: 'source', why: null };
  if (hasBackup) return { from: 'backup', why: null };
  const what = source.type === 'upload' ? 'uploaded' : `exported from snapshot ${source.snapshot} of volume ${source.volume}`;
  return { from: null, why: `the image was ${what} and no copy of it is kept in the backup target (zebu backing-image backup NAME keeps one)` };
}

/** The wait before fetch attempt `attempts + 1` after `attempts` failed. */
export function refetchWaitMs(attempts: number): number {
  return Math.min(REFETCH_MAX_WAIT_MS, REFETCH_FIRST_WAIT_MS * 2 ** Math.max(0, attempts - 1));
}

function candidateDisks(input: PlanInput, taken: Set<string>): DiskForImage[] {
  const { spec, disks, sizeBytes } = input;
  const nodesWithFile = new Set(input.files.filter((f) => f.state !== 'failed' && f.state !== 'unknown').map((f) => f.nodeId));
  return disks
    .filter((d) => d.usable && d.allowScheduling && !taken.has(d.name))
    .filter((d) => spec.nodeSelector.length === 0 || spec.nodeSelector.includes(d.nodeId))
    .filter((d) => spec.diskSelector.length === 0 || spec.diskSelector.includes(d.name))
    .filter((d) => d.availableBytes >= sizeBytes)
    // Spread: disks on nodes without a file first; then by name, so the plan is stable.
    .sort((a, b) => Number(nodesWithFile.has(a.nodeId)) - Number(nodesWithFile.has(b.nodeId)) || a.name.localeCompare(b.name));
}

/** Disks a fetch from the source (or the image's backup) may go to. */
function fetchDisks(input: PlanInput, taken: Set<string>): DiskForImage[] {
  return candidateDisks(input, taken).filter((d) => input.fetchNode == null || d.nodeId === input.fetchNode);
}

/** What the controller does next for an image (one step; it asks again after each). */
export function planBackingImage(input: PlanInput): ImagePlan {
  const { files, now } = input;
  const ready = files.filter((f) => f.state === 'ready');
  const busy = files.filter((f) => f.state === 'pending' || f.state === 'starting' || f.state === 'in-progress');
  const taken = new Set(files.filter((f) => f.state !== 'cleaning').map((f) => f.diskId));

  if (ready.length > 0) {
    // A failed file a replica still reads stays until that replica is replaced (the volume
    // controller fails it); removing it under the replica would not make its data right.
    const needed = new Set(input.neededOn ?? []);
    const failed = files.filter((f) => f.state === 'failed' && !needed.has(f.diskId));
    if (failed.length > 0) return { action: 'clean', disks: failed.map((f) => f.diskId), reason: failed.map((f) => `${f.diskId}: ${f.message ?? 'failed'}`).join('; ') };
    // Copies come from a ready file, never from the source again.
    const wantedOn = (input.neededOn ?? []).filter((d) => !taken.has(d));
    const candidates = candidateDisks(input, taken);
    const target = wantedOn.find((d) => candidates.some((c) => c.name === d)) ?? (ready.length + busy.length < input.spec.minCopies ? candidates[0]?.name : undefined);
    if (target === undefined) {
      const short = input.spec.minCopies - ready.length - busy.length;
      return { action: 'wait', reason: short > 0 ? `${ready.length + busy.length} of ${input.spec.minCopies} copies: no other usable disk${input.spec.nodeSelector.length + input.spec.diskSelector.length > 0 ? ' matches the selectors' : ''} has room` : null };
    }
    const targetNode = input.disks.find((d) => d.name === target)?.nodeId;
    // From a ready file on the same node when there is one (a local copy), else any.
    const from = ready.find((f) => f.nodeId === targetNode) ?? ready[0];
    return { action: 'copy', from: from.diskId, to: target };
  }
  if (busy.length > 0) return { action: 'wait', reason: `fetching onto ${busy.map((f) => f.diskId).join(', ')}` };

  // No file ready, none on its way.
  const waitMs = input.recoveryWaitSeconds * 1000;
  const lost = files.filter((f) => f.state === 'failed' || (f.state === 'unknown' && now.getTime() - Date.parse(f.transitionAt) >= waitMs));
  const unknownYoung = files.filter((f) => f.state === 'unknown' && !lost.includes(f));
  if (unknownYoung.length > 0) {
    const first = Math.min(...unknownYoung.map((f) => Date.parse(f.transitionAt) + waitMs));
    return { action: 'wait', reason: `no ready file; ${unknownYoung.map((f) => f.diskId).join(', ')} unknown (may come back) — fetched again from ${new Date(first).toISOString()} if not` };
  }
  if (files.some((f) => f.state === 'cleaning')) return { action: 'wait', reason: 'removing lost files' };
  const { from, why } = refetchSource(input.spec.source, input.hasBackup);
  if (files.length === 0 && input.refetch.attempts === 0) {
    // The first file: from the source (an upload's comes with its bytes, through the API).
    if (input.spec.source.type === 'upload') return { action: 'wait', reason: 'waiting for the upload of the image (zebu backing-image upload NAME FILE sends it)' };
    const disk = fetchDisks(input, taken)[0];
    if (disk === undefined) return { action: 'wait', reason: `no usable disk${input.spec.nodeSelector.length + input.spec.diskSelector.length > 0 ? ' matches the selectors' : ''}${input.fetchNode != null ? ` on node ${input.fetchNode}` : ''} has room for the image` };
    return { action: 'fetch', disk: disk.name, from: 'source' };
  }
  // Every file lost (or a fetch failed before any file was ready): fetch again, with backoff.
  if (input.refetch.attempts >= REFETCH_MAX_ATTEMPTS) {
    return { action: 'wait', reason: `gave up after ${input.refetch.attempts} attempts to fetch the image again; delete and create it again, or fix the source` };
  }
  if (input.refetch.notBefore !== null && now.getTime() < Date.parse(input.refetch.notBefore)) {
    return { action: 'wait', reason: `fetching again at ${input.refetch.notBefore} (attempt ${input.refetch.attempts + 1} of ${REFETCH_MAX_ATTEMPTS})` };
  }
  const reason = files.length === 0 ? 'no file of the image is left' : `no file is ready: ${files.map((f) => `${f.diskId} ${f.state}${f.message !== null ? ` (${f.message})` : ''}`).join('; ')}`;
  if (files.length > 0) return { action: 'refetch', cleanup: files.map((f) => f.diskId), from, reason: from === null ? `${reason}; it cannot be fetched again: ${why}` : reason };
  if (from === null) return { action: 'wait', reason: `${reason}; it cannot be fetched again: ${why}` };
  const disk = fetchDisks(input, taken)[0];
  if (disk === undefined) return { action: 'wait', reason: `${reason}; no usable disk${input.fetchNode != null ? ` on node ${input.fetchNode}` : ''} has room for the image` };
  return { action: 'fetch', disk: disk.name, from };
}

/**
 * Where the replicas of a volume on this image may go: disks the image's selectors allow, those
 * holding a ready file first (no copy to wait for). `refusal` says why a disk cannot take one.
 */
export function imagePlacement(name: string, spec: BackingImageSpec, files: readonly BackingImageFile[]): { refusal: (disk: string, node: string) => string | null; preferred: Set<string> } {
  return {
    refusal: (disk, node) => {
      if (spec.nodeSelector.length > 0 && !spec.nodeSelector.includes(node)) return `disk ${disk}: node ${node} is not in backing image ${name}'s node selector`;
      if (spec.diskSelector.length > 0 && !spec.diskSelector.includes(disk)) return `disk ${disk} is not in backing image ${name}'s disk selector`;
      return null;
    },
    preferred: new Set(files.filter((f) => f.state === 'ready').map((f) => f.diskId)),
  };
}
