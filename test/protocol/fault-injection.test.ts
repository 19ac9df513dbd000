/**
 * Disk faults seen through the data protocol. A real replica process with --fault-injection:
 * an injected write EIO / ENOSPC fails that one WRITE with the matching error (the process lives
 * on, the next write works); a failed fdatasync fails the FLUSH with EIO and poisons the replica
 * (no further reads, writes or flushes until reopened) while the process keeps answering PING;
 * after SIGTERM and a restart on the same directory, everything flushed before the fault reads
 * back. In process: Replica + FaultyDisk for read EIO, and a replica.json update that fails after
 * its rename.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { DataClient } from '../../src/protocol/client.ts';
import { DataServer } from '../../src/protocol/server.ts';
import { Replica } from '../../src/replica/replica.ts';
import { FaultyDisk } from '../../src/replica/faulty-disk.ts';
import { NodeDisk } from '../../src/replica/disk.ts';
import { ErrorCode, ZebuError } from '../../src/errors.ts';
import { pattern } from '../support/tmp.ts';
import { watchChildStart } from '../support/child-ready.ts';

const ZEBU_MAIN = fileURLToPath(new URL('../../src/cli/main.ts', import.meta.url));
const SECRET = Buffer.from('fault-injection-test-secret-0123');
const SIZE = 16 * 1024 * 1024;
const MiB = 1024 * 1024;

type After = { after: (fn: () => void | Promise<void>) => void };

interface Workspace {
  root: string;
  /** Runs when the test ends, before the directory is removed (last registered, first run). */
  defer(fn: () => unknown): void;
}

/** A temporary directory; at the end of the test the deferred clean-ups run, then it is removed. */
function workspace(t: After): Workspace {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'zebu-fault-'));
  const deferred: (() => unknown)[] = [];
  t.after(async () => {
    for (const fn of deferred.reverse()) {
      try {
        await fn();
      } catch {
        // clean-up of a failed test
      }
    }
    fs.rmSync(root, { recursive: true, force: true, maxRetries: 3 });
  });
  return { root, defer: (fn) => deferred.push(fn) };
}

interface Running {
  port: number;
  ready: Record<string, unknown>;
  child: ReturnType<typeof spawn>;
  /** Resolves with the exit code or signal. */
  exited: Promise<number | string>;
  stderr: () => string;
}

/** `zebu replica serve --fault-injection` on `dir`; SIGKILLed when the test ends if still running. */
async function serve(ws: Workspace, dir: string, secretFile: string): Promise<Running> {
  const child = spawn(
    process.execPath,
    [ZEBU_MAIN, 'replica', 'serve', '--dir', dir, '--size', String(SIZE), '--listen', '127.0.0.1:0', '--secret-file', secretFile, '--fault-injection'],
    { stdio: ['ignore', 'pipe', 'pipe'] },
  );
  const start = watchChildStart(child, 'replica', 15_000, 100_000);
  const { exited, stderr } = start;
  ws.defer(async () => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
    await exited;
  });
  const ready = await start.ready;
  return { port: ready.port as number, ready, child, exited, stderr };
}

function hasCode(code: string): (err: unknown) => boolean {
  return (err: unknown) => {
    assert.equal((err as { code?: string }).code, code, `expected ${code}, got ${String((err as Error).message)}`);
    return true;
  };
}

function withTimeout<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  return Promise.race([
    p,
    new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`${what}: not done after ${ms} ms`)), ms);
    }),
  ]).finally(() => clearTimeout(timer));
}

