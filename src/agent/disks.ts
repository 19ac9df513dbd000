/**
 * A node's disks: directories that hold replica directories. Each disk carries an identity file
 * (zebu-disk.json, with a UUID) so that the agent recognises the same disk after a restart and
 * notices when a path now points at a different (or an empty, unmounted) file system.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';

export const DISK_ID_FILE = 'zebu-disk.json';

export interface DiskProbe {
  uuid: string | null;
  storageMaximumBytes: number;
  storageAvailableBytes: number;
  ready: boolean;
  message: string | null;
}

/** Prepares a disk directory on first use: creates it and its identity file. */
export function initDisk(diskPath: string): string {
  fs.mkdirSync(path.join(diskPath, 'replicas'), { recursive: true });
  const idFile = path.join(diskPath, DISK_ID_FILE);
  try {
    return (JSON.parse(fs.readFileSync(idFile, 'utf8')) as { uuid: string }).uuid;
  } catch {
    const uuid = crypto.randomUUID();
    const tmp = `${idFile}.tmp`;
    fs.writeFileSync(tmp, JSON.stringify({ uuid, createdAt: new Date().toISOString() }) + '\n');
    fs.renameSync(tmp, idFile);
    return uuid;
  }
}

/** Capacity and health of a disk; `expectedUuid` (from the store) must match its identity file. */
export function probeDisk(diskPath: string, expectedUuid: string | null): DiskProbe {
  let uuid: string | null = null;
  try {
    uuid = (JSON.parse(fs.readFileSync(path.join(diskPath, DISK_ID_FILE), 'utf8')) as { uuid: string }).uuid;
  } catch (err) {
    return { uuid: null, storageMaximumBytes: 0, storageAvailableBytes: 0, ready: false, message: `identity file unreadable: ${(err as Error).message}` };
  }
  try {
    const st = fs.statfsSync(diskPath);
    const maximum = st.blocks * st.bsize;
    const available = st.bavail * st.bsize;
    if (expectedUuid !== null && uuid !== expectedUuid) {
      return { uuid, storageMaximumBytes: maximum, storageAvailableBytes: available, ready: false, message: `disk identity changed (expected ${expectedUuid}, found ${uuid}): a different file system is mounted here?` };
    }
    return { uuid, storageMaximumBytes: maximum, storageAvailableBytes: available, ready: true, message: null };
  } catch (err) {
    return { uuid, storageMaximumBytes: 0, storageAvailableBytes: 0, ready: false, message: `statfs failed: ${(err as Error).message}` };
  }
}
