/**
 * Input checks shared by every Store implementation, so that the embedded store and etcd accept
 * and refuse exactly the same things, with the same messages.
 */
import { ErrorCode, ZebuError, invalid } from '../errors.ts';
import { STORE_KEY_PART, type WriteGuard } from './store.ts';

/** Largest value a store accepts, measured as UTF-8 JSON text. */
export const MAX_VALUE_BYTES = 1024 * 1024;
/** Nesting deeper than this is refused (it is a bug, and deep recursion would overflow the stack). */
export const MAX_VALUE_DEPTH = 100;
/** Lease TTL bounds: under a second a lease cannot be kept alive reliably; over a day is a leak. */
export const LEASE_TTL_MS_MIN = 1000;
export const LEASE_TTL_MS_MAX = 24 * 60 * 60 * 1000;

/** A kind or a name: a string matching STORE_KEY_PART. */
export function checkKeyPart(value: unknown, field: 'kind' | 'name'): string {
  if (typeof value !== 'string' || !STORE_KEY_PART.test(value)) {
    throw invalid(
      `${field} ${describe(value)} is not valid: 1-253 characters of [A-Za-z0-9._-], first a letter or digit`,
      field,
    );
  }
  return value;
}

/** A revision named by a caller: an integer >= min (resourceVersion: 1, afterRevision: 0). */
export function checkRevision(value: unknown, field: string, min: number): number {
  if (typeof value !== 'number' || !Number.isSafeInteger(value) || value < min) {
    throw invalid(`${field} ${describe(value)} is not valid: an integer >= ${min}`, field);
  }
  return value;
}

export function checkLeaseTtl(ttlMs: unknown): number {
  if (typeof ttlMs !== 'number' || !Number.isSafeInteger(ttlMs) || ttlMs < LEASE_TTL_MS_MIN || ttlMs > LEASE_TTL_MS_MAX) {
    throw invalid(
      `ttlMs ${describe(ttlMs)} is not valid: an integer from ${LEASE_TTL_MS_MIN} to ${LEASE_TTL_MS_MAX} ms`,
      'ttlMs',
    );
  }
  return ttlMs;
}

export function checkLeaseId(leaseId: unknown): string {
  if (typeof leaseId !== 'string' || leaseId.length === 0 || leaseId.length > 64) {
    throw invalid(`leaseId ${describe(leaseId)} is not valid: a lease id from grantLease`, 'leaseId');
  }
  return leaseId;
}

/**
 * The value as JSON text, refusing anything JSON would silently change: undefined (except as an
 * object property, which JSON omits: the reader sees the property absent, as TypeScript's optional
 * properties mean), functions, symbols, bigints, NaN and infinities, cycles, and objects that are
 * not plain (a Date would come back as a string).
 */
export function serializeValue(value: unknown): string {
  checkJson(value, 'value', [], 0);
  const text = JSON.stringify(value);
  const sizeBytes = Buffer.byteLength(text, 'utf8');
  if (sizeBytes > MAX_VALUE_BYTES) {
    throw invalid(`value is ${sizeBytes} bytes as JSON; the store holds at most ${MAX_VALUE_BYTES}`, 'value');
  }
  return text;
}

function checkJson(value: unknown, path: string, ancestors: object[], depth: number): void {
  switch (typeof value) {
    case 'string':
    case 'boolean':
      return;
    case 'number':
      if (!Number.isFinite(value)) throw invalid(`${path} is ${value}, which JSON cannot hold`, 'value');
      return;
    case 'object': {
      if (value === null) return;
      if (depth >= MAX_VALUE_DEPTH) throw invalid(`${path} is nested more than ${MAX_VALUE_DEPTH} levels deep`, 'value');
      if (ancestors.includes(value)) throw invalid(`${path} refers back to itself (a cycle), which JSON cannot hold`, 'value');
      const proto: unknown = Object.getPrototypeOf(value);
      const isArray = Array.isArray(value);
      if (!isArray && proto !== Object.prototype && proto !== null) {
        const className = (value as { constructor?: { name?: string } }).constructor?.name ?? 'object';
        throw invalid(`${path} is a ${className}, not a plain object or array`, 'value');
      }
      ancestors.push(value);
      if (isArray) {
        for (let i = 0; i < value.length; i++) {
          if (value[i] === undefined) throw invalid(`${path}[${i}] is undefined, which JSON cannot hold`, 'value');
          checkJson(value[i], `${path}[${i}]`, ancestors, depth + 1);
        }
      } else {
        for (const [key, item] of Object.entries(value)) {
          if (item !== undefined) checkJson(item, `${path}.${key}`, ancestors, depth + 1);
        }
      }
      ancestors.pop();
      return;
    }
    default:
      throw invalid(`${path} is ${typeof value === 'undefined' ? 'undefined' : `a ${typeof value}`}, which JSON cannot hold`, 'value');
  }
}

function describe(value: unknown): string {
  if (typeof value === 'string') return JSON.stringify(value.length > 40 ? `${value.slice(0, 40)}...` : value);
  if (typeof value === 'number' || typeof value === 'boolean' || value == null) return String(value);
  return `(a ${typeof value})`;
}

/** A write's guard, checked (null when there is none). */
export function checkGuard(guard: WriteGuard | undefined): WriteGuard | null {
  if (guard === undefined) return null;
  checkKeyPart(guard?.kind, 'kind');
  checkKeyPart(guard.name, 'name');
  checkRevision(guard.createdRevision, 'guard.createdRevision', 1);
  return guard;
}

/** The error of a write whose guard does not hold. */
export function fencedBy(guard: WriteGuard): ZebuError {
  return new ZebuError(ErrorCode.FENCED, `refused: ${guard.kind} ${guard.name} of revision ${guard.createdRevision} is gone (the writer's term is over)`);
}
