/**
 * The data server reads its connections through a SocketReceiver (src/protocol/accepted-socket.ts):
 * large WRITE payloads go straight into their own buffers and, for a backend that keeps no
 * reference after answering (reusesWritePayloads), those buffers are reused. Many large writes
 * in flight at once, split across socket reads at every boundary, must land byte for byte; and
 * the 'data'-event path (ZEBU_NO_ONREAD_ACCEPT=1) must do the same.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { DataServer } from '../../src/protocol/server.ts';
import { DataClient } from '../../src/protocol/client.ts';
import { ioBuffers } from '../../src/protocol/buffer-pool.ts';
import { MemoryBackend } from '../frontend/memory-backend.ts';
import { pattern } from '../support/tmp.ts';

const SECRET = Buffer.from('server-receive-test-secret-01234');
const MiB = 1024 * 1024;

async function writeMany(t: { after: (fn: () => void | Promise<void>) => void }, reuse: boolean): Promise<void> {
  const backend = new MemoryBackend(64 * MiB);
  const server = new DataServer(backend, { secret: SECRET, reusesWritePayloads: reuse });
  const { port } = await server.listen('127.0.0.1', 0);
  t.after(() => server.close(100));
  const client = await DataClient.connect({ port, secret: SECRET });
  t.after(() => client.close());
  // Sizes around the direct-receive threshold, odd sizes, 4k ones between: 48 writes in flight.
  const sizes = [MiB, 64 * 1024, 4096, 64 * 1024 - 1, 3 * MiB + 17, 128 * 1024, 4096, 2 * MiB];
  const writes: { offset: number; data: Buffer }[] = [];
  let offset = 0;
  for (let i = 0; i < 48; i++) {
    const data = pattern(100 + i, sizes[i % sizes.length]);
    writes.push({ offset, data });
    offset += data.length + 4096;
  }
  await Promise.all(writes.map((w) => client.write(w.offset, w.data)));
  // Twice, so that the second round's payloads land in buffers the first round gave back.
  await Promise.all(writes.map((w, i) => client.write(w.offset, pattern(200 + i, w.data.length))));
  for (const [i, w] of writes.entries()) {
    assert.ok(backend.peek(w.offset, w.data.length).equals(pattern(200 + i, w.data.length)), `write ${i} (${w.data.length} bytes) landed whole`);
  }
  // And the connection still parses small requests after all that.
  assert.ok((await client.read(0, 4096)).equals(pattern(200, 4096)));
}

test('large and small writes in flight together land byte for byte; reused payload buffers go back to the pool', async (t) => {
  const before = ioBuffers.keptBytes;
  await writeMany(t, true);
  assert.ok(ioBuffers.keptBytes > before, 'payload buffers were given back for reuse');
});

test('the same without reuse (an engine), and over data events', async (t) => {
  await writeMany(t, false);
  process.env.ZEBU_NO_ONREAD_ACCEPT = '1';
  try {
    await writeMany(t, true);
  } finally {
    delete process.env.ZEBU_NO_ONREAD_ACCEPT;
  }
});
