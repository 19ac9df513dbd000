/**
 * The one table from error codes to what other protocols say: the HTTP status of the REST API
 * and of the engine's and frontend's control sockets, and the errno an NBD client gets. Beside
 * the catalogue (errors.ts), so that a new code cannot be added without deciding both — the
 * table is checked complete by its type.
 */
import { ErrorCode } from './errors.ts';

/** The errnos the NBD protocol carries (the numbers are Linux's). */
export const Errno = {
  EPERM: 1,
  EIO: 5,
  ENOMEM: 12,
  EINVAL: 22,
  ENOSPC: 28,
  EOVERFLOW: 75,
  ENOTSUP: 95,
  ESHUTDOWN: 108,
} as const;
export type Errno = (typeof Errno)[keyof typeof Errno];

interface Mapping {
  http: number;
  errno: Errno;
}

const TABLE: Record<ErrorCode, Mapping> = {
  ZEBU_ERR_EIO: { http: 500, errno: Errno.EIO },
  ZEBU_ERR_ENOSPC: { http: 507, errno: Errno.ENOSPC },
  ZEBU_ERR_EINVAL: { http: 400, errno: Errno.EINVAL },
  ZEBU_ERR_NOT_FOUND: { http: 404, errno: Errno.EIO },
  // A newer engine owns the volume: the request conflicts with who holds it now.
  ZEBU_ERR_FENCED: { http: 409, errno: Errno.EIO },
  ZEBU_ERR_LEASE_REVOKED: { http: 409, errno: Errno.EIO },
  ZEBU_ERR_EXISTS: { http: 409, errno: Errno.EIO },
  ZEBU_ERR_BUSY: { http: 409, errno: Errno.EIO },
  ZEBU_ERR_UNSUPPORTED: { http: 501, errno: Errno.ENOTSUP },
  // A process behind the one asked spoke wrongly, or refused our credentials: a bad gateway, not
  // the caller's fault (the caller's own credential is UNAUTHORIZED).
  ZEBU_ERR_PROTOCOL: { http: 502, errno: Errno.EIO },
  ZEBU_ERR_AUTH: { http: 502, errno: Errno.EIO },
  ZEBU_ERR_WRONG_REPLICA: { http: 502, errno: Errno.EIO },
  ZEBU_ERR_SOURCE_FAILED: { http: 502, errno: Errno.EIO },
  // Unavailable for now: worth a retry.
  ZEBU_ERR_TIMEOUT: { http: 503, errno: Errno.EIO },
  ZEBU_ERR_DISCONNECTED: { http: 503, errno: Errno.EIO },
  ZEBU_ERR_CLOSED: { http: 503, errno: Errno.ESHUTDOWN },
  ZEBU_ERR_CONFLICT: { http: 409, errno: Errno.EIO },
  ZEBU_ERR_COMPACTED: { http: 410, errno: Errno.EIO },
  ZEBU_ERR_UNAUTHORIZED: { http: 401, errno: Errno.EPERM },
  ZEBU_ERR_FORBIDDEN: { http: 403, errno: Errno.EPERM },
};

export function httpStatusFor(code: ErrorCode): number {
  return TABLE[code]?.http ?? 500;
}

export function errnoFor(code: ErrorCode): Errno {
  return TABLE[code]?.errno ?? Errno.EIO;
}
