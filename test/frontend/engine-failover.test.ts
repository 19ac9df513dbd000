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
import { controlRequest } from '../../src/engine/control-server.ts';

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
