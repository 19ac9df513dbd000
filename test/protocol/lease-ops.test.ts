/**
 * Rebuild leases at the target replica, over the wire: COPY_WRITE and COPY_ZERO with a lease id,
 * LEASE_REVOKE, LEASE_REVOKED for a revoked id (and only for it), a revoke waiting for the copy
 * writes of its lease in flight, a new epoch forgetting the old one's revokes, bad arguments, and
 * UNSUPPORTED from a backend that takes no copies.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Replica } from '../../src/replica/replica.ts';
import { DataServer } from '../../src/protocol/server.ts';
import { DataClient } from '../../src/protocol/client.ts';
import { Op } from '../../src/protocol/frames.ts';
import { ErrorCode } from '../../src/errors.ts';
import { CopyLeases } from '../../src/replica/copy-leases.ts';
import { MemoryBackend } from '../frontend/memory-backend.ts';
import { pattern } from '../support/tmp.ts';
import { assertInvariantFails, rejectsWith } from '../support/assertions.ts';

const SIZE = 8 * 1024 * 1024;
const secret = Buffer.from('zebu-test-secret-0123456789abcdef');

/** A replica served on a free port (answering INFO with `name`, when given). */
async function served(t: { after: (fn: () => Promise<void>) => void }, name?: string): Promise<{ replica: Replica; port: number }> {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'zebu-lease-ops-'));
  const replica = await Replica.create(path.join(root, 'r'), { sizeBytes: SIZE });
  const server = new DataServer(replica, { secret, ...(name !== undefined ? { identity: { name } } : {}) });
  const { port } = await server.listen('127.0.0.1', 0);
  t.after(async () => {
    await server.close();
    await replica.close().catch(() => {});
    fs.rmSync(root, { recursive: true, force: true });
  });
  return { replica, port };
}

async function connect(t: { after: (fn: () => Promise<void>) => void }, port: number, epoch: number): Promise<DataClient> {
  const client = await DataClient.connect({ port, secret, epoch });
  t.after(async () => client.close());
  return client;
}

test('copy writes land under a live lease; a revoked lease gets LEASE_REVOKED and changes nothing; other leases go on', async (t) => {
  const { port } = await served(t);
  const engine = await connect(t, port, 3);
  await engine.open();
  const copier = await connect(t, port, 3);
  const a = pattern(1, 64 * 1024);
  await copier.copyWrite(7, 0, a, a.length);
  assert.deepEqual(await engine.read(0, a.length), a);
  await engine.write(65536, pattern(9, 4096));
  await copier.copyWrite(7, 65536, null, 4096);
  assert.deepEqual(await engine.read(65536, 4096), Buffer.alloc(4096), 'COPY_ZERO reads back as zeros');

  await engine.leaseRevoke(7);
  const newer = pattern(5, 4096);
  await engine.write(0, newer);
  await assert.rejects(copier.copyWrite(7, 0, pattern(2, 4096), 4096), rejectsWith(ErrorCode.LEASE_REVOKED, /lease 7 was revoked/));
  await assert.rejects(copier.copyWrite(7, 0, null, 4096), rejectsWith(ErrorCode.LEASE_REVOKED));
  assert.deepEqual(await engine.read(0, 4096), newer, 'the client write is not overwritten by the late copy');
  await copier.copyWrite(8, 4096, pattern(3, 4096), 4096);
  assert.deepEqual(await engine.read(4096, 4096), pattern(3, 4096), 'a lease not revoked still copies');
});

test('a revoke is answered only after the copy writes of its lease in flight have landed', async (t) => {
  const { replica, port } = await served(t);
  const engine = await connect(t, port, 1);
  await engine.open();
  const big = pattern(4, 4 * 1024 * 1024);
  const before = replica.info().revision;
  // On one connection the copy write is taken in before the revoke: the revoke must wait for it
  // (the replies may come in either order; when the revoke's comes, the copy has landed).
  const copy = engine.copyWrite(11, 0, big, big.length);
  const revisionAtRevoke = await engine.leaseRevoke(11).then(() => replica.info().revision);
  await copy;
  assert.equal(revisionAtRevoke, before + 1, 'the copy write had landed when the revoke was answered');
  assert.deepEqual(await engine.read(0, big.length), big);
  await assert.rejects(engine.copyWrite(11, 0, null, 4096), rejectsWith(ErrorCode.LEASE_REVOKED));
  assert.equal(replica.info().epoch, 1);
});

