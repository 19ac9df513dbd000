/**
 * A volume as a Linux block device without a kernel NBD driver: nbdfuse exposes the NBD export as
 * a file, losetup makes a loop device of it. For file systems on volumes (root and /dev/fuse).
 */
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { run, mustRun } from './volume-cluster.ts';
import { waitFor } from './zebu-up.ts';

export interface VolumeLoop {
  /** The loop device, e.g. /dev/loop3. */
  loop: string;
  /** An empty directory to mount it on. */
  mnt: string;
  /** Unmounts (if mounted), detaches the loop device and stops nbdfuse; safe to call twice. */
  close(): void;
}

/** nbdfuse + losetup for the export at `uri`, with its files under `work`. */
export async function loopOnVolume(uri: string, work: string): Promise<VolumeLoop> {
  const fuseDir = path.join(work, 'fuse');
  const mnt = path.join(work, 'mnt');
  fs.mkdirSync(fuseDir);
  fs.mkdirSync(mnt);
  const fuse = spawn('nbdfuse', [path.join(fuseDir, 'disk'), uri], { stdio: 'ignore' });
  let loop = '';
  const close = (): void => {
    run('umount', [mnt]);
    if (loop !== '') run('losetup', ['-d', loop]);
    loop = '';
    run('fusermount3', ['-u', path.join(fuseDir, 'disk')]);
    run('fusermount3', ['-u', fuseDir]);
    fuse.kill('SIGTERM');
  };
  try {
    await waitFor('the nbdfuse file', () => fs.existsSync(path.join(fuseDir, 'disk')), 10_000, 50);
    loop = mustRun('losetup', ['-f', '--show', path.join(fuseDir, 'disk')]).trim();
  } catch (err) {
    close();
    throw err;
  }
  return { loop, mnt, close };
}
