/**
 * One `zebu frontend serve --control-socket` process serves two volumes (each: replica
 * processes + a `zebu engine serve` process) by export name on one NBD port, plus a stand-in
 * engine in this process for the size refresh. Exports are added and removed through the control
 * API while real clients (qemu-io, nbdinfo, fio) and a raw NBD client run.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import readline from 'node:readline';
import { FrontendControlClient, frontendControlRequest } from '../../src/frontend/control-client.ts';
import { NbdErrno } from '../../src/frontend/nbd-protocol.ts';
import { controlRequest } from '../../src/protocol/control-channel.ts';
import { ZebuError, ErrorCode } from '../../src/errors.ts';
import { tempDir, pattern } from '../support/tmp.ts';
import { startReplica, writeSecret, ZEBU_MAIN } from '../support/replica-process.ts';
import { run, mustRun } from '../support/volume-cluster.ts';
import { MemoryBackend } from './memory-backend.ts';
import { NbdClient } from '../support/nbd-client.ts';
import { watchChildStart } from '../support/child-ready.ts';

const MiB = 1024 * 1024;
type T = { after: (fn: () => unknown) => void };

interface Proc {
  child: ChildProcess;
  ready: Record<string, unknown>;
  exited: Promise<number | string>;
  stderr: () => string;
}

/** Spawns `zebu ARGS` and waits for its JSON ready line; SIGKILLed when the test ends. */
async function startZebu(t: T, label: string, args: string[]): Promise<Proc> {
  const child = spawn(process.execPath, [ZEBU_MAIN, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  const start = watchChildStart(child, label, 60_000);
  const { exited, stderr } = start;
  t.after(async () => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
    await exited;
  });
  const ready = await start.ready;
  return { child, ready, exited, stderr };
}

interface Volume {
  name: string;
  sizeBytes: number;
  engineSocket: string;
  engineArgs: string[];
  engine: Proc;
}

async function startVolumeEngine(t: T, dir: string, secretFile: string, name: string, sizeBytes: number, replicas: number): Promise<Volume> {
  const ports: number[] = [];
  for (let i = 0; i < replicas; i++) {
    const r = await startReplica({ dir: path.join(dir, `${name}-replica-${i}`), sizeBytes, secretFile });
    t.after(async () => {
      if (r.child.exitCode === null && r.child.signalCode === null) r.child.kill('SIGKILL');
      await r.exited;
    });
    ports.push(r.port);
  }
  const engineSocket = path.join(dir, `${name}.engine.sock`);
  const engineArgs = [
    'engine', 'serve', '--name', name, '--size', String(sizeBytes), ...ports.flatMap((p) => ['--replica', `127.0.0.1:${p}`]),
    '--socket', engineSocket, '--control-socket', path.join(dir, `${name}.control.sock`), '--secret-file', secretFile,
    '--epoch', '1', '--request-timeout-ms', '3000',
  ];
  const engine = await startZebu(t, `engine ${name}`, engineArgs);
  return { name, sizeBytes, engineSocket, engineArgs, engine };
}

async function waitFor(what: string, condition: () => boolean | Promise<boolean>, timeoutMs = 30_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await condition())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** Runs a command without blocking this process's event loop. */
function runAsync(cmd: string, args: string[], timeoutMs = 120_000): Promise<{ code: number | string; output: string }> {
  return new Promise((resolve) => {
    const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let output = '';
    child.stdout.on('data', (d: Buffer) => (output += d.toString()));
    child.stderr.on('data', (d: Buffer) => (output += d.toString()));
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    child.once('exit', (code, signal) => {
      clearTimeout(timer);
      resolve({ code: code ?? signal ?? -1, output });
    });
  });
}

/** Writes and reads back on one export until stopped; counts errors and mismatches. */
function startLoad(client: NbdClient, seed: number): { stop: () => Promise<{ ops: number; errors: string[] }> } {
  let running = true;
  let ops = 0;
  const errors: string[] = [];
  const loop = (async () => {
    while (running) {
      const offset = (ops % 64) * 64 * 1024;
      const data = pattern(seed + ops, 64 * 1024);
      try {
        const w = await client.write(offset, data);
        if (w !== 0) errors.push(`write errno ${w}`);
        const r = await client.read(offset, data.length);
        if (r.errno !== 0) errors.push(`read errno ${r.errno}`);
        else if (!r.data.equals(data)) errors.push(`mismatch at ${offset}`);
      } catch (err) {
        errors.push((err as Error).message);
        return;
      }
      ops++;
    }
  })();
  return {
    async stop() {
      running = false;
      await loop;
      return { ops, errors };
    },
  };
}

test('one frontend process serves two volumes by export name; exports come and go at run time', async (t) => {
  const dir = tempDir(t, 'zme-');
  const { file: secretFile, secret } = writeSecret(dir);
  const a = await startVolumeEngine(t, dir, secretFile, 'a', 64 * MiB, 2);
  const b = await startVolumeEngine(t, dir, secretFile, 'b', 32 * MiB, 2);
  const controlSocket = path.join(dir, 'frontend.sock');
  const nbdSocket = path.join(dir, 'nbd.sock');
  const frontend = await startZebu(t, 'frontend', ['frontend', 'serve', '--secret-file', secretFile, '--nbd', '127.0.0.1:0', '--nbd-socket', nbdSocket, '--control-socket', controlSocket]);
  const control = new FrontendControlClient(controlSocket);
  const nbdAddress = frontend.ready.nbdAddress as string;
  const port = Number(nbdAddress.split(':')[1]);
  const uri = (name: string): string => `nbd://${nbdAddress}/${name}`;

  await t.test('ready line and info', async () => {
    assert.match(nbdAddress, /^127\.0\.0\.1:\d+$/);
    assert.ok(port > 0);
    assert.equal(frontend.ready.controlSocket, controlSocket);
    assert.equal(frontend.ready.pid, frontend.child.pid);
    assert.deepEqual(await control.info(), { pid: frontend.child.pid, nbdAddress, nbdSocket, exports: 0 });
  });

  await t.test('both exports added through the control API; PUT twice is idempotent', async () => {
    const viewA = await control.putExport('a', a.engineSocket);
    const { link, timeouts, ...rest } = viewA;
    assert.deepEqual(rest, { name: 'a', sizeBytes: 64 * MiB, engineSocket: a.engineSocket, connections: 0, outstanding: 0, engineConnected: true });
    assert.equal(link.state, 'OPEN');
    assert.deepEqual([link.reopens, link.reissued, link.hangs, link.held], [0, 0, 0, 0]);
    assert.ok(link.engine !== null && link.engine.pid > 0, 'the engine says which process it is');
    assert.deepEqual(timeouts, { holdTimeoutMs: 300_000, hangTimeoutMs: 10_000, stallTimeoutMs: 60_000 });
    const viewB = await control.putExport('b', b.engineSocket);
    assert.equal(viewB.sizeBytes, 32 * MiB);
    assert.deepEqual(await control.putExport('a', a.engineSocket), viewA);
    assert.deepEqual((await control.listExports()).map((e) => e.name), ['a', 'b']);
    assert.equal((await control.info()).exports, 2);
  });

  await t.test('nbdinfo --list shows both exports with their own sizes', () => {
    const list = JSON.parse(mustRun('nbdinfo', ['--list', '--json', `nbd://${nbdAddress}`])) as { exports: { 'export-name': string; 'export-size': number }[] };
    const sizes = Object.fromEntries(list.exports.map((e) => [e['export-name'], e['export-size']]));
    assert.deepEqual(sizes, { a: 64 * MiB, b: 32 * MiB });
    const unknown = run('nbdinfo', [uri('nope')]);
    assert.notEqual(unknown.status, 0, 'an unknown export name is refused');
  });

  await t.test('qemu-io writes and verifies each volume through the one NBD port (TCP and UNIX socket)', () => {
    mustRun('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 0 1M', '-c', 'write -P 0x5b 60M 4M', uri('a')]);
    mustRun('qemu-io', ['-f', 'raw', '-c', 'write -P 0xa5 0 1M', '-c', 'write -P 0xa6 28M 4M', `nbd+unix:///b?socket=${nbdSocket}`]);
    const outA = mustRun('qemu-io', ['-f', 'raw', '-c', 'read -P 0x5a 0 1M', '-c', 'read -P 0x5b 60M 4M', `nbd+unix:///a?socket=${nbdSocket}`]);
    const outB = mustRun('qemu-io', ['-f', 'raw', '-c', 'read -P 0xa5 0 1M', '-c', 'read -P 0xa6 28M 4M', uri('b')]);
    assert.doesNotMatch(outA + outB, /Pattern verification failed|error/i);
    const crossed = run('qemu-io', ['-f', 'raw', '-c', 'read -P 0xa5 0 4k', uri('a')]);
    assert.match(crossed.stdout + crossed.stderr, /Pattern verification failed/, 'a does not read b\'s data');
  });

  await t.test('bad control requests get 400/404/503 and the frontend stays up', async () => {
    const expectError = async (p: Promise<unknown>, code: ErrorCode, message?: RegExp): Promise<void> => {
      await assert.rejects(p, (err: ZebuError) => err.code === code && (message === undefined || message.test(err.message)));
    };
    await expectError(controlRequest(controlSocket, 'PUT', '/v1/exports/Bad_Name', { engineSocket: a.engineSocket }), ErrorCode.EINVAL, /export name/);
    await expectError(controlRequest(controlSocket, 'PUT', '/v1/exports/c', { socket: a.engineSocket }), ErrorCode.EINVAL);
    await expectError(controlRequest(controlSocket, 'PUT', '/v1/exports/c', 'not an object'), ErrorCode.EINVAL, /JSON object/);
    await expectError(controlRequest(controlSocket, 'GET', '/v1/volumes'), ErrorCode.NOT_FOUND, /no route/);
    await expectError(controlRequest(controlSocket, 'DELETE', '/v1/exports/c'), ErrorCode.NOT_FOUND);
    await expectError(controlRequest(controlSocket, 'POST', '/v1/exports/c/refresh'), ErrorCode.NOT_FOUND);
    // A missing engine socket: a clear error after the bounded wait (10 s), nothing added.
    const startedMs = Date.now();
    await expectError(control.putExport('c', path.join(dir, 'no-such-engine.sock')), ErrorCode.DISCONNECTED, /engine of export c not reachable at .*no-such-engine\.sock within 10000 ms/);
    const elapsedMs = Date.now() - startedMs;
    assert.ok(elapsedMs >= 9000 && elapsedMs < 40_000, `bounded wait, took ${elapsedMs} ms`);
    assert.equal(await control.getExport('c'), null);
    assert.equal(frontend.child.exitCode, null);
    assert.equal((await control.info()).exports, 2);
    mustRun('qemu-io', ['-f', 'raw', '-c', 'read -P 0x5a 0 64k', uri('a')]);
  });

  await t.test('refresh picks up an engine\'s new size for new connections', async (t2) => {
    const backend = new MemoryBackend(8 * MiB);
    const memSocket = path.join(dir, 'mem.engine.sock');
    const server = await backend.serve(memSocket, secret);
    t2.after(() => server.close(1000));
    assert.equal((await control.putExport('mem', memSocket)).sizeBytes, 8 * MiB);
    const open = await NbdClient.connect({ host: '127.0.0.1', port }, 'mem');
    backend.resize(24 * MiB);
    assert.equal((await control.refreshExport('mem')).sizeBytes, 24 * MiB);
    // nbdinfo reads the first sectors (content detection): run it without blocking the stand-in engine.
    const nbdinfo = await runAsync('nbdinfo', ['--json', uri('mem')]);
    assert.equal(nbdinfo.code, 0, nbdinfo.output);
    const info = JSON.parse(nbdinfo.output.slice(nbdinfo.output.indexOf('{'))) as { exports: { 'export-size': number }[] };
    assert.equal(info.exports[0]['export-size'], 24 * MiB);
    // Asynchronously: the stand-in engine lives in this process and must keep answering.
    const io = await runAsync('qemu-io', ['-f', 'raw', '-c', 'write -P 0x33 20M 64k', '-c', 'read -P 0x33 20M 64k', uri('mem')]);
    assert.equal(io.code, 0, io.output);
    assert.doesNotMatch(io.output, /Pattern verification failed|error/i);
    assert.equal(open.sizeBytes, 8 * MiB, 'the open connection keeps the size it was told');
    assert.equal((await open.read(20 * MiB, 4096)).errno, NbdErrno.EINVAL);
    await open.disconnect();
    // The frontend sees the close a moment later: count once it has.
    for (let i = 0; i < 200 && (await control.getExport('mem'))?.connections !== 0; i++) await new Promise((r) => setTimeout(r, 25));
    assert.deepEqual(await control.removeExport('mem'), { removed: 'mem', connections: 0, drained: true });
  });

  await t.test('kill -9 the engine of a and restart it: a\'s fio sees no error, nor does b\'s', async () => {
    const fio = (name: string, size: string, rate: string[] = []) => {
      const child = spawn('fio', [
        `--name=${name}`, '--ioengine=nbd', `--uri=${uri(name)}`, '--rw=randwrite', '--bsrange=4k-64k', `--size=${size}`,
        '--iodepth=8', '--verify=crc32c', '--do_verify=1', '--verify_fatal=1', '--verify_state_save=0', '--output-format=json', ...rate,
      ], { stdio: ['ignore', 'pipe', 'pipe'] });
      let stdout = '';
      let stderr = '';
      child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
      child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
      const done = new Promise<{ code: number | null; stdout: string; stderr: string }>((resolve) => child.once('exit', (code) => resolve({ code, stdout, stderr })));
      t.after(() => child.kill('SIGKILL'));
      return { child, done };
    };
    // Rate-limited (about 4 s of writes): still running when its engine is killed, however fast the machine.
    const fioA = fio('a', '48M', ['--rate=12m']);
    const fioB = fio('b', '24M');
    await new Promise((r) => setTimeout(r, 1500));
    assert.equal(fioA.child.exitCode, null, 'fio on a is still running when its engine is killed');
    a.engine.child.kill('SIGKILL');
    await a.engine.exited;
    await waitFor('a held requests while its engine is away', async () => {
      const view = await control.getExport('a');
      return view !== null && !view.engineConnected;
    }, 10_000).catch(() => {}); // the engine may be back before we look
    a.engine = await startZebu(t, 'engine a (restarted)', a.engineArgs);
    for (const [name, f] of [['a', fioA], ['b', fioB]] as const) {
      const r = await f.done;
      assert.equal(r.code, 0, `fio ${name}: ${r.stderr}`);
      const job = JSON.parse(r.stdout.slice(r.stdout.indexOf('{'))).jobs[0];
      assert.equal(job.error, 0, `fio ${name} saw no error`);
      assert.ok(job.read.io_bytes > 0, `fio ${name} verified`);
    }
    assert.equal((await control.getExport('a'))?.engineConnected, true);
  });

  await t.test('DELETE a while its client has requests in flight: answered, then disconnected; b goes on', async () => {
    const ca = await NbdClient.connect({ host: '127.0.0.1', port }, 'a');
    const cb = await NbdClient.connect({ path: nbdSocket }, 'b');
    const load = startLoad(cb, 1000);
    // Stop a's engine so that the writes stay in flight for as long as we need.
    a.engine.child.kill('SIGSTOP');
    let continued = false;
    const resume = (): void => {
      if (!continued) a.engine.child.kill('SIGCONT');
      continued = true;
    };
    try {
      const writes = Array.from({ length: 16 }, (_, i) => ca.write(i * 64 * 1024, pattern(500 + i, 64 * 1024)));
      await waitFor('16 writes outstanding on a', async () => ((await control.getExport('a'))?.outstanding ?? 0) >= 16);
      const removal = frontendControlRequest(controlSocket, 'DELETE', '/v1/exports/a', { timeoutMs: 60_000 });
      await waitFor('a gone from the export list', async () => (await control.listExports()).every((e) => e.name !== 'a'));
      assert.notEqual(run('nbdinfo', [uri('a')]).status, 0, 'new handshakes for a fail at once');
      assert.equal(await ca.write(0, pattern(1, 4096)), NbdErrno.ESHUTDOWN, 'a request after the DELETE is refused, not lost');
      assert.equal(ca.isClosed, false, 'the client stays connected while its requests are in flight');
      resume();
      assert.deepEqual(await Promise.all(writes), new Array(16).fill(0), 'in-flight writes answered with success');
      assert.deepEqual(await removal, { removed: 'a', connections: 1, drained: true });
      await ca.closed;
    } finally {
      resume();
    }
    const { ops, errors } = await load.stop();
    assert.deepEqual(errors, [], 'b\'s client saw no error');
    assert.ok(ops > 0);
    assert.equal(await cb.flush(), 0);
    await cb.disconnect();
    const list = JSON.parse(mustRun('nbdinfo', ['--list', '--json', `nbd://${nbdAddress}`])) as { exports: { 'export-name': string }[] };
    assert.deepEqual(list.exports.map((e) => e['export-name']), ['b']);

    // The answered writes are on the volume: add a back and read them.
    await control.putExport('a', a.engineSocket);
    const again = await NbdClient.connect({ host: '127.0.0.1', port }, 'a');
    for (let i = 0; i < 16; i++) assert.ok((await again.read(i * 64 * 1024, 64 * 1024)).data.equals(pattern(500 + i, 64 * 1024)), `write ${i}`);
    await again.disconnect();
    mustRun('qemu-io', ['-f', 'raw', '-c', 'read 0 1M', uri('b')]);
  });

  await t.test('SIGTERM: the frontend exits 0; the engines are untouched', async () => {
    frontend.child.kill('SIGTERM');
    assert.equal(await frontend.exited, 0, frontend.stderr());
    assert.equal(a.engine.child.exitCode, null);
    assert.equal(b.engine.child.exitCode, null);
  });
});