test('a new epoch starts with no lease revoked; the old epoch is fenced; bad arguments are refused', async (t) => {
  const { port } = await served(t);
  const old = await connect(t, port, 1);
  await old.open();
  await old.leaseRevoke(5);
  await assert.rejects(old.copyWrite(5, 0, pattern(1, 4096), 4096), rejectsWith(ErrorCode.LEASE_REVOKED));
  const next = await connect(t, port, 2);
  await next.open();
  await next.copyWrite(5, 0, pattern(1, 4096), 4096);
  await assert.rejects(old.copyWrite(6, 0, pattern(1, 4096), 4096), rejectsWith(ErrorCode.FENCED));

  await assert.rejects(next.request(Op.COPY_WRITE, 0, 0, 4096, Buffer.alloc(4)), rejectsWith(ErrorCode.EINVAL, /8-byte lease id/));
  const shortData = Buffer.alloc(8 + 100);
  shortData[7] = 1; // lease 1
  await assert.rejects(next.request(Op.COPY_WRITE, 0, 0, 4096, shortData), rejectsWith(ErrorCode.EINVAL, /differs from its data length/));
  await assert.rejects(next.request(Op.COPY_ZERO, 0, 0, 4096, Buffer.alloc(8)), rejectsWith(ErrorCode.EINVAL, /bad lease id/));
  const longLease = Buffer.alloc(16);
  longLease[7] = 1;
  await assert.rejects(next.request(Op.COPY_ZERO, 0, 0, 4096, longLease), rejectsWith(ErrorCode.EINVAL, /lease id only/));
  await assert.rejects(next.request(Op.LEASE_REVOKE, 0, 0, 0), rejectsWith(ErrorCode.EINVAL, /bad lease id/));
  await assert.rejects(next.copyWrite(9, SIZE, pattern(1, 4096), 4096), rejectsWith(ErrorCode.EINVAL, /beyond the end/));
  // The connection still serves after every refusal.
  await next.copyWrite(9, 0, null, 4096);
});

test('a backend that takes no copies answers UNSUPPORTED', async (t) => {
  const backend = new MemoryBackend(SIZE);
  const server = new DataServer(backend, { secret });
  const { port } = await server.listen('127.0.0.1', 0);
  t.after(() => server.close());
  const client = await connect(t, port, 1);
  await assert.rejects(client.copyWrite(1, 0, pattern(1, 4096), 4096), rejectsWith(ErrorCode.UNSUPPORTED));
  await assert.rejects(client.leaseRevoke(1), rejectsWith(ErrorCode.UNSUPPORTED));
});

test('CopyLeases: revoke waits for every copy write of its lease; an older epoch is a bug', async () => {
  const leases = new CopyLeases();
  leases.begin(1, 3);
  leases.begin(1, 3);
  let revoked = false;
  const done = leases.revoke(1, 3).then(() => (revoked = true));
  await Promise.resolve();
  assert.equal(revoked, false);
  leases.end(3);
  await Promise.resolve();
  assert.equal(revoked, false, 'one copy write is still in flight');
  leases.end(3);
  await done;
  assert.equal(revoked, true);
  assert.throws(() => leases.begin(1, 3), rejectsWith(ErrorCode.LEASE_REVOKED));
  leases.begin(2, 3);
  leases.end(3);
  assertInvariantFails(() => leases.begin(1, 4), /epochs only go up/);
});

