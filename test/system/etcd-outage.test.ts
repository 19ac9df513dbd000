/**
 * Zebu on a three-member etcd (issue: a real cluster): two nodes, a volume with a replica on each,
 * attached on node-1 and used by qemu-io. One etcd member SIGKILLed: nothing stops (the control
 * plane goes on with the quorum left). Then every member killed, for longer than the node and
 * leader leases: the data path serves on (reads and writes, no client error), the control plane
 * answers clearly that it cannot reach its store; etcd back: a leader again, both nodes up, the
 * volume healthy and attached where it was, snapshots work again, the replicas identical.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { run, freePort } from '../support/volume-cluster.ts';
import { startEtcdCluster } from '../support/etcd-server.ts';
import { startZebuUp, stopZebuUp, zebu, mustZebu, mustZebuJson, zebuDataDir, waitFor } from '../support/zebu-up.ts';

function qemuIo(uri: string, ...commands: string[]): void {
  const r = run('qemu-io', ['-f', 'raw', ...commands.flatMap((c) => ['-c', c]), uri], { timeoutMs: 120_000 });
  assert.equal(r.status, 0, r.stdout + r.stderr);
  assert.doesNotMatch(r.stdout + r.stderr, /verification failed|error/i);
}

interface NodeRow { name: string; ready: boolean; leader: boolean }

test('a three-member etcd: one member lost, nothing stops; all of etcd down for a while, the data path serves on and the control plane recovers', { timeout: 600_000 }, async (t) => {
  const dir1 = zebuDataDir(t);
  const dir2 = zebuDataDir(t);
  const etcdDir = path.join(path.dirname(dir1), 'etcd');
  fs.mkdirSync(etcdDir);
  const etcd = await startEtcdCluster(t, etcdDir, 3);
  const store = `etcd://${etcd.endpoints.map((e) => new URL(e).host).join(',')}`;
  const api1 = await freePort();
  const api2 = await freePort();
  const one = await startZebuUp({ dataDir: dir1, store, node: 'node-1', apiPort: api1 });
  t.after(() => stopZebuUp(one));
  const two = await startZebuUp({ dataDir: dir2, store, node: 'node-2', apiPort: api2 });
  t.after(() => stopZebuUp(two));
  await waitFor('both nodes up', () => {
    const list = mustZebuJson(one, ['node', 'list']) as NodeRow[];
    return list.length === 2 && list.every((n) => n.ready) ? list : undefined;
  }, 30_000);
  mustZebu(one, ['volume', 'create', 'ev', '--size', '64MiB', '--replicas', '2']);
  const uri = mustZebu(one, ['volume', 'attach', 'ev', '--node', 'node-1']).trim();
  qemuIo(uri, 'write -P 0x21 0 16M', 'flush');

  // One member of three gone: the control plane goes on.
  await etcd.kill(0);
  mustZebu(one, ['snapshot', 'create', 'ev', 'one-member-down']);
  mustZebu(two, ['volume', 'create', 'ev2', '--size', '16MiB', '--replicas', '2']);
  qemuIo(mustZebu(two, ['volume', 'attach', 'ev2', '--node', 'node-2']).trim(), 'write -P 0x31 0 16M', 'flush', 'read -P 0x31 0 16M');
  qemuIo(uri, 'write -P 0x22 16M 16M', 'flush');

  // All of etcd down, longer than the leader's and the nodes' leases: the data path serves on.
  await etcd.kill(1);
  await etcd.kill(2);
  const downAt = Date.now();
  let round = 0;
  while (Date.now() - downAt < 25_000) {
    const offset = 32 + (round % 4) * 8;
    qemuIo(uri, 'read -P 0x21 0 16M', `write -P ${0x40 + round} ${offset}M 8M`, 'flush', `read -P ${0x40 + round} ${offset}M 8M`);
    round++;
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
  const lastRounds = new Map<number, number>();
  for (let r = 0; r < round; r++) lastRounds.set(32 + (r % 4) * 8, 0x40 + r);
  // The control plane says it cannot reach its store, in a bounded time, and changes nothing.
  const refused = zebu(one, ['snapshot', 'create', 'ev', 'while-etcd-is-down'], { timeoutMs: 60_000 });
  assert.notEqual(refused.status, 0, 'no store: no snapshot');
  assert.match(refused.stderr, /etcd|store|leader|unavailable|cannot reach/i, refused.stderr);

  // etcd back: a leader again, both nodes up, the volume as it was.
  await etcd.restart([0, 1, 2]);
  const cli = await waitFor('an API answering again', async () => {
    for (const up of [one, two]) {
      const r = zebu(up, ['node', 'list', '--json'], { timeoutMs: 10_000 });
      if (r.status !== 0) continue;
      const list = JSON.parse(r.stdout) as NodeRow[];
      if (list.length === 2 && list.every((n) => n.ready) && list.some((n) => n.leader)) return up;
    }
    return undefined;
  }, 90_000, 1000);
  const volume = await waitFor('the volume attached and healthy', () => {
    const v = mustZebuJson(cli, ['volume', 'get', 'ev']);
    return v.state === 'attached' && v.robustness === 'healthy' ? v : undefined;
  }, 60_000, 500);
  assert.equal(volume.nodeId, 'node-1');
  assert.equal(volume.endpoint, uri, 'the same export');
  await waitFor('a snapshot again', () => zebu(cli, ['snapshot', 'create', 'ev', 'etcd-is-back']).status === 0 || undefined, 60_000, 1000);
  assert.deepEqual((mustZebuJson(cli, ['snapshot', 'list', 'ev']) as { name: string }[]).map((s) => s.name).sort(), ['etcd-is-back', 'one-member-down']);
  const checks = ['read -P 0x21 0 16M', 'read -P 0x22 16M 16M', ...[...lastRounds].map(([offset, pattern]) => `read -P ${pattern} ${offset}M 8M`)];
  qemuIo(uri, ...checks);
  const verify = zebu(cli, ['volume', 'verify', 'ev']);
  assert.equal(verify.status, 0, verify.stdout + verify.stderr);
});