test('the frontend keeps serving when the process that started it (the agent) dies', async (t) => {
  const dir = tempDir(t, 'zme-');
  const { file: secretFile, secret } = writeSecret(dir);
  const controlSocket = path.join(dir, 'frontend.sock');
  const nbdSocket = path.join(dir, 'nbd.sock');
  // A stand-in agent: starts the frontend with piped stdout/stderr, relays the ready line, then waits.
  const agentScript = `
    const { spawn } = require('node:child_process');
    const child = spawn(process.execPath, ${JSON.stringify([ZEBU_MAIN, 'frontend', 'serve', '--secret-file', secretFile, '--nbd-socket', nbdSocket, '--control-socket', controlSocket])}, { stdio: ['ignore', 'pipe', 'pipe'] });
    child.stdout.on('data', (d) => process.stdout.write(d));
    child.stderr.on('data', () => {});
    setInterval(() => {}, 1000);
  `;
  const agent = spawn(process.execPath, ['-e', agentScript], { stdio: ['ignore', 'pipe', 'inherit'] });
  const agentExited = new Promise((resolve) => agent.once('exit', resolve));
  let frontendPid = 0;
  t.after(async () => {
    agent.kill('SIGKILL');
    await agentExited;
    if (frontendPid > 0) {
      try {
        process.kill(frontendPid, 'SIGKILL');
      } catch {
        // already gone
      }
    }
  });
  const ready = await new Promise<Record<string, unknown>>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('frontend not ready in 60 s')), 60_000);
    readline.createInterface({ input: agent.stdout! }).on('line', (line) => {
      clearTimeout(timer);
      resolve(JSON.parse(line));
    });
  });
  frontendPid = ready.pid as number;
  const backend = new MemoryBackend(4 * MiB);
  const server = await backend.serve(path.join(dir, 'v.engine.sock'), secret);
  t.after(() => server.close(1000));
  const control = new FrontendControlClient(controlSocket);
  await control.putExport('v', path.join(dir, 'v.engine.sock'));
  const before = await NbdClient.connect({ path: nbdSocket }, 'v');
  assert.equal(await before.write(0, pattern(1, 4096)), 0);

  agent.kill('SIGKILL');
  await agentExited;
  // Its stdout and stderr now lead nowhere: logging (every connection, every change) must not hurt.
  for (let i = 0; i < 20; i++) {
    const c = await NbdClient.connect({ path: nbdSocket }, 'v');
    assert.equal(await c.write(4096 * (i + 1), pattern(i + 2, 4096)), 0);
    await c.disconnect();
  }
  await control.putExport('w', path.join(dir, 'v.engine.sock'));
  assert.deepEqual(await control.removeExport('w'), { removed: 'w', connections: 0, drained: true });
  assert.deepEqual((await before.read(0, 4096)).data, pattern(1, 4096), 'the connection opened before the agent died still works');
  assert.equal((await control.info()).pid, frontendPid);
  await before.disconnect();
  process.kill(frontendPid, 'SIGTERM');
  await waitFor('the frontend to exit on SIGTERM', () => {
    try {
      // Gone, or a zombie nobody has reaped yet (its parent died).
      return /^\d+ \(.*\) Z/.test(fs.readFileSync(`/proc/${frontendPid}/stat`, 'utf8'));
    } catch {
      return true;
    }
  });
  frontendPid = 0;
});