test('replica process: injected EIO/ENOSPC fail one request; a failed sync poisons until restart; flushed data survives', async (t) => {
  const ws = workspace(t);
  const root = ws.root;
  const secretFile = path.join(root, 'secret');
  fs.writeFileSync(secretFile, SECRET.toString() + '\n', { mode: 0o600 });
  const dir = path.join(root, 'replica');
  const first = await serve(ws, dir, secretFile);
  const client = await DataClient.connect({ port: first.port, secret: SECRET, requestTimeoutMs: 5000 });
  ws.defer(() => client.close());

  const A = pattern(1, 64 * 1024 + 4096);
  const B = pattern(2, 128 * 1024);
  const C = pattern(3, 3 * 4096 + 100);
  const D = pattern(4, 32 * 1024);
  await client.write(0, A);
  await client.flush();

  await t.test('write EIO: that WRITE fails with ZEBU_ERR_EIO, the next one succeeds', async () => {
    // Data files only: a failed write-intent record poisons the replica (intent-log.test.ts).
    await client.injectFaults({ rules: [{ op: 'write', errno: 'EIO', count: 1, pathIncludes: '.data' }] });
    await assert.rejects(client.write(MiB, B), hasCode(ErrorCode.EIO));
    await client.ping();
    assert.equal(first.child.exitCode, null, 'process alive');
    assert.ok(!client.closed, 'connection still open');
    await client.write(MiB, B);
    assert.ok((await client.read(MiB, B.length)).equals(B));
    assert.ok((await client.read(0, A.length)).equals(A), 'other data untouched');
  });

  await t.test('write ENOSPC: that WRITE fails with ZEBU_ERR_ENOSPC, the next one succeeds', async () => {
    await client.injectFaults({ rules: [{ op: 'write', errno: 'ENOSPC', count: 1, pathIncludes: '.data' }] });
    // Unaligned: the write merges partial blocks; the failure must leave the old contents.
    await assert.rejects(client.write(2 * MiB + 100, C), hasCode(ErrorCode.ENOSPC));
    assert.ok((await client.read(2 * MiB, 4 * 4096)).equals(Buffer.alloc(4 * 4096)), 'the failed write left the range as it was');
    await client.write(2 * MiB + 100, C);
    assert.ok((await client.read(2 * MiB + 100, C.length)).equals(C));
    // A FUA write whose data write fails.
    await client.injectFaults({ rules: [{ op: 'write', errno: 'ENOSPC', count: 1, pathIncludes: '.data' }] });
    await assert.rejects(client.write(5 * MiB, pattern(9, 4096), { fua: true }), hasCode(ErrorCode.ENOSPC));
    await client.ping();
  });

  await t.test('read EIO: that READ fails with ZEBU_ERR_EIO, the next one succeeds', async () => {
    await client.injectFaults({ rules: [{ op: 'read', errno: 'EIO', count: 1 }] });
    await assert.rejects(client.read(0, A.length), hasCode(ErrorCode.EIO));
    assert.ok((await client.read(0, A.length)).equals(A));
  });

  await t.test('a failed OPEN (replica.json update fails): EIO, the epoch is not adopted, a retry works', async () => {
    await client.injectFaults({ rules: [{ op: 'meta', errno: 'EIO', pathIncludes: 'replica.json', count: 1 }] });
    const opener = await DataClient.connect({ port: first.port, secret: SECRET, epoch: 2 });
    await assert.rejects(opener.open(), hasCode(ErrorCode.EIO));
    assert.equal((await client.info()).epoch, 0, 'epoch not adopted');
    await client.write(4 * MiB, pattern(10, 4096)); // epoch 0 still serves
    assert.equal((await opener.open()).epoch, 2);
    opener.close();
    client.epoch = 2;
    await client.flush();
  });

  await t.test('sync EIO: FLUSH fails with EIO, then the replica refuses I/O; the process lives and answers PING', async () => {
    await client.write(3 * MiB, D); // not flushed: the flush below has work to sync
    await client.injectFaults({ rules: [{ op: 'sync', errno: 'EIO', count: 1 }] });
    await assert.rejects(client.flush(), hasCode(ErrorCode.EIO));
    // Poisoned: the rule has fired its one failure, yet nothing is accepted any more.
    await assert.rejects(client.write(6 * MiB, pattern(11, 4096)), hasCode(ErrorCode.EIO));
    await assert.rejects(client.write(6 * MiB, pattern(11, 4096), { fua: true }), hasCode(ErrorCode.EIO));
    await assert.rejects(client.flush(), hasCode(ErrorCode.EIO));
    await assert.rejects(client.trim(0, 4096), hasCode(ErrorCode.EIO));
    await assert.rejects(client.read(0, 4096), hasCode(ErrorCode.EIO));
    await assert.rejects(client.snapshotCreate('after-failure'), hasCode(ErrorCode.EIO));
    // Clearing the rules does not un-poison it: only a reopen does.
    await client.injectFaults({ clear: true });
    await assert.rejects(client.write(6 * MiB, pattern(11, 4096)), hasCode(ErrorCode.EIO));
    await assert.rejects(client.flush(), hasCode(ErrorCode.EIO));
    await client.ping();
    assert.equal((await client.info()).sizeBytes, SIZE);
    const other = await DataClient.connect({ port: first.port, secret: SECRET, epoch: 2 });
    await other.ping();
    await assert.rejects(other.write(0, pattern(12, 4096)), hasCode(ErrorCode.EIO));
    other.close();
    await new Promise((r) => setTimeout(r, 100));
    assert.equal(first.child.exitCode, null, `process alive: ${first.stderr()}`);
  });

  await t.test('SIGTERM and restart on the same directory: the replica opens, flushed data intact', async () => {
    client.close();
    first.child.kill('SIGTERM');
    await withTimeout(first.exited, 10_000, 'SIGTERM of the poisoned replica');
    const second = await serve(ws, dir, secretFile);
    assert.equal(second.ready.cleanShutdown, false, 'a replica that could not flush did not shut down clean');
    assert.equal(second.ready.epoch, 2);
    const c2 = await DataClient.connect({ port: second.port, secret: SECRET, epoch: 2 });
    ws.defer(() => c2.close());
    assert.ok((await c2.read(0, A.length)).equals(A), 'A (flushed before the faults) intact');
    assert.ok((await c2.read(MiB, B.length)).equals(B), 'B (flushed before the sync fault) intact');
    assert.ok((await c2.read(2 * MiB + 100, C.length)).equals(C), 'C (flushed before the sync fault) intact');
    assert.ok((await c2.read(4 * MiB, 4096)).equals(pattern(10, 4096)));
    const d = await c2.read(3 * MiB, D.length);
    assert.ok(d.equals(D) || d.equals(Buffer.alloc(D.length)), 'D (never flushed) is all new or all old');
    // It works again.
    await c2.write(6 * MiB, pattern(13, 8192));
    await c2.flush();
    assert.ok((await c2.read(6 * MiB, 8192)).equals(pattern(13, 8192)));
    second.child.kill('SIGTERM');
    assert.equal(await withTimeout(second.exited, 10_000, 'SIGTERM of the healthy replica'), 0);
  });
});

