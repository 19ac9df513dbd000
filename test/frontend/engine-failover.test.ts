/**
 * The frontend holds the requests it forwarded while the engine is away and re-issues them to
 * the restarted engine: SIGKILL the engine (twice) during a fio verify run and the client sees
 * no error; the replicas end identical.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { tempDir } from '../support/tmp.ts';
import { startVolume, replicaDigest } from '../support/volume-cluster.ts';
import { controlRequest } from '../../src/protocol/control-channel.ts';

const SIZE = 128 * 1024 * 1024;

test('SIGKILL the engine during fio verify: no client error, replicas identical', async (t) => {
  const dir = tempDir(t);
  const vol = await startVolume(t, { dir, replicas: 3, sizeBytes: SIZE });
  const fio = spawn('fio', [
    '--name=verify', '--ioengine=nbd', `--uri=${vol.nbd}`, '--rw=randwrite', '--bsrange=4k-64k', '--size=96M',
    '--iodepth=16', '--verify=crc32c', '--do_verify=1', '--verify_fatal=1', '--verify_state_save=0', '--output-format=json',
  ], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  fio.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
  fio.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  const fioExit = new Promise<number | null>((resolve) => fio.once('exit', (code) => resolve(code)));
  t.after(() => fio.kill('SIGKILL'));
  let kills = 0;
  for (const delayMs of [1200, 1500]) {
    await new Promise((r) => setTimeout(r, delayMs));
    if (fio.exitCode !== null) break;
    const r = spawnSync('pkill', ['-9', '-f', `engine serve --name ${vol.name} .*${dir}`]);
    if (r.status === 0) kills++;
  }
  assert.ok(kills >= 1, 'the engine was killed during the run');
  assert.equal(await fioExit, 0, stderr);
  const job = JSON.parse(stdout.slice(stdout.indexOf('{'))).jobs[0];
  assert.equal(job.error, 0, 'fio saw no error');
  assert.ok(job.read.io_bytes > 0, 'fio verified');
  // The restarted engine serves with every replica.
  let replicas: { mode: string }[] = [];
  for (let i = 0; i < 50; i++) {
    replicas = (await controlRequest(vol.controlSocket, 'GET', '/v1/replicas').catch(() => [])) as { mode: string }[];
    if (replicas.length === 3) break;
    await new Promise((r) => setTimeout(r, 100));
  }
  assert.ok(replicas.filter((r) => r.mode === 'RW').length >= 1, JSON.stringify(replicas));
  const rw = replicas.map((r, i) => (r.mode === 'RW' ? i : -1)).filter((i) => i >= 0);
  const epoch = await vol.currentEpoch();
  assert.ok(epoch > vol.epoch, `every restarted engine has a new epoch (first ${vol.epoch}, now ${epoch})`);
  const digests = await Promise.all(rw.map((i) => replicaDigest(vol.replicas[i].port, vol.secret, epoch, SIZE)));
  assert.equal(new Set(digests).size, 1, 'RW replicas identical');
  await vol.stop();
});

test('the engine SIGKILLed again while it restarts: the supervisor keeps restarting it; a held write completes', async (t) => {
  const dir = tempDir(t);
  const vol = await startVolume(t, { dir, replicas: 2, sizeBytes: SIZE });
  const enginePids = (): number[] => {
    const r = spawnSync('pgrep', ['-f', `engine serve --name ${vol.name} .*${dir}`]);
    return r.stdout.toString().split('\n').filter((x) => x !== '').map(Number);
  };
  const [first] = enginePids();
  assert.ok(first > 0, 'an engine runs');
  process.kill(first, 'SIGKILL');
  // The next engine process: killed as soon as it exists, long before it can be ready.
  let second = 0;
  for (let i = 0; i < 400 && second === 0; i++) {
    second = enginePids().find((pid) => pid !== first) ?? 0;
    if (second === 0) await new Promise((r) => setTimeout(r, 10));
  }
  assert.ok(second > 0, 'the supervisor started a new engine');
  process.kill(second, 'SIGKILL');
  // A client write meanwhile is held by the frontend and completes once an engine serves again.
  const io = spawnSync('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 1M 64k', '-c', 'read -P 0x5a 1M 64k', vol.nbd], { timeout: 60_000 });
  assert.equal(io.status, 0, `${io.stdout}${io.stderr}\n${vol.stderr()}`);
  assert.doesNotMatch(io.stdout.toString(), /error|verification failed/i);
  const third = enginePids().find((pid) => pid !== first && pid !== second);
  assert.ok(third !== undefined, 'a third engine serves');
  await vol.stop();
});

/** The pids of a volume's engine (or frontend) processes started by `zebu volume serve` in `dir`. */
function pidsOf(role: 'engine' | 'frontend', name: string, dir: string): number[] {
  const pattern = role === 'engine' ? `engine serve --name ${name} .*${dir}` : `frontend serve --name ${name} .*${dir}`;
  return spawnSync('pgrep', ['-f', pattern]).stdout.toString().split('\n').filter((x) => x !== '').map(Number);
}

