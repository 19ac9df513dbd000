/**
 * The JavaScript side of Zebu's small Node-API addon (src/replica/native/file-ops.c, built at
 * install time into build/file-ops.node), for the two file operations Node's fs lacks:
 * - punching holes in replica data files (fallocate PUNCH_HOLE | KEEP_SIZE), so that TRIM and
 *   WRITE_ZEROES give disk space back. Without the addon, or on a file system that cannot, nothing
 *   is punched: the replica's block map still makes those blocks read as zeros.
 * - reads served from the page cache on the event loop (preadv2 RWF_NOWAIT), falling back to the
 *   thread pool when the data is not cached. Without the addon every read takes the pool.
 */
import os from 'node:os';
import { loadAddon } from '../os/native-addon.ts';

interface FileOpsAddon {
  punchHole(fd: number, offset: number, length: number, callback: (errno: number) => void): void;
  readCached(fd: number, buffer: Buffer, offset: number, length: number, position: number): number;
}

let addon: FileOpsAddon | null | undefined;
let unavailableReason: string | null = null;

function load(): FileOpsAddon | null {
  if (addon === undefined) ({ addon, reason: unavailableReason } = loadAddon<FileOpsAddon>('file-ops'));
  return addon;
}

/** Why holes are not punched on this machine; null when they are (the addon loaded). */
export function holePunchUnavailable(): string | null {
  load();
  return unavailableReason;
}

const errnoNames = new Map<number, string>(Object.entries(os.constants.errno).map(([name, n]) => [n, name]));

/** Errors that say "this file system cannot", not "this disk failed". */
const UNSUPPORTED = new Set(['EOPNOTSUPP', 'ENOTSUP', 'ENOSYS']);

/**
 * Punches a hole in the open file `fd`: the range reads as zeros and holds no blocks; the size
 * stays. Resolves true when punched, false when this machine or file system cannot (nothing
 * changed); rejects with a Node-style error (code EIO, …) when the disk fails.
 */
export function punchHole(fd: number, filePath: string, offset: number, length: number): Promise<boolean> {
  const native = load();
  if (native === null || length <= 0) return Promise.resolve(false);
  return new Promise((resolve, reject) => {
    native.punchHole(fd, offset, length, (errno) => {
      if (errno === 0) return resolve(true);
      const code = errnoNames.get(errno) ?? `errno ${errno}`;
      if (UNSUPPORTED.has(code)) return resolve(false);
      const err = new Error(`${code}: fallocate(PUNCH_HOLE) of ${length} bytes at ${offset} in ${filePath} failed`) as NodeJS.ErrnoException;
      err.code = code;
      err.errno = -errno;
      err.syscall = 'fallocate';
      reject(err);
    });
  });
}

let cachedReadsWork = true;

/** -EAGAIN: not (all) in the page cache. */
const EAGAIN = os.constants.errno.EAGAIN;

/**
 * Reads what the page cache holds of the range, on the calling thread, never waiting for the
 * disk: bytes read (0 when none of it is cached, or at end of file), or -1 when this machine has
 * no addon. An error other than "not cached" is thrown as a Node-style error.
 */
export function readCached(fd: number, filePath: string, buf: Buffer, bufOffset: number, length: number, position: number): number {
  const native = load();
  if (native === null || !cachedReadsWork) return -1;
  const n = native.readCached(fd, buf, bufOffset, length, position);
  if (n >= 0) return n;
  if (-n === EAGAIN) return 0;
  const code = errnoNames.get(-n) ?? `errno ${-n}`;
  // A kernel or file system without RWF_NOWAIT: the pool does every read from now on.
  if (UNSUPPORTED.has(code)) {
    cachedReadsWork = false;
    return -1;
  }
  const err = new Error(`${code}: read of ${length} bytes at ${position} in ${filePath} failed`) as NodeJS.ErrnoException;
  err.code = code;
  err.errno = n;
  err.syscall = 'preadv2';
  throw err;
}