test('in process: Replica + FaultyDisk, read EIO fails that read only', async (t) => {
  const ws = workspace(t);
  const dir = path.join(ws.root, 'replica');
  const disk = new FaultyDisk(new NodeDisk());
  const replica = await Replica.create(dir, { sizeBytes: 4 * MiB, disk });
  ws.defer(() => replica.close());
  const data = pattern(21, 64 * 1024);
  await replica.write(8192, data);
  await replica.flush();
  const out = Buffer.alloc(data.length);

  disk.addRule({ op: 'read', errno: 'EIO', count: 1 });
  await assert.rejects(replica.read(8192, data.length, out), (err) => err instanceof ZebuError && err.code === ErrorCode.EIO);
  await replica.read(8192, data.length, out);
  assert.ok(out.equals(data), 'the next read succeeds');

  // afterOps: the second matching read fails, the first and third do not.
  disk.addRule({ op: 'read', errno: 'EIO', afterOps: 1, count: 1, pathIncludes: '.data' });
  await replica.read(8192, data.length, out);
  await assert.rejects(replica.read(8192, data.length, out), (err) => err instanceof ZebuError && err.code === ErrorCode.EIO);
  await replica.read(8192, data.length, out);
  assert.ok(out.equals(data));

  // A read fault does not poison: writes and flushes go on.
  disk.addRule({ op: 'read', errno: 'EIO', count: 1 });
  await assert.rejects(replica.read(8192, 4096, out), (err) => err instanceof ZebuError && err.code === ErrorCode.EIO);
  await replica.write(0, pattern(22, 4096));
  await replica.flush();
  disk.clearRules();

  // And through the protocol server: the client gets ZEBU_ERR_EIO for that READ only.
  const server = new DataServer(replica, { secret: SECRET, faultDisk: disk });
  const { port } = await server.listen('127.0.0.1', 0);
  ws.defer(() => server.close(100));
  const client = await DataClient.connect({ port, secret: SECRET });
  ws.defer(() => client.close());
  await client.injectFaults({ rules: [{ op: 'read', errno: 'EIO', count: 1 }] });
  await assert.rejects(client.read(8192, data.length), hasCode(ErrorCode.EIO));
  assert.ok((await client.read(8192, data.length)).equals(data));
  assert.ok((await client.read(0, 4096)).equals(pattern(22, 4096)));

  // A server without a fault disk refuses FAULT_INJECT.
  const plain = new DataServer(replica, { secret: SECRET });
  const plainAddr = await plain.listen('127.0.0.1', 0);
  ws.defer(() => plain.close(100));
  const c2 = await DataClient.connect({ port: plainAddr.port, secret: SECRET });
  ws.defer(() => c2.close());
  await assert.rejects(c2.injectFaults({ rules: [{ op: 'read', errno: 'EIO' }] }), hasCode(ErrorCode.UNSUPPORTED));
  assert.ok((await c2.read(8192, data.length)).equals(data), 'no rule was added');
});

