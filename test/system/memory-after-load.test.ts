/**
 * A data-path process gives back what a load made it take. A replica receives every large write
 * payload into a buffer of its I/O pool and keeps that buffer for the next write of the same size;
 * after a load of QEMU-sized (32 MiB) writes, once it has been quiet, it must empty the pool,
 * collect and trim, so it is no larger than before the load — and without the native memory addon
 * (no trim), still give the 32 MiB buffer back. A real `zebu replica serve`, started with the
 * data-path Node flags as `zebu up` starts it.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { DataClient } from '../../src/protocol/client.ts';
import { DATA_PATH_NODE_FLAGS } from '../../src/os/js-build.ts';
import { memoryReleaseUnavailable } from '../../src/os/memory-release.ts';
import { watchChildStart } from '../support/child-ready.ts';
import { ZEBU_MAIN, writeSecret } from '../support/replica-process.ts';

const MiB = 1024 * 1024;
const WRITE_BYTES = 32 * MiB;

function residentBytes(pid: number): number {
  const status = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
  return Number(/^VmRSS:\s+(\d+) kB/m.exec(status)![1]) * 1024;
}

/** A real replica given eight 32 MiB writes must be >= 24 MiB smaller within 40 s of the load. */
async function loadThenQuiet(t: { after: (fn: () => unknown) => void }, env: NodeJS.ProcessEnv): Promise<void> {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'zebu-memory-'));
  const { file: secretFile, secret } = writeSecret(root);
  const child = spawn(process.execPath, [
    ...DATA_PATH_NODE_FLAGS, ZEBU_MAIN, 'replica', 'serve',
    '--dir', path.join(root, 'replica'), '--size', String(16 * WRITE_BYTES), '--listen', '127.0.0.1:0', '--secret-file', secretFile,
  ], { stdio: ['ignore', 'pipe', 'pipe'], env });
  const start = watchChildStart(child, 'replica', 20_000);
  t.after(async () => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
    await start.exited;
    fs.rmSync(root, { recursive: true, force: true, maxRetries: 3 });
  });
  const ready = await start.ready;
  const client = await DataClient.connect({ port: ready.port as number, secret, requestTimeoutMs: 60_000 });
  t.after(() => client.close());
  const pid = child.pid!;

  const before = residentBytes(pid);
  const payload = Buffer.alloc(WRITE_BYTES, 0x5a);
  for (let i = 0; i < 8; i++) await client.write(i * WRITE_BYTES, payload);
  const loaded = residentBytes(pid);
  // The premise: the load's payload buffer is resident in the replica, kept for reuse.
  assert.ok(loaded - before >= 24 * MiB, `the load grew the replica by ${((loaded - before) / MiB).toFixed(1)} MiB only (from ${(before / MiB).toFixed(1)})`);

  // The replica samples its CPU time every 5 s: the load's interval, then a quiet one, then the trim.
  const deadline = Date.now() + 40_000;
  let now = loaded;
  while (Date.now() < deadline) {
    await new Promise((r) => setTimeout(r, 500));
    now = residentBytes(pid);
    if (now <= loaded - 24 * MiB) break;
  }
  assert.ok(now <= loaded - 24 * MiB,
    `resident ${(before / MiB).toFixed(1)} MiB before the load, ${(loaded / MiB).toFixed(1)} after it, still ${(now / MiB).toFixed(1)} 40 s later: the pooled 32 MiB buffer was not given back`);
  // And what was written is still there (the pool's buffers were only let go, never reused wrongly).
  const back = await client.read(3 * WRITE_BYTES, WRITE_BYTES);
  assert.ok(back.equals(payload), 'the data written during the load reads back');
}

test('a replica that served 32 MiB writes gives that memory back once quiet (pool emptied, collected, trimmed)', { skip: memoryReleaseUnavailable() ?? false, timeout: 90_000 }, async (t) => {
  await loadThenQuiet(t, process.env);
});

test('without the native memory addon, the pooled 32 MiB buffer is still given back (emptied and collected)', { timeout: 90_000 }, async (t) => {
  await loadThenQuiet(t, { ...process.env, ZEBU_NO_NATIVE: '1' });
});
