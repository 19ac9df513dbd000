/**
 * The engine's reports (start-up recovery, verify) in the manager's terms. The engine names
 * replicas by their key — the manager's replica name, given as `NAME=HOST:PORT` — or, for a
 * replica given without a key, by its address; the manager shows replica names. Reports are
 * checked field by field: an engine of another version must not put garbage into the store.
 */
import type { RecoveryView, VerifyDifference, VerifyView } from './object-types.ts';

/** Replica name -> HOST:PORT, as in an Engine's spec. */
export type ReplicaAddresses = Record<string, string>;

/** The replica name for what the engine calls it: a key, "KEY=HOST:PORT" or an address. */
export function replicaNameOf(engineName: string, replicas: ReplicaAddresses): string {
  if (engineName in replicas) return engineName;
  const eq = engineName.indexOf('=');
  if (eq > 0) return engineName.slice(0, eq);
  for (const [name, address] of Object.entries(replicas)) if (address === engineName) return name;
  return engineName;
}

function num(value: unknown): number {
  return typeof value === 'number' && Number.isFinite(value) && value >= 0 ? value : 0;
}

/** A list of replicas as the engine gives it: keys or addresses, or objects {key?, address}. */
function names(value: unknown, replicas: ReplicaAddresses): string[] {
  if (!Array.isArray(value)) return [];
  const out: string[] = [];
  for (const x of value) {
    if (typeof x === 'string') out.push(replicaNameOf(x, replicas));
    else if (x !== null && typeof x === 'object') {
      const o = x as { key?: unknown; address?: unknown };
      const id = typeof o.key === 'string' ? o.key : typeof o.address === 'string' ? o.address : null;
      if (id !== null) out.push(replicaNameOf(id, replicas));
    }
  }
  return out;
}

function time(value: unknown, fallback: string): string {
  if (typeof value === 'string' && !Number.isNaN(Date.parse(value))) return new Date(value).toISOString();
  if (typeof value === 'number' && Number.isFinite(value)) return new Date(value).toISOString();
  return fallback;
}

/** The engine's `recovery` info; null when it reports none. */
export function recoveryFromEngine(raw: unknown, replicas: ReplicaAddresses, now = new Date().toISOString()): RecoveryView | null {
  if (raw === null || typeof raw !== 'object') return null;
  const r = raw as Record<string, unknown>;
  return {
    at: time(r.at, now),
    clean: r.clean === true,
    source: typeof r.source === 'string' ? replicaNameOf(r.source, replicas) : null,
    // An engine from before the compare reports no checkedRegions: it copied every region it checked.
    checkedRegions: typeof r.checkedRegions === 'number' ? num(r.checkedRegions) : num(r.regions),
    regions: num(r.regions),
    bytes: num(r.bytes),
    durationMs: num(r.durationMs),
    deltaReplicas: names(r.deltaReplicas, replicas),
    erredReplicas: names(r.erredReplicas, replicas),
  };
}

/** The engine's verify answer (POST /v1/verify, or `lastVerify` of its info); null when it is not one. */
export function verifyFromEngine(raw: unknown, replicas: ReplicaAddresses, repair: boolean | null, now = new Date().toISOString()): VerifyView | null {
  if (raw === null || typeof raw !== 'object') return null;
  const r = raw as Record<string, unknown>;
  if (typeof r.regions !== 'number') return null;
  const differing: VerifyDifference[] = [];
  for (const d of Array.isArray(r.differing) ? r.differing : []) {
    if (d === null || typeof d !== 'object') continue;
    const x = d as Record<string, unknown>;
    const hashes: Record<string, string> = {};
    if (x.hashes !== null && typeof x.hashes === 'object') {
      for (const [key, hash] of Object.entries(x.hashes as Record<string, unknown>)) hashes[replicaNameOf(key, replicas)] = String(hash);
    }
    differing.push({ region: num(x.region), offset: num(x.offset), length: num(x.length), hashes });
  }
  // `repaired`: a count, a list of regions, or a flag for "all the differing ones".
  const repairedRaw = r.repaired;
  const repaired = Array.isArray(repairedRaw) ? repairedRaw.length : repairedRaw === true ? differing.length : num(repairedRaw);
  return {
    at: time(r.at, now),
    repair: repair ?? (r.repair === true || repaired > 0),
    regions: num(r.regions),
    replicas: names(r.replicas, replicas),
    differing,
    repaired: Math.min(repaired, differing.length),
    durationMs: num(r.durationMs),
  };
}

/** Differing regions a verify left as they were. */
export function unrepairedRegions(report: VerifyView): number {
  return Math.max(0, report.differing.length - report.repaired);
}
