/**
 * Punching holes in replica data files (fallocate PUNCH_HOLE | KEEP_SIZE), so that TRIM and
 * WRITE_ZEROES give disk space back. Node has no fallocate: a small Node-API addon does the call
 * (src/replica/native/punch-hole.c, built at install time into build/punch-hole.node). Without the
 * addon, or on a file system that cannot punch holes, nothing is punched: the replica's block map
 * still makes those blocks read as zeros, the space is simply not returned.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { createRequire } from 'node:module';

interface PunchAddon {
  punchHole(fd: number, offset: number, length: number, callback: (errno: number) => void): void;
}

const ADDON_PATH = path.resolve(import.meta.dirname, '..', '..', 'build', 'punch-hole.node');

let addon: PunchAddon | null | undefined;
let unavailableReason: string | null = null;

function load(): PunchAddon | null {
  if (addon !== undefined) return addon;
  if (process.env.ZEBU_NO_HOLE_PUNCH === '1') {
    unavailableReason = 'turned off by ZEBU_NO_HOLE_PUNCH=1';
    addon = null;
  } else if (!fs.existsSync(ADDON_PATH)) {
    unavailableReason = `${ADDON_PATH} is not built (scripts/build-native.sh needs a C compiler)`;
    addon = null;
  } else {
    try {
      addon = createRequire(import.meta.url)(ADDON_PATH) as PunchAddon;
    } catch (err) {
      unavailableReason = `${ADDON_PATH} does not load: ${(err as Error).message}`;
      addon = null;
    }
  }
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