test('COPY_FROM: the target pulls a chunk from the source replica itself, under the lease; zeros marked; a revoked lease, a wrong or dead source, bad arguments refused', async (t) => {
  const source = await served(t, 'src');
  const target = await served(t, 'dst');
  const toSource = await connect(t, source.port, 4);
  await toSource.open();
  const engine = await connect(t, target.port, 4);
  await engine.open();
  const data = pattern(3, 256 * 1024);
  await toSource.write(512 * 1024, data);
  const at = `127.0.0.1:${source.port}`;

  // Pulled: the target holds the source's bytes; nothing passed through this client.
  await engine.copyFrom(11, at, 'src', 512 * 1024, data.length, false);
  assert.deepEqual(await engine.read(512 * 1024, data.length), data);
  // A chunk of zeros over data on the target: with `zeros` it is marked zero.
  await engine.write(0, pattern(8, 65536));
  await engine.copyFrom(11, at, null, 0, 65536, true);
  assert.deepEqual(await engine.read(0, 65536), Buffer.alloc(65536));
  // Not in the target's write-intent log: the maps say what is left to copy.
  assert.deepEqual(target.replica.intentGet().active, [0], 'only the client write of region 0 is active');

  // From a snapshot of the source (a full rebuild's snapshot layers): its bytes, not the live ones.
  await toSource.snapshotCreate('s1');
  await toSource.write(512 * 1024, pattern(9, 4096));
  await engine.copyFrom(11, at, 'src', 512 * 1024, 8192, false, 's1');
  assert.deepEqual(await engine.read(512 * 1024, 8192), data.subarray(0, 8192));
  await assert.rejects(engine.copyFrom(11, at, 'src', 0, 4096, false, 'no-such'), rejectsWith(ErrorCode.SOURCE_FAILED));
  await assert.rejects(engine.request(Op.COPY_FROM, 0, 0, 4096, Buffer.concat([Buffer.from([0, 0, 0, 0, 0, 0, 0, 11]), Buffer.from(JSON.stringify({ source: at, snapshot: 7 }))])), rejectsWith(ErrorCode.EINVAL, /snapshot must be/));
  await toSource.write(512 * 1024, data.subarray(0, 4096));

  // A revoked lease: refused, nothing written.
  await engine.leaseRevoke(11);
  await toSource.write(512 * 1024, pattern(4, 4096));
  await assert.rejects(engine.copyFrom(11, at, 'src', 512 * 1024, 4096, false), rejectsWith(ErrorCode.LEASE_REVOKED));
  assert.deepEqual(await engine.read(512 * 1024, 4096), data.subarray(0, 4096));

  // The wrong replica at the address, or none: SOURCE_FAILED (the target itself is fine).
  await assert.rejects(engine.copyFrom(12, at, 'someone-else', 0, 4096, false), rejectsWith(ErrorCode.SOURCE_FAILED, /is replica src, not someone-else/));
  await assert.rejects(engine.copyFrom(12, '127.0.0.1:1', null, 0, 4096, false), rejectsWith(ErrorCode.SOURCE_FAILED, /rebuild source 127\.0\.0\.1:1/));
  // Bad arguments: EINVAL, and the connection goes on.
  const lease = Buffer.alloc(8);
  lease.writeUInt32BE(12, 4);
  const bad = (json: string) => Buffer.concat([lease, Buffer.from(json)]);
  await assert.rejects(engine.request(Op.COPY_FROM, 0, 0, 4096, bad('{}')), rejectsWith(ErrorCode.EINVAL, /COPY_FROM takes/));
  await assert.rejects(engine.request(Op.COPY_FROM, 0, 0, 4096, bad('{"source":"no port"}')), rejectsWith(ErrorCode.EINVAL, /bad source address/));
  await assert.rejects(engine.request(Op.COPY_FROM, 0, 0, 4096, bad('{"source":"h:1","zeros":"yes"}')), rejectsWith(ErrorCode.EINVAL));
  await assert.rejects(engine.request(Op.COPY_FROM, 0, 0, 4096, Buffer.from([1, 2])), rejectsWith(ErrorCode.EINVAL));
  await assert.rejects(engine.copyFrom(12, at, null, SIZE, 4096, false), rejectsWith(ErrorCode.EINVAL));
  // A backend that takes no copies.
  const plain = new DataServer(new MemoryBackend(SIZE), { secret });
  const { port } = await plain.listen('127.0.0.1', 0);
  t.after(() => plain.close());
  const toPlain = await connect(t, port, 0);
  await assert.rejects(toPlain.copyFrom(1, at, null, 0, 4096, false), rejectsWith(ErrorCode.UNSUPPORTED));
  await engine.ping();
});
