/**
 * The data path's buffer pool and the client's socket receiver: buffers are reused, never handed
 * out twice, and a large reply read straight into its buffer arrives intact however the stream
 * is cut.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import crypto from 'node:crypto';
import { BufferPool, LentBuffer, POOLED_MIN_BYTES } from '../../src/protocol/buffer-pool.ts';
import { SocketReceiver } from '../../src/protocol/socket-receiver.ts';
import { assertInvariantFails } from '../support/assertions.ts';

test('buffer pool: released buffers are reused by size, kept up to the cap, a double release fails loudly', () => {
  const size = 2 * 1024 * 1024;
  const pool = new BufferPool(3 * size);
  const a = pool.acquire(size);
  const b = pool.acquire(size);
  assert.notEqual(a, b);
  pool.release(a);
  assert.equal(pool.keptBytes, size);
  assertInvariantFails(() => pool.release(a), /released twice/);
  const c = pool.acquire(size);
  assert.equal(c, a, 'a kept buffer of the same size is handed out again');
  assert.ok(pool.lends(c) && pool.lends(b), 'handed out and not released: lent');
  assert.ok(!pool.lends(Buffer.alloc(size)), 'a buffer the pool never handed out is not lent');
  assert.equal(pool.keptBytes, 0);
  // Another size is a new buffer; small ones are not kept at all.
  const d = pool.acquire(size + 16);
  assert.equal(d.length, size + 16);
  const small = pool.acquire(POOLED_MIN_BYTES - 1);
  pool.release(small);
  assert.equal(pool.keptBytes, 0);
  // A buffer the pool did not hand out is ignored.
  pool.release(Buffer.alloc(size));
  assert.equal(pool.keptBytes, 0);
  // Over the cap, the size kept longest makes room.
  pool.release(b);
  pool.release(c);
  pool.release(d);
  assert.equal(pool.keptBytes, 3 * size + 16 - size);
  const e = pool.acquire(size + 16);
  assert.equal(e, d);
});

test('socket receiver: a large payload arrives intact through staged bytes and direct reads, cut anywhere', async (t) => {
  const payload = crypto.randomBytes(3 * 1024 * 1024 + 123);
  const header = Buffer.alloc(8);
  header.writeUInt32BE(payload.length, 0);
  header.writeUInt32BE(0xabcdef01, 4);
  const trailer = Buffer.from('next-frame');
  const stream = Buffer.concat([header, payload, trailer]);
  const server = net.createServer((socket) => {
    // Odd-sized pieces with pauses, so the receiver sees partial headers, staged payload bytes
    // and direct reads of every length.
    let at = 0;
    const sizes = [3, 5, 70_000, 1, 65_536, 999_999, 17];
    let i = 0;
    const next = (): void => {
      if (at >= stream.length) return void socket.end();
      const n = Math.min(sizes[i++ % sizes.length], stream.length - at);
      socket.write(stream.subarray(at, at + n), () => setTimeout(next, i % 3 === 0 ? 2 : 0));
      at += n;
    };
    next();
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  t.after(() => server.close());
  const receiver = new SocketReceiver();
  const socket = net.createConnection({ port: (server.address() as net.AddressInfo).port, host: '127.0.0.1', onread: receiver.onread });
  t.after(() => socket.destroy());
  const got = await new Promise<{ body: Buffer; tail: Buffer }>((resolve, reject) => {
    let body: Buffer | null = null;
    receiver.onStaged = () => {
      if (body === null) {
        const h = receiver.reader.take(8);
        if (h === null) return;
        assert.equal(h.readUInt32BE(4), 0xabcdef01);
        const dest = Buffer.alloc(h.readUInt32BE(0) + 10);
        body = dest;
        receiver.receiveInto(dest, 10, h.readUInt32BE(0), () => {});
      }
      if (receiver.receiving) return;
      const tail = receiver.reader.take(trailer.length);
      if (tail !== null) resolve({ body: body.subarray(10), tail });
    };
    socket.on('error', reject);
  });
  assert.ok(got.body.equals(payload), 'payload bytes differ');
  assert.equal(got.tail.toString(), 'next-frame');
});

test('lent buffer: given back only when the owner and every holder let go, in any order; letting go once too often fails loudly', () => {
  const size = POOLED_MIN_BYTES;
  const pool = new BufferPool(4 * size);
  const buf = pool.acquire(size);
  const loan = new LentBuffer(pool, buf);
  const first = loan.hold();
  const second = loan.hold();
  loan.letGo(); // the owner (its answer) goes first
  first();
  assert.ok(pool.lends(buf), 'still held by a connection');
  assert.equal(pool.keptBytes, 0);
  second();
  assert.ok(!pool.lends(buf));
  assert.equal(pool.keptBytes, size, 'given back once the last holder let go');
  assertInvariantFails(() => second(), /let go more often/);
});

test('buffer pool clear: kept buffers are let go, buffers handed out can still be released and kept again', () => {
  const size = POOLED_MIN_BYTES;
  const pool = new BufferPool(8 * size);
  const kept = [pool.acquire(size), pool.acquire(2 * size)];
  const out = pool.acquire(size);
  for (const buf of kept) pool.release(buf);
  assert.equal(pool.keptBytes, 3 * size);
  pool.clear();
  assert.equal(pool.keptBytes, 0);
  const fresh = pool.acquire(size);
  assert.ok(!kept.includes(fresh), 'a cleared buffer is never handed out again');
  pool.release(kept[0]); // a cleared buffer is no longer the pool's: ignored, not a double release
  assert.equal(pool.keptBytes, 0);
  pool.release(out);
  assert.equal(pool.keptBytes, size, 'a buffer handed out before the clear is kept when released');
  pool.release(fresh);
  assert.equal(pool.keptBytes, 2 * size);
});
