/**
 * The engine under replica failure, with real processes and real clients: SIGKILL a replica
 * during a fio verify run (no client error, replica ERR, survivors identical); kill every
 * replica (the client gets EIO promptly, never a hang).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { tempDir } from '../support/tmp.ts';
import { startVolume, replicaDigest, run } from '../support/volume-cluster.ts';
import { controlRequest } from '../../src/protocol/control-channel.ts';

const SIZE = 128 * 1024 * 1024;

function fioVerifyArgs(uri: string, sizeMiB: number): string[] {
  return [
    '--name=verify', '--ioengine=nbd', `--uri=${uri}`, '--rw=randwrite', '--bsrange=4k-128k', `--size=${sizeMiB}M`,
    '--iodepth=16', '--verify=crc32c', '--do_verify=1', '--verify_fatal=1', '--verify_state_save=0', '--output-format=json',
  ];
}

function fioResult(stdout: string): { error: number; writeBytes: number; readBytes: number } {
  const job = JSON.parse(stdout.slice(stdout.indexOf('{'))).jobs[0];
  return { error: job.error, writeBytes: job.write.io_bytes, readBytes: job.read.io_bytes };
}

test('fio verify on a 1-replica volume: 0 errors', async (t) => {
  const vol = await startVolume(t, { dir: tempDir(t), replicas: 1, sizeBytes: SIZE });
  const r = run('fio', fioVerifyArgs(vol.nbd, 64), { timeoutMs: 300_000 });
  assert.equal(r.status, 0, r.stderr);
  const result = fioResult(r.stdout);
  assert.equal(result.error, 0);
  assert.ok(result.readBytes > 0);
  await vol.stop();
});

test('SIGKILL one of three replicas during fio verify: no client error, replica ERR, survivors identical', async (t) => {
  const vol = await startVolume(t, { dir: tempDir(t), replicas: 3, sizeBytes: SIZE });
  const fio = spawn('fio', fioVerifyArgs(vol.nbd, 96), { stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  fio.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
  fio.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  const fioExit = new Promise<number | null>((resolve) => fio.once('exit', (code) => resolve(code)));
  t.after(() => fio.kill('SIGKILL'));
  await new Promise((r) => setTimeout(r, 1500));
  vol.replicas[1].child.kill('SIGKILL');
  const code = await fioExit;
  assert.equal(code, 0, stderr);
  const result = fioResult(stdout);
  assert.equal(result.error, 0, 'fio saw no I/O error');
  assert.ok(result.readBytes > 0, 'fio verified its writes');

  const replicas = (await controlRequest(vol.controlSocket, 'GET', '/v1/replicas')) as { address: string; mode: string }[];
  assert.deepEqual(replicas.map((r) => r.mode), ['RW', 'ERR', 'RW']);
  const survivors = await Promise.all([0, 2].map((i) => replicaDigest(vol.replicas[i].port, vol.secret, vol.epoch, SIZE)));
  assert.equal(survivors[0], survivors[1], 'the two survivors hold identical data');
  await vol.stop();
});

test('all replicas killed: the client gets EIO promptly', async (t) => {
  const vol = await startVolume(t, { dir: tempDir(t), replicas: 3, sizeBytes: SIZE });
  const ok = run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x21 0 64k', '-c', 'read -P 0x21 0 64k', vol.nbd]);
  assert.equal(ok.status, 0, ok.stderr);
  for (const r of vol.replicas) r.child.kill('SIGKILL');
  await Promise.all(vol.replicas.map((r) => r.exited));
  const started = Date.now();
  const read = run('qemu-io', ['-f', 'raw', '-c', 'read 0 64k', '-c', 'write -P 1 0 4k', vol.nbd], { timeoutMs: 60_000 });
  const elapsedMs = Date.now() - started;
  assert.match(read.stdout + read.stderr, /Input\/output error/);
  assert.ok(elapsedMs < 10_000, `failed within ${elapsedMs} ms`);
  const info = (await controlRequest(vol.controlSocket, 'GET', '/v1/info')) as { faulted: boolean };
  assert.equal(info.faulted, true);
});

test('a replica that stops answering (SIGSTOP) goes ERR after the request timeout; I/O continues', async (t) => {
  const vol = await startVolume(t, { dir: tempDir(t), replicas: 3, sizeBytes: SIZE });
  const stopped = vol.replicas[0].child;
  stopped.kill('SIGSTOP');
  t.after(() => stopped.kill('SIGCONT'));
  const started = Date.now();
  const r = run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x44 0 1M', '-c', 'flush', '-c', 'read -P 0x44 0 1M', vol.nbd], { timeoutMs: 60_000 });
  assert.equal(r.status, 0, r.stdout + r.stderr);
  assert.doesNotMatch(r.stdout, /error|failed/i);
  const elapsedMs = Date.now() - started;
  assert.ok(elapsedMs < 15_000, `I/O resumed after ${elapsedMs} ms (request timeout is 3 s)`);
  const replicas = (await controlRequest(vol.controlSocket, 'GET', '/v1/replicas')) as { mode: string; reason: string }[];
  assert.deepEqual(replicas.map((x) => x.mode), ['ERR', 'RW', 'RW']);
  assert.match(replicas[0].reason, /timed out/);
  stopped.kill('SIGCONT');
  const survivors = await Promise.all([1, 2].map((i) => replicaDigest(vol.replicas[i].port, vol.secret, vol.epoch, SIZE)));
  assert.equal(survivors[0], survivors[1]);
  await vol.stop();
});