test('in process: a sync failure poisons the Replica; reopened, the flushed data is intact', async (t) => {
  const ws = workspace(t);
  const dir = path.join(ws.root, 'replica');
  const disk = new FaultyDisk(new NodeDisk());
  const replica = await Replica.create(dir, { sizeBytes: 4 * MiB, disk });
  const flushed = pattern(31, 40 * 1024);
  await replica.write(4096, flushed);
  await replica.flush();
  await replica.write(MiB, pattern(32, 8192));
  disk.addRule({ op: 'sync', errno: 'ENOSPC', count: 1 });
  await assert.rejects(replica.flush(), (err) => err instanceof ZebuError && err.code === ErrorCode.ENOSPC);
  await assert.rejects(replica.write(0, pattern(33, 4096)), (err) => err instanceof ZebuError && err.code === ErrorCode.ENOSPC);
  await assert.rejects(replica.read(4096, 4096, Buffer.alloc(4096)), (err) => err instanceof ZebuError);
  await replica.close();
  const reopened = await Replica.open(dir);
  ws.defer(() => reopened.close());
  assert.equal(reopened.info().cleanShutdown, false);
  const out = Buffer.alloc(flushed.length);
  await reopened.read(4096, flushed.length, out);
  assert.ok(out.equals(flushed));
});

/** NodeDisk whose next replica.json update fails after the rename (an fsync of the directory failing with EIO). */
class FailAfterRenameDisk extends NodeDisk {
  armed = false;
  override async writeFileAtomic(filePath: string, data: Buffer): Promise<void> {
    await super.writeFileAtomic(filePath, data);
    if (this.armed) {
      this.armed = false;
      const err: NodeJS.ErrnoException = new Error(`EIO: fsync of the directory of ${filePath} failed (simulated)`);
      err.code = 'EIO';
      throw err;
    }
  }
}

test(
  'in process: a snapshot revert whose replica.json update fails after the rename loses no acknowledged flush',
  async (t) => {
    const ws = workspace(t);
  const dir = path.join(ws.root, 'replica');
    const disk = new FailAfterRenameDisk();
    const replica = await Replica.create(dir, { sizeBytes: 4 * MiB, disk });
    await replica.write(0, pattern(41, 4096));
    await replica.snapshotCreate('s1');
    await replica.write(0, pattern(42, 4096));
    await replica.flush();
    disk.armed = true;
    await assert.rejects(replica.snapshotRevert('s1'), /EIO/);
    // Either the replica refuses to go on (poisoned until reopened), or whatever it acknowledges
    // as flushed from here on must still be there after a reopen.
    const after = pattern(43, 4096);
    let acknowledged = false;
    try {
      await replica.write(4096, after);
      await replica.flush();
      acknowledged = true;
    } catch (err) {
      assert.ok(err instanceof ZebuError, String(err));
    }
    const view = Buffer.alloc(8192);
    if (acknowledged) await replica.read(0, 8192, view);
    await replica.close().catch(() => {});
    const reopened = await Replica.open(dir);
    ws.defer(() => reopened.close());
    const out = Buffer.alloc(8192);
    await reopened.read(0, 8192, out);
    if (acknowledged) {
      assert.ok(out.subarray(4096).equals(after), 'a write flushed after the failed revert is still there after reopen');
      assert.ok(out.equals(view), 'the volume reads after reopen as it did before the close');
    }
  },
);
