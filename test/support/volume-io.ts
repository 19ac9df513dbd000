/**
 * A volume's bytes in and out through real NBD clients: nbdcopy reads the whole export into a
 * file; writes at an offset go through nbdkit's offset filter over the export (its nbd plugin is
 * the client), then a flush.
 */
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { run, mustRun } from './volume-cluster.ts';

/** Writes `data` at `offset` of the export `uri`; `dir` holds the temporary file. */
export function writeAt(dir: string, uri: string, offset: number, data: Buffer): void {
  const file = path.join(dir, `chunk-${crypto.randomBytes(4).toString('hex')}`);
  fs.writeFileSync(file, data);
  try {
    const r = run('nbdcopy', ['--flush', file, '--', '[', 'nbdkit', '--exit-with-parent', '--filter=offset', 'nbd', `uri=${uri}`, `offset=${offset}`, `range=${data.length}`, ']'], { timeoutMs: 300_000 });
    assert.equal(r.status, 0, r.stderr);
  } finally {
    fs.rmSync(file, { force: true });
  }
}

/** The whole export `uri`, read with nbdcopy. */
export function readVolume(dir: string, uri: string): Buffer {
  const file = path.join(dir, `image-${crypto.randomBytes(4).toString('hex')}`);
  try {
    mustRun('nbdcopy', [uri, file], { timeoutMs: 300_000 });
    return fs.readFileSync(file);
  } finally {
    fs.rmSync(file, { force: true });
  }
}