test('a hung engine (SIGSTOP) is found by the heartbeat, killed and replaced: the client sees a delay, not an error', async (t) => {
  const dir = tempDir(t);
  const vol = await startVolume(t, { dir, replicas: 2, sizeBytes: SIZE, extraArgs: ['--hang-timeout-ms', '1500'] });
  const [hung] = pidsOf('engine', vol.name, dir);
  assert.ok(hung > 0);
  assert.equal(spawnSync('qemu-io', ['-f', 'raw', '-c', 'write -P 0x21 0 4M', vol.nbd]).status, 0);
  process.kill(hung, 'SIGSTOP');
  t.after(() => {
    try {
      process.kill(hung, 'SIGKILL');
    } catch {
      // gone, as it should be
    }
  });
  const started = Date.now();
  const io = spawnSync('qemu-io', ['-f', 'raw', '-c', 'write -P 0x22 4M 4M', '-c', 'read -P 0x21 0 4M', '-c', 'read -P 0x22 4M 4M', vol.nbd], { timeout: 60_000 });
  const tookMs = Date.now() - started;
  assert.equal(io.status, 0, `${io.stdout}${io.stderr}`);
  assert.doesNotMatch(io.stdout.toString(), /error|fail/i);
  assert.ok(tookMs >= 1400, `the client waited for the replacement (${tookMs} ms)`);
  assert.ok(!pidsOf('engine', vol.name, dir).includes(hung), 'the hung engine is gone');
  assert.ok(await vol.currentEpoch() > vol.epoch, 'the new engine has a new epoch');
  await vol.stop();
});

test('frontend SIGKILL: a client that connects meanwhile waits in the kept socket instead of being refused; qemu with reconnect-delay resumes', async (t) => {
  const dir = tempDir(t);
  const vol = await startVolume(t, { dir, replicas: 2, sizeBytes: SIZE });
  assert.equal(spawnSync('qemu-io', ['-f', 'raw', '-c', 'write -P 0x31 0 8M', vol.nbd]).status, 0);
  const url = new URL(vol.nbd);
  // A reconnecting client in the middle of its I/O when the frontend dies.
  const qemu = spawn('qemu-io', [
    '--image-opts', `driver=nbd,server.type=inet,server.host=${url.hostname},server.port=${url.port},export=${vol.name},reconnect-delay=30`,
    '-c', 'write -P 0x32 8M 48M', '-c', 'read -P 0x31 0 8M', '-c', 'read -P 0x32 8M 48M',
  ], { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  qemu.stdout.on('data', (d: Buffer) => (out += d.toString()));
  qemu.stderr.on('data', (d: Buffer) => (out += d.toString()));
  const qemuExit = new Promise<number | null>((resolve) => qemu.once('exit', (code) => resolve(code)));
  await new Promise((r) => setTimeout(r, 300));
  const [frontend] = pidsOf('frontend', vol.name, dir);
  process.kill(frontend, 'SIGKILL');
  // New connections while no frontend runs: both transports wait, none is refused.
  const started = Date.now();
  const tcp = spawnSync('nbdinfo', ['--size', vol.nbd], { timeout: 30_000 });
  const resumedMs = Date.now() - started;
  const unix = spawnSync('nbdinfo', ['--size', vol.nbdUnix], { timeout: 30_000 });
  assert.equal(tcp.status, 0, tcp.stderr.toString());
  assert.equal(unix.status, 0, unix.stderr.toString());
  assert.equal(tcp.stdout.toString().trim(), String(SIZE));
  t.diagnostic(`a new connection during the frontend restart was served after ${resumedMs} ms`);
  assert.equal(await qemuExit, 0, out);
  assert.doesNotMatch(out, /error|fail/i);
  const [next] = pidsOf('frontend', vol.name, dir);
  assert.ok(next !== undefined && next !== frontend, 'a new frontend serves');
  await vol.stop();
});
