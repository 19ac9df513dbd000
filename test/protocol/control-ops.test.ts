/**
 * The ops that volume expansion and rebuilds use, against a real replica process: EXPAND,
 * SET_REBUILDING and SET_REVISION. Each is fenced by the epoch like data I/O, refuses bad
 * arguments with EINVAL on a connection that keeps working, and its effect survives a SIGKILL.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { DataClient } from '../../src/protocol/client.ts';
import { Op } from '../../src/protocol/frames.ts';
import { ErrorCode, ZebuError } from '../../src/errors.ts';
import { startReplica, writeSecret, type ReplicaProcess } from '../support/replica-process.ts';
import { tempDir, pattern } from '../support/tmp.ts';

const MiB = 1024 * 1024;
const OLD = 16 * MiB;
const NEW = 48 * MiB;

function rejectsWith(code: ErrorCode, pattern: RegExp): (err: unknown) => boolean {
  return (err) => {
    assert.ok(err instanceof ZebuError, String(err));
    assert.equal(err.code, code, err.message);
    assert.match(err.message, pattern);
    return true;
  };
}

test('EXPAND, SET_REBUILDING, SET_REVISION over the protocol: fenced, validated, durable', async (t) => {
  const root = tempDir(t);
  const { file: secretFile, secret } = writeSecret(root);
  const dir = path.join(root, 'replica');
  const running: ReplicaProcess[] = [];
  t.after(() => {
    for (const r of running) r.child.kill('SIGKILL');
  });
  const start = async (sizeBytes: number): Promise<ReplicaProcess> => {
    const r = await startReplica({ dir, sizeBytes, secretFile });
    running.push(r);
    return r;
  };
  const restart = async (r: ReplicaProcess, sizeBytes: number): Promise<ReplicaProcess> => {
    r.child.kill('SIGKILL');
    await r.exited;
    return start(sizeBytes);
  };

  let proc = await start(OLD);
  let client = await DataClient.connect({ port: proc.port, secret, epoch: 2 });
  await client.open();
  await client.write(0, pattern(1, MiB));
  await client.write(OLD - 4096, pattern(2, 4096));

  // A stale engine cannot grow the replica.
  const stale = await DataClient.connect({ port: proc.port, secret, epoch: 1 });
  await assert.rejects(stale.expand(NEW), rejectsWith(ErrorCode.FENCED, /epoch/));
  await assert.rejects(stale.setRebuilding('full'), rejectsWith(ErrorCode.FENCED, /epoch/));
  await assert.rejects(stale.setRevision(99), rejectsWith(ErrorCode.FENCED, /epoch/));
  stale.close();
  assert.equal((await client.info()).sizeBytes, OLD);

  // Bad arguments: EINVAL, and the connection goes on.
  await assert.rejects(client.expand(OLD - 4096), rejectsWith(ErrorCode.EINVAL, /cannot shrink/));
  await assert.rejects(client.expand(NEW + 1), rejectsWith(ErrorCode.EINVAL, /multiple of 4096/));
  await assert.rejects(client.request(Op.SET_REBUILDING, 0, 3, 0), rejectsWith(ErrorCode.EINVAL, /takes 0 \(none\), 1 \(full\) or 2 \(delta\)/));
  await assert.rejects(client.request(Op.EXPAND, 0, 0, 0), rejectsWith(ErrorCode.EINVAL, /positive/));
  assert.deepEqual(await client.read(0, MiB), pattern(1, MiB));

  // EXPAND: reads beyond the old end are zeros; writes there work; durable without a clean stop.
  const grown = await client.expand(NEW);
  assert.equal(grown.sizeBytes, NEW);
  assert.ok((await client.read(OLD, NEW - OLD)).every((b) => b === 0));
  await client.write(NEW - MiB, pattern(3, MiB));
  await client.flush();
  await assert.rejects(client.read(NEW - 4096, 8192), rejectsWith(ErrorCode.EINVAL, /beyond the end/));
  client.close();
  // Restarted with the old --size: the replica is larger, which is a shrink and refused...
  proc.child.kill('SIGKILL');
  await proc.exited;
  await assert.rejects(start(OLD), /cannot shrink/);
  // ...and with the new size it opens as it was.
  proc = await start(NEW);
  client = await DataClient.connect({ port: proc.port, secret, epoch: 2 });
  assert.equal((await client.open()).sizeBytes, NEW);
  assert.deepEqual(await client.read(0, MiB), pattern(1, MiB));
  assert.deepEqual(await client.read(OLD - 4096, 4096), pattern(2, 4096));
  assert.deepEqual(await client.read(NEW - MiB, MiB), pattern(3, MiB));

  // SET_REBUILDING: durable at once (no flush needed); cleared durably too.
  assert.equal((await client.setRebuilding('full')).rebuildKind, 'full');
  assert.equal((await client.setRebuilding('delta')).rebuildKind, 'delta');
  assert.equal((await client.setRebuilding('delta')).rebuilding, true, 'idempotent');
  client.close();
  proc = await restart(proc, NEW);
  client = await DataClient.connect({ port: proc.port, secret, epoch: 2 });
  const marked = await client.open();
  assert.equal(marked.rebuilding, true);
  assert.equal(marked.rebuildKind, 'delta', 'the kind survives a restart');

  // SET_REVISION: the counters become the source's, durably.
  await client.write(MiB, pattern(4, 4096));
  const taken = await client.setRevision(5000);
  assert.equal(taken.revision, 5000);
  assert.equal(taken.flushedRevision, 5000);
  assert.equal((await client.setRebuilding(null)).rebuilding, false);
  client.close();
  proc = await restart(proc, NEW);
  client = await DataClient.connect({ port: proc.port, secret, epoch: 2 });
  const info = await client.open();
  assert.equal(info.rebuilding, false);
  assert.equal(info.revision, 5000);
  assert.equal(info.flushedRevision, 5000);
  assert.deepEqual(await client.read(MiB, 4096), pattern(4, 4096));
  client.close();
});
