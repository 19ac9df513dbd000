/**
 * The one catalogue of Zebu errors. Every error that crosses a process boundary has a stable
 * string code and a stable wire number; numbers are never reused for a different meaning.
 */

export const ErrorCode = {
  EIO: 'ZEBU_ERR_EIO',
  ENOSPC: 'ZEBU_ERR_ENOSPC',
  EINVAL: 'ZEBU_ERR_EINVAL',
  NOT_FOUND: 'ZEBU_ERR_NOT_FOUND',
  FENCED: 'ZEBU_ERR_FENCED',
  LEASE_REVOKED: 'ZEBU_ERR_LEASE_REVOKED',
  EXISTS: 'ZEBU_ERR_EXISTS',
  BUSY: 'ZEBU_ERR_BUSY',
  UNSUPPORTED: 'ZEBU_ERR_UNSUPPORTED',
  PROTOCOL: 'ZEBU_ERR_PROTOCOL',
  AUTH: 'ZEBU_ERR_AUTH',
  TIMEOUT: 'ZEBU_ERR_TIMEOUT',
  DISCONNECTED: 'ZEBU_ERR_DISCONNECTED',
  CLOSED: 'ZEBU_ERR_CLOSED',
  /** Optimistic concurrency: the object changed since it was read (its resource version differs). */
  CONFLICT: 'ZEBU_ERR_CONFLICT',
  /** A watch asked for history the store no longer keeps: list again, then watch. */
  COMPACTED: 'ZEBU_ERR_COMPACTED',
  /** The caller did not present a valid credential (API token). */
  UNAUTHORIZED: 'ZEBU_ERR_UNAUTHORIZED',
  /** The process at an address is not the replica asked for (a stale address, a reused port). */
  WRONG_REPLICA: 'ZEBU_ERR_WRONG_REPLICA',
  /** A rebuild target could not read the source replica it was told to copy from (COPY_FROM). */
  SOURCE_FAILED: 'ZEBU_ERR_SOURCE_FAILED',
  /** A valid credential that does not allow this (the read-only API token asking for a change). */
  FORBIDDEN: 'ZEBU_ERR_FORBIDDEN',
} as const;
export type ErrorCode = (typeof ErrorCode)[keyof typeof ErrorCode];

/** Wire numbers of the data protocol. 0 is success. Never renumber. */
const wireByCode: Record<ErrorCode, number> = {
  ZEBU_ERR_EIO: 1,
  ZEBU_ERR_ENOSPC: 2,
  ZEBU_ERR_EINVAL: 3,
  ZEBU_ERR_NOT_FOUND: 4,
  ZEBU_ERR_FENCED: 5,
  ZEBU_ERR_LEASE_REVOKED: 6,
  ZEBU_ERR_EXISTS: 7,
  ZEBU_ERR_BUSY: 8,
  ZEBU_ERR_UNSUPPORTED: 9,
  ZEBU_ERR_PROTOCOL: 10,
  ZEBU_ERR_AUTH: 11,
  ZEBU_ERR_TIMEOUT: 12,
  ZEBU_ERR_DISCONNECTED: 13,
  ZEBU_ERR_CLOSED: 14,
  ZEBU_ERR_CONFLICT: 15,
  ZEBU_ERR_COMPACTED: 16,
  ZEBU_ERR_UNAUTHORIZED: 17,
  ZEBU_ERR_WRONG_REPLICA: 18,
  ZEBU_ERR_SOURCE_FAILED: 19,
  ZEBU_ERR_FORBIDDEN: 20,
};
const codeByWire = new Map<number, ErrorCode>(
  Object.entries(wireByCode).map(([code, wire]) => [wire, code as ErrorCode]),
);

export class ZebuError extends Error {
  readonly code: ErrorCode;
  /** For invalid input: the request field at fault ("sizeBytes", "numberOfReplicas"). */
  readonly field: string | undefined;
  constructor(code: ErrorCode, message: string, options?: { cause?: unknown; field?: string }) {
    super(message, options);
    this.name = 'ZebuError';
    this.code = code;
    this.field = options?.field;
  }
}

export function errorToWire(code: ErrorCode): number {
  return wireByCode[code];
}

export function errorFromWire(wire: number): ErrorCode {
  return codeByWire.get(wire) ?? ErrorCode.EIO;
}

/** Map any thrown value (a Node system error included) onto a ZebuError. */
export function toZebuError(err: unknown): ZebuError {
  if (err instanceof ZebuError) return err;
  const errno = (err as { code?: unknown } | null)?.code;
  const message = err instanceof Error ? err.message : String(err);
  if (errno === 'ENOSPC' || errno === 'EDQUOT') return new ZebuError(ErrorCode.ENOSPC, message, { cause: err });
  if (errno === 'ENOENT') return new ZebuError(ErrorCode.NOT_FOUND, message, { cause: err });
  return new ZebuError(ErrorCode.EIO, message, { cause: err });
}

export function invalid(message: string, field?: string): ZebuError {
  return new ZebuError(ErrorCode.EINVAL, message, { field });
}

/** A broken invariant: a bug. Never an error reply — the process stops (see assert). */
export class AssertionFailure extends Error {
  override readonly name = 'AssertionFailure';
}

/**
 * What happens when an assertion fails, besides the throw: by default the process dies on the
 * next tick (an uncaught exception, whatever catches the throw meanwhile), so its supervisor
 * restarts it and the bug is seen instead of becoming an EIO that a client retries. The simulator
 * installs its own: it records the failure and fails the run.
 */
let assertionFailed: (err: AssertionFailure) => void = (err) => {
  process.nextTick(() => {
    throw err;
  });
};

/** Replaces what an assertion failure does (the simulator; returns the previous handler). */
export function onAssertionFailure(handler: (err: AssertionFailure) => void): (err: AssertionFailure) => void {
  const previous = assertionFailed;
  assertionFailed = handler;
  return previous;
}

/** Invariant check for the data path: a failure is a bug, and it must be loud. */
export function assert(condition: unknown, message: string): asserts condition {
  if (!condition) {
    const err = new AssertionFailure(`assertion failed: ${message}`);
    assertionFailed(err);
    throw err;
  }
}
