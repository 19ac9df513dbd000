/**
 * Adding a replica to a running volume and rebuilding it, through real processes: the copy is
 * identical to the others (live data and every snapshot) although clients write during the
 * rebuild; a target that dies midway leaves the volume serving; bad requests are refused; the
 * set can shrink (never below one RW replica) and the volume can grow online.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { controlRequest } from '../../src/protocol/control-channel.ts';
import { DataClient } from '../../src/protocol/client.ts';
import { startReplica, type ReplicaProcess } from '../support/replica-process.ts';
import { startVolume, replicaDigest, mustRun, type VolumeCluster } from '../support/volume-cluster.ts';
import { startFio, fioFigures } from '../support/fio.ts';
import { tempDir } from '../support/tmp.ts';
import { waitFor } from '../support/zebu-up.ts';

const MiB = 1024 * 1024;

interface ReplicaRow {
  address: string;
  mode: 'RW' | 'WO' | 'ERR';
  reason: string | null;
  rebuild: { copiedBytes: number; totalBytes: number } | null;
}

function replicasOf(vol: VolumeCluster): Promise<ReplicaRow[]> {
  return controlRequest(vol.controlSocket, 'GET', '/v1/replicas') as Promise<ReplicaRow[]>;
}

async function newReplica(t: { after: (fn: () => unknown) => void }, dir: string, name: string, sizeBytes: number): Promise<ReplicaProcess> {
  const r = await startReplica({ dir: path.join(dir, name), sizeBytes, secretFile: path.join(dir, 'secret') });
  t.after(() => r.child.kill('SIGKILL'));
  return r;
}

function qemuIo(uri: string, ...commands: string[]): void {
  const out = mustRun('qemu-io', ['-f', 'raw', ...commands.flatMap((c) => ['-c', c]), uri], { timeoutMs: 120_000 });
  assert.doesNotMatch(out, /verification failed|error/i, out);
}

async function expectError(promise: Promise<unknown>, pattern: RegExp): Promise<void> {
  await assert.rejects(promise, (err: Error) => {
    assert.match(err.message, pattern);
    return true;
  });
}

test('rebuild under fio verify copies the live data and every snapshot of the chain exactly', async (t) => {
  const dir = tempDir(t);
  const size = 128 * MiB;
  const vol = await startVolume(t, { dir, replicas: 2, sizeBytes: size });
  const uri = vol.nbd;
  // Snapshot s1 holds A; s2 holds B over part of A and a zeroed range of A; the head holds C.
  qemuIo(uri, 'write -P 0xa1 0 8M', 'write -P 0xa2 40M 4M', 'flush');
  await controlRequest(vol.controlSocket, 'POST', '/v1/snapshots', { name: 's1' });
  qemuIo(uri, 'write -P 0xb1 4M 8M', 'write -z 40M 4M', 'flush');
  await controlRequest(vol.controlSocket, 'POST', '/v1/snapshots', { name: 's2' });
  qemuIo(uri, 'write -P 0xc1 2M 1M', 'flush');

  // fio writes and verifies the upper half the whole time.
  const fio = startFio(t, [
    '--name=verify', '--ioengine=nbd', `--uri=${uri}`, '--rw=randwrite', '--bsrange=4k-64k', '--offset=64M', '--size=64M',
    '--iodepth=8', '--verify=crc32c', '--do_verify=1', '--verify_fatal=1', '--verify_state_save=0', '--output-format=json', '--randseed=7',
    '--loops=2',
  ]);
  await new Promise((r) => setTimeout(r, 500));
  const fresh = await newReplica(t, dir, 'replica-new', size);
  const address = `127.0.0.1:${fresh.port}`;
  const list = (await controlRequest(vol.controlSocket, 'POST', '/v1/replicas', { address })) as ReplicaRow[];
  const added = list.find((r) => r.address === address)!;
  assert.equal(added.mode, 'WO', 'returns at once with the replica being rebuilt');
  assert.ok(added.rebuild !== null && added.rebuild.totalBytes === 3 * size, 'two snapshots and the head to copy');
  // Snapshot changes wait for the rebuild.
  await expectError(controlRequest(vol.controlSocket, 'POST', '/v1/snapshots', { name: 'during' }), /being rebuilt/);
  await expectError(controlRequest(vol.controlSocket, 'POST', '/v1/expand', { sizeBytes: 2 * size }), /being rebuilt/);

  const seen = new Set<number>();
  await waitFor('the new replica RW', async () => {
    const now = (await replicasOf(vol)).find((r) => r.address === address)!;
    if (now.rebuild !== null) seen.add(now.rebuild.copiedBytes);
    assert.notEqual(now.mode, 'ERR', now.reason ?? '');
    return now.mode === 'RW';
  }, 120_000, 50);
  const info = (await controlRequest(vol.controlSocket, 'GET', '/v1/info')) as { rebuilding: boolean; replicas: ReplicaRow[] };
  assert.equal(info.rebuilding, false);
  assert.deepEqual(info.replicas.map((r) => r.mode), ['RW', 'RW', 'RW']);

  const result = await fio.exit;
  assert.equal(result.code, 0, result.stderr);
  assert.equal(fioFigures(result.stdout).error, 0);

  qemuIo(uri, 'flush');
  const ports = [...vol.replicas.map((r) => r.port), fresh.port];
  for (const snapshot of [undefined, 's1', 's2']) {
    const digests = await Promise.all(ports.map((p) => replicaDigest(p, vol.secret, vol.epoch, size, snapshot)));
    assert.equal(new Set(digests).size, 1, `${snapshot ?? 'head'}: ${digests.join(' ')}`);
  }
  // The new replica has the snapshots by name, in the same chain, and the source's counters.
  const client = await DataClient.connect({ port: fresh.port, secret: vol.secret, epoch: vol.epoch });
  const old = await DataClient.connect({ port: vol.replicas[0].port, secret: vol.secret, epoch: vol.epoch });
  t.after(() => {
    client.close();
    old.close();
  });
  assert.deepEqual((await client.snapshotList()).map((s) => [s.name, s.inChain]), [['s1', true], ['s2', true]]);
  assert.equal((await client.info()).revision, (await old.info()).revision, 'same write counter: equal at the next start');
  assert.equal((await client.info()).rebuilding, false, 'the rebuild mark is cleared');
});

test('copy and client writes to the same blocks never interleave: replicas identical after a rebuild under constant writes', async (t) => {
  const dir = tempDir(t);
  const size = 128 * MiB;
  const vol = await startVolume(t, { dir, replicas: 2, sizeBytes: size });
  // A snapshot full of data under a zeroed head: the copy zeroes on the new replica what the
  // head reads as zeros, and copies the rest, while writes land there.
  qemuIo(vol.nbd, 'write -P 0x99 0 128M', 'flush');
  await controlRequest(vol.controlSocket, 'POST', '/v1/snapshots', { name: 'full' });
  qemuIo(vol.nbd, 'write -z 0 128M', 'flush');
  // Random 4k writes all over the volume while the rebuild runs, stopped as soon as it is done:
  // a block the copy got wrong must not be rewritten (and so hidden) afterwards.
  const fio = startFio(t, [
    '--name=load', '--ioengine=nbd', `--uri=${vol.nbd}`, '--rw=randwrite', '--bs=4k', '--size=128M', '--iodepth=16',
    '--time_based', '--runtime=120', '--randseed=11', '--output-format=json',
  ]);
  await new Promise((r) => setTimeout(r, 500));
  const fresh = await newReplica(t, dir, 'replica-load', size);
  const address = `127.0.0.1:${fresh.port}`;
  await controlRequest(vol.controlSocket, 'POST', '/v1/replicas', { address });
  await waitFor('rebuilt', async () => (await replicasOf(vol)).find((r) => r.address === address)?.mode === 'RW', 60_000, 10);
  fio.child.kill('SIGINT');
  const result = await fio.exit;
  assert.equal(fioFigures(result.stdout).error, 0, result.stderr);
  assert.ok(fioFigures(result.stdout).writeBytes > 0);
  vol.replicas.push(fresh);
  qemuIo(vol.nbd, 'flush');
  for (const snapshot of [undefined, 'full']) {
    const digests = await Promise.all(vol.replicas.map((r) => replicaDigest(r.port, vol.secret, vol.epoch, size, snapshot)));
    assert.equal(new Set(digests).size, 1, `${snapshot ?? 'head'}: ${digests.join(' ')}`);
  }
});

test('a rebuild target killed midway goes ERR; the volume keeps serving; another replica rebuilds', async (t) => {
  const dir = tempDir(t);
  const size = 256 * MiB;
  const vol = await startVolume(t, { dir, replicas: 2, sizeBytes: size });
  qemuIo(vol.nbd, 'write -P 0x5c 0 192M', 'flush');
  const victim = await newReplica(t, dir, 'replica-victim', size);
  const address = `127.0.0.1:${victim.port}`;
  await controlRequest(vol.controlSocket, 'POST', '/v1/replicas', { address });
  await waitFor('copy under way', async () => ((await replicasOf(vol)).find((r) => r.address === address)?.rebuild?.copiedBytes ?? 0) > 0, 60_000, 10);
  victim.child.kill('SIGKILL');
  await waitFor('target ERR', async () => (await replicasOf(vol)).find((r) => r.address === address)?.mode === 'ERR', 30_000, 50);
  // Restarted, the half-copied replica says so (an engine start takes it for no source) and is
  // no rebuild target either.
  const again = await newReplica(t, dir, 'replica-victim', size);
  const probe = await DataClient.connect({ port: again.port, secret: vol.secret, epoch: vol.epoch });
  assert.equal((await probe.info()).rebuilding, true);
  probe.close();
  await expectError(controlRequest(vol.controlSocket, 'POST', '/v1/replicas', { address: `127.0.0.1:${again.port}` }), /not empty/);
  again.child.kill('SIGKILL');
  qemuIo(vol.nbd, 'read -P 0x5c 0 192M', 'write -P 0x6d 0 1M', 'read -P 0x6d 0 1M');
  const info = (await controlRequest(vol.controlSocket, 'GET', '/v1/info')) as { rebuilding: boolean; faulted: boolean };
  assert.equal(info.rebuilding, false);
  assert.equal(info.faulted, false);

  // The dead one is taken out; a fresh one rebuilds fine.
  await controlRequest(vol.controlSocket, 'DELETE', `/v1/replicas/${encodeURIComponent(address)}`);
  assert.ok(!(await replicasOf(vol)).some((r) => r.address === address));
  const second = await newReplica(t, dir, 'replica-second', size);
  await controlRequest(vol.controlSocket, 'POST', '/v1/replicas', { address: `127.0.0.1:${second.port}` });
  await waitFor('second replica RW', async () => (await replicasOf(vol)).every((r) => r.mode === 'RW'), 120_000, 100);
  qemuIo(vol.nbd, 'flush');
  const digests = await Promise.all([...vol.replicas.map((r) => r.port), second.port].map((p) => replicaDigest(p, vol.secret, vol.epoch, size)));
  assert.equal(new Set(digests).size, 1);
});

test('bad replica-set changes are refused and change nothing; online expansion grows every replica', async (t) => {
  const dir = tempDir(t);
  const size = 64 * MiB;
  const vol = await startVolume(t, { dir, replicas: 1, sizeBytes: size });
  qemuIo(vol.nbd, 'write -P 0x42 0 32M', 'flush');
  const only = `127.0.0.1:${vol.replicas[0].port}`;
  const before = await replicasOf(vol);

  await expectError(controlRequest(vol.controlSocket, 'POST', '/v1/replicas', { address: only }), /already in volume/);
  await expectError(controlRequest(vol.controlSocket, 'POST', '/v1/replicas', {}), /address/);
  await expectError(controlRequest(vol.controlSocket, 'POST', '/v1/replicas', { address: 'no-port' }), /HOST:PORT/);
  await expectError(controlRequest(vol.controlSocket, 'DELETE', `/v1/replicas/${encodeURIComponent(only)}`), /last RW replica/);
  await expectError(controlRequest(vol.controlSocket, 'DELETE', '/v1/replicas/127.0.0.1%3A1'), /not in volume/);
  await expectError(controlRequest(vol.controlSocket, 'DELETE', '/v1/replicas/%E0%A4%A'), /bad escape/);
  await expectError(controlRequest(vol.controlSocket, 'POST', '/v1/expand', {}), /"sizeBytes" must be a number/);
  // A replica that holds data is not a rebuild target.
  const used = await newReplica(t, dir, 'replica-used', size);
  const direct = await DataClient.connect({ port: used.port, secret: vol.secret, epoch: vol.epoch });
  await direct.write(0, Buffer.alloc(4096, 1));
  direct.close();
  await expectError(controlRequest(vol.controlSocket, 'POST', '/v1/replicas', { address: `127.0.0.1:${used.port}` }), /not empty/);
  // A replica of another size is refused too (a smaller one would be grown: only larger fails).
  const big = await newReplica(t, dir, 'replica-big', 2 * size);
  await expectError(controlRequest(vol.controlSocket, 'POST', '/v1/replicas', { address: `127.0.0.1:${big.port}` }), /has 134217728 bytes/);
  // One rebuild at a time.
  const a = await newReplica(t, dir, 'replica-a', size);
  const b = await newReplica(t, dir, 'replica-b', size);
  await controlRequest(vol.controlSocket, 'POST', '/v1/replicas', { address: `127.0.0.1:${a.port}` });
  await expectError(controlRequest(vol.controlSocket, 'POST', '/v1/replicas', { address: `127.0.0.1:${b.port}` }), /one rebuild at a time/);
  await waitFor('a RW', async () => (await replicasOf(vol)).every((r) => r.mode === 'RW'), 60_000, 50);
  assert.deepEqual((await replicasOf(vol)).map((r) => r.address), [...before.map((r) => r.address), `127.0.0.1:${a.port}`]);

  // Online expansion.
  await expectError(controlRequest(vol.controlSocket, 'POST', '/v1/expand', { sizeBytes: size / 2 }), /cannot shrink/);
  await expectError(controlRequest(vol.controlSocket, 'POST', '/v1/expand', { sizeBytes: size + 1 }), /multiple of 4096/);
  const grown = (await controlRequest(vol.controlSocket, 'POST', '/v1/expand', { sizeBytes: 2 * size })) as { sizeBytes: number };
  assert.equal(grown.sizeBytes, 2 * size);
  for (const port of [vol.replicas[0].port, a.port]) {
    const c = await DataClient.connect({ port, secret: vol.secret, epoch: vol.epoch });
    const info = await c.info();
    assert.equal(info.sizeBytes, 2 * size);
    assert.ok((await c.read(size, 4 * MiB)).every((x) => x === 0), 'the new area reads zeros');
    assert.ok((await c.read(0, 4 * MiB)).every((x) => x === 0x42), 'the old data is intact');
    await c.write(2 * size - 4096, Buffer.alloc(4096, 7));
    c.close();
  }
});

test('a snapshot tree with a branch left by a revert is rebuilt whole: same snapshots, same parents, same data', async (t) => {
  const dir = tempDir(t);
  const size = 32 * MiB;
  const vol = await startVolume(t, { dir, replicas: 2, sizeBytes: size });
  const snap = (name: string) => controlRequest(vol.controlSocket, 'POST', '/v1/snapshots', { name });
  qemuIo(vol.nbd, 'write -P 0x11 0 4M', 'flush');
  await snap('s1');
  qemuIo(vol.nbd, 'write -P 0x22 4M 4M', 'write -z 0 1M', 'flush');
  await snap('s2');
  qemuIo(vol.nbd, 'write -P 0x33 8M 4M', 'flush');
  await controlRequest(vol.controlSocket, 'POST', '/v1/snapshots/s1/revert');
  qemuIo(vol.nbd, 'write -P 0x44 12M 4M', 'flush');
  await snap('s3');
  qemuIo(vol.nbd, 'write -P 0x55 16M 4M', 'write -z 2M 1M', 'flush');

  const fresh = await newReplica(t, dir, 'replica-tree', size);
  const address = `127.0.0.1:${fresh.port}`;
  await controlRequest(vol.controlSocket, 'POST', '/v1/replicas', { address });
  await waitFor('rebuilt', async () => {
    const r = (await replicasOf(vol)).find((x) => x.address === address)!;
    assert.notEqual(r.mode, 'ERR', r.reason ?? '');
    return r.mode === 'RW';
  }, 60_000, 20);
  qemuIo(vol.nbd, 'read -P 0x11 0 2M', 'read -P 0 2M 1M', 'read -P 0x11 3M 1M', 'read -P 0 4M 8M', 'read -P 0x44 12M 4M', 'read -P 0x55 16M 4M');

  const ports = [...vol.replicas.map((r) => r.port), fresh.port];
  for (const snapshot of [undefined, 's1', 's2', 's3']) {
    const digests = await Promise.all(ports.map((p) => replicaDigest(p, vol.secret, vol.epoch, size, snapshot)));
    assert.equal(new Set(digests).size, 1, `${snapshot ?? 'head'}: ${digests.join(' ')}`);
  }
  // The same tree: names, parents by name, which are in the live chain.
  const shape = async (port: number) => {
    const c = await DataClient.connect({ port, secret: vol.secret, epoch: vol.epoch });
    try {
      const list = await c.snapshotList();
      const nameOf = new Map(list.map((s) => [s.id, s.name]));
      return list.map((s) => `${s.name}<-${s.parent === null ? '-' : nameOf.get(s.parent) ?? '?'} ${s.inChain ? 'chain' : 'branch'}`).sort();
    } finally {
      c.close();
    }
  };
  const expected = await shape(vol.replicas[0].port);
  assert.deepEqual(expected, ['s1<-- chain', 's2<-s1 branch', 's3<-s1 chain']);
  assert.deepEqual(await shape(fresh.port), expected);
});

test('a rebuild bandwidth limit holds the copy of snapshots and live data to it; changed while it runs; bad values refused', async (t) => {
  const dir = tempDir(t);
  const size = 128 * MiB;
  const vol = await startVolume(t, { dir, replicas: 1, sizeBytes: size, extraArgs: ['--rebuild-max-mib-per-second', '16'] });
  qemuIo(vol.nbd, 'write -P 0x31 0 48M', 'flush');
  await controlRequest(vol.controlSocket, 'POST', '/v1/snapshots', { name: 's1' });
  qemuIo(vol.nbd, 'write -P 0x32 64M 48M', 'flush');
  const before = (await controlRequest(vol.controlSocket, 'GET', '/v1/info')) as { rebuildMaxBytesPerSecond: number };
  assert.equal(before.rebuildMaxBytesPerSecond, 16 * MiB);
  await expectError(controlRequest(vol.controlSocket, 'PUT', '/v1/rebuild-limit', { bytesPerSecond: -1 }), /whole number >= 0/);
  await expectError(controlRequest(vol.controlSocket, 'PUT', '/v1/rebuild-limit', { bytesPerSecond: '9' }), /whole number >= 0/);

  const fresh = await newReplica(t, dir, 'replica-new', size);
  const address = `127.0.0.1:${fresh.port}`;
  const started = performance.now();
  await controlRequest(vol.controlSocket, 'POST', '/v1/replicas', { address });
  // Progress counts every region passed: past the snapshot (48 MiB of data) and 96 MiB of the
  // live volume (32 MiB of the 48 written since s1), 80 MiB were written at 16 MiB/s: 5 s at
  // least (a region, 4 MiB, may run ahead of the limit).
  const copied = async (): Promise<number> => (await replicasOf(vol)).find((r) => r.address === address)?.rebuild?.copiedBytes ?? size * 2;
  await waitFor('the live data partly copied', async () => (await copied()) >= size + 96 * MiB, 60_000, 20);
  const atLimitMs = performance.now() - started;
  assert.ok(atLimitMs >= 4500, `80 MiB copied in ${Math.round(atLimitMs)} ms under a 16 MiB/s limit`);
  // Lifted while it runs: the rest goes at once.
  assert.deepEqual(await controlRequest(vol.controlSocket, 'PUT', '/v1/rebuild-limit', { bytesPerSecond: 0 }), { rebuildMaxBytesPerSecond: 0 });
  const lifted = performance.now();
  await waitFor('the new replica RW', async () => (await replicasOf(vol)).find((r) => r.address === address)?.mode === 'RW', 60_000, 20);
  assert.ok(performance.now() - lifted < 4000, `the rest took ${Math.round(performance.now() - lifted)} ms without a limit`);
  qemuIo(vol.nbd, 'flush');
  for (const snapshot of [undefined, 's1']) {
    const digests = await Promise.all([vol.replicas[0].port, fresh.port].map((p) => replicaDigest(p, vol.secret, vol.epoch, size, snapshot)));
    assert.equal(new Set(digests).size, 1, `${snapshot ?? 'head'}: ${digests.join(' ')}`);
  }
});
