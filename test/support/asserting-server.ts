/**
 * A data-protocol server whose backend breaks an invariant on every WRITE (tests only): it shows
 * what an assertion failure does in a real process. Usage:
 *   node asserting-server.ts PORT_FILE
 * Listens on 127.0.0.1 (any port, written to PORT_FILE), prints {"ready":true} and serves with
 * the secret of 32 bytes of 7.
 */
import fs from 'node:fs';
import { DataServer } from '../../src/protocol/server.ts';
import { assert } from '../../src/errors.ts';
import type { BlockBackend } from '../../src/protocol/backend.ts';

const [portFile] = process.argv.slice(2);
const backend = {
  sizeBytes: 1024 * 1024,
  epoch: 0,
  async checkEpoch() {},
  info: () => ({ sizeBytes: 1024 * 1024 }),
  async read(_offset: number, length: number, out: Buffer, outOffset: number) {
    out.fill(0, outOffset, outOffset + length);
  },
  async write() {
    assert(false, 'a planted broken invariant (test)');
  },
  async zero() {},
  async flush() {},
  async blockStatus() {
    return [];
  },
  async snapshotCreate() {
    throw new Error('no');
  },
  snapshotList: () => [],
  async snapshotDelete() {},
  async snapshotRevert() {},
} as unknown as BlockBackend;

const server = new DataServer(backend, { secret: Buffer.alloc(32, 7) });
const address = await server.listen('127.0.0.1', 0);
fs.writeFileSync(portFile, String(address.port));
process.stdout.write(JSON.stringify({ ready: true, pid: process.pid }) + '\n');
process.on('SIGTERM', () => process.exit(0));
