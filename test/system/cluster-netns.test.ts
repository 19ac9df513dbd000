/**
 * Three nodes, each a network namespace with its own address, each running `zebu up --store
 * etcd://` against one etcd on the bridge between them (issue: a real cluster). A volume with
 * replicas on two nodes is attached on the third and used by qemu-io there; two more with a
 * replica on every node carry ext4 (nbdfuse + loop device) and fio --verify. Then:
 * - a node holding a replica dies with its whole process tree (SIGKILL): I/O goes on from the
 *   other replicas (ext4 writes, fio verifies every block, no client error), the node shows
 *   down, and the replicas are replaced on nodes that have room; fsck is clean;
 * - the node the volume is attached on — the leader too — is cut off (its link down) while its
 *   engine serves: another node takes the lead, the volume shows the node down and is attached
 *   on another node under a new epoch with every acknowledged write; a write the cut-off client
 *   issued after the cut never lands (the old engine is fenced), and when the link is back the
 *   old engine is stopped by its agent and the replicas end identical (verify);
 * - data locality: a volume with best-effort locality attached on a node without a replica gets
 *   one there (the remote one removed after), its data intact;
 * - the recurring backup of a detached volume with data locality, last attached on a node without
 *   a replica: the job backs it up there and no replica is built there; the backup restores.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import crypto from 'node:crypto';
import { run, mustRun } from '../support/volume-cluster.ts';
import { loopOnVolume, type VolumeLoop } from '../support/loop-device.ts';
import { fioFigures, fioVerifyArgs, startFio } from '../support/fio.ts';
import { startEtcd } from '../support/etcd-server.ts';
import { makeNetwork, netnsUnavailable, qemuIoOn } from '../support/netns.ts';
import { startZebuUp, stopZebuUp, zebu, mustZebu, mustZebuJson, zebuDataDir, waitFor, processesUnder, killAllUnder, type ZebuUp } from '../support/zebu-up.ts';

const unavailable = netnsUnavailable();

interface NodeRow { name: string; ready: boolean; leader: boolean }
interface ReplicaRow { name: string; nodeId: string; mode: string | null; failedAt: string | null }

test('three nodes in network namespaces: a node killed, the attach node (and leader) cut off; I/O goes on, the volume moves, the old engine is fenced', { skip: unavailable ?? false, timeout: 600_000 }, async (t) => {
  // Clean-ups run in the order they are registered: the file system goes first, while the
  // volume under it is still served (a loop device over a dead export would hang its umount).
  let ext4: VolumeLoop | null = null;
  const ext4Dir = fs.mkdtempSync(path.join(os.tmpdir(), 'zx-'));
  t.after(() => {
    ext4?.close();
    fs.rmSync(ext4Dir, { recursive: true, force: true });
  });
  const network = makeNetwork(t, 3);
  const dirs = [zebuDataDir(t), zebuDataDir(t), zebuDataDir(t)];
  const etcdDir = path.join(path.dirname(dirs[0]), 'etcd');
  fs.mkdirSync(etcdDir);
  const etcd = await startEtcd(t, etcdDir, 'etcd-netns', undefined, network.hostAddress);
  const store = `etcd://${new URL(etcd.endpoint).host}`;
  const [h1, h2, h3] = network.hosts;
  const ups: ZebuUp[] = [];
  for (let i = 0; i < 3; i++) {
    // The usual ports: every node has its own address. Fixed, as a user runs it: the API keeps its
    // address when the node starts or stops leading.
    const up = await startZebuUp({ dataDir: dirs[i], store, node: `node-${i + 1}`, netns: network.hosts[i].netns, address: network.hosts[i].address, disks: 2, apiPort: 9500, nbdPort: 10809 });
    ups.push(up);
    t.after(() => stopZebuUp(up));
  }
  const [one, two, three] = ups;
  assert.equal(one.leader, true);
  await waitFor('three nodes up', () => {
    const list = mustZebuJson(one, ['node', 'list']) as NodeRow[];
    return list.length === 3 && list.every((n) => n.ready) ? list : undefined;
  }, 30_000);
  mustZebu(one, ['setting', 'set', 'replica-replenishment-wait-seconds', '5']);

  // Replicas on node-2 and node-3; attached on node-1, which holds none (its client is there).
  mustZebu(one, ['node', 'update', 'node-1', '--scheduling', 'off']);
  mustZebu(one, ['volume', 'create', 'nv', '--size', '64MiB', '--replicas', '2']);
  mustZebu(one, ['node', 'update', 'node-1', '--scheduling', 'on']);
  const uri1 = mustZebu(one, ['volume', 'attach', 'nv', '--node', 'node-1']).trim();
  assert.ok(uri1.startsWith(`nbd://${h1.address}:`), uri1);
  qemuIoOn(h1, uri1, 'write -P 0x11 0 16M', 'flush');
  const placed = mustZebuJson(one, ['replica', 'list', '--volume', 'nv']) as ReplicaRow[];
  assert.deepEqual(placed.map((r) => r.nodeId).sort(), ['node-2', 'node-3']);
  // Two volumes with a replica on each node, attached on node-1: ext4 (through nbdfuse and a loop
  // device here) and fio --verify (on node-1), both busy while node-3 dies.
  for (const v of ['fx', 'fv']) mustZebu(one, ['volume', 'create', v, '--size', '64MiB', '--replicas', '3']);
  assert.deepEqual((mustZebuJson(one, ['replica', 'list', '--volume', 'fx']) as ReplicaRow[]).map((r) => r.nodeId).sort(), ['node-1', 'node-2', 'node-3']);
  const fxUri = mustZebu(one, ['volume', 'attach', 'fx', '--node', 'node-1']).trim();
  const fvUri = mustZebu(one, ['volume', 'attach', 'fv', '--node', 'node-1']).trim();
  // Its mount lives outside every node's directory: a node's clean-up must not reach into it.
  const fsLoop = await loopOnVolume(fxUri, ext4Dir);
  ext4 = fsLoop;
  mustRun('mkfs.ext4', ['-q', '-F', fsLoop.loop]);
  mustRun('mount', [fsLoop.loop, fsLoop.mnt]);
  const sums = new Map<string, string>();
  const writeFiles = (from: number, to: number): void => {
    for (let i = from; i < to; i++) {
      const body = crypto.randomBytes(128 * 1024 + i * 4099);
      fs.writeFileSync(path.join(fsLoop.mnt, `f${i}`), body);
      sums.set(`f${i}`, crypto.createHash('sha256').update(body).digest('hex'));
    }
    mustRun('sync', []);
  };
  writeFiles(0, 15);
  const verifier = startFio(t, fioVerifyArgs(fvUri, { sizeMiB: 48, seed: 7 }), h1.netns);

  // node-3 dies with everything it ran.
  await new Promise((resolve) => setTimeout(resolve, 1000));
  await killAllUnder(path.dirname(dirs[2]));
  writeFiles(15, 30);
  const fioDone = await verifier.exit;
  assert.equal(fioDone.code, 0, fioDone.stderr);
  assert.equal(fioFigures(fioDone.stdout).error, 0, 'fio --verify: no I/O error, every block as written');
  qemuIoOn(h1, uri1, 'read -P 0x11 0 16M', 'write -P 0x22 16M 16M', 'flush');
  await waitFor('node-3 down', () => (mustZebuJson(one, ['node', 'list']) as NodeRow[]).find((n) => n.name === 'node-3')?.ready === false || undefined, 40_000);
  const healed = await waitFor('its replica replaced on node-1', () => {
    const v = mustZebuJson(one, ['volume', 'get', 'nv']);
    const live = (mustZebuJson(one, ['replica', 'list', '--volume', 'nv']) as ReplicaRow[]).filter((r) => r.failedAt === null);
    return v.robustness === 'healthy' && live.length === 2 && live.every((r) => r.mode === 'RW') ? live : undefined;
  }, 120_000, 500);
  assert.deepEqual(healed.map((r) => r.nodeId).sort(), ['node-1', 'node-2'], 'the node with room took it');
  qemuIoOn(h1, uri1, 'read -P 0x11 0 16M', 'read -P 0x22 16M 16M', 'write -P 0x33 32M 8M', 'flush');
  for (const v of ['fx', 'fv']) {
    let last = '';
    await waitFor(`${v} healthy again`, () => {
      const x = mustZebuJson(one, ['volume', 'get', v]);
      last = JSON.stringify({ robustness: x.robustness, message: x.message, replicas: x.replicas });
      return x.robustness === 'healthy' && x.replicas.filter((r: ReplicaRow) => r.failedAt === null).length === 3 || undefined;
    }, 120_000, 500).catch((e: Error) => {
      const why = `${e.message}: ${last}\n${JSON.stringify((mustZebuJson(one, ['events', '--volume', v]) as unknown[]).slice(0, 20))}`;
      process.stderr.write(`${why}\n`);
      throw new Error(why);
    });
  }
  // The file system: clean, every file as written; then both volumes let go before node-1 is cut off.
  mustRun('umount', [fsLoop.mnt]);
  const fsck = run('fsck.ext4', ['-n', '-f', fsLoop.loop]);
  assert.equal(fsck.status, 0, fsck.stdout + fsck.stderr);
  mustRun('mount', [fsLoop.loop, fsLoop.mnt]);
  for (const [file, sum] of sums) assert.equal(crypto.createHash('sha256').update(fs.readFileSync(path.join(fsLoop.mnt, file))).digest('hex'), sum, file);
  fsLoop.close();
  ext4 = null;
  for (const v of ['fx', 'fv']) mustZebu(one, ['volume', 'detach', v]);

  // node-1 — the attach node, and the leader — is cut off while its engine serves. Its client
  // writes on: that write is never acknowledged, and must never land.
  const enginePid = processesUnder(path.dirname(dirs[0])).find((p) => p.role === 'engine')?.pid;
  assert.ok(enginePid !== undefined, 'node-1 runs the engine');
  h1.cut();
  const stray = spawn('ip', ['netns', 'exec', h1.netns, 'qemu-io', '-f', 'raw', '-c', 'write -P 0x55 40M 4M', '-c', 'flush', uri1], { stdio: 'ignore' });
  t.after(() => stray.kill('SIGKILL'));
  const cli = { api: two.api, token: two.token };
  let lastList = '';
  await waitFor('node-2 leads, node-1 down', () => {
    const r = zebu(cli, ['node', 'list', '--json'], { timeoutMs: 10_000 });
    lastList = `${r.status} ${r.stdout} ${r.stderr}`;
    if (r.status !== 0) return undefined;
    const list = JSON.parse(r.stdout) as NodeRow[];
    return list.find((n) => n.name === 'node-1')?.ready === false && list.find((n) => n.name === 'node-2')?.leader === true ? list : undefined;
  }, 90_000, 500).catch((e: Error) => {
    throw new Error(`${e.message}; last: ${lastList}\nnode-2: ${two.stderr().slice(-3000)}`);
  });
  const unknown = await waitFor('the volume says its node is down', () => {
    const v = mustZebuJson(cli, ['volume', 'get', 'nv']);
    return v.robustness === 'unknown' && /node node-1 is down/.test(v.message ?? '') ? v : undefined;
  }, 30_000, 500);
  assert.equal(unknown.nodeId, 'node-1');
  const moved = zebu(cli, ['volume', 'attach', 'nv', '--node', 'node-2']);
  assert.equal(moved.status, 0, moved.stderr);
  const uri2 = moved.stdout.trim();
  assert.ok(uri2.startsWith(`nbd://${h2.address}:`), uri2);
  const after = mustZebuJson(cli, ['volume', 'get', 'nv']);
  assert.ok(after.epoch > unknown.epoch, `a new epoch (${unknown.epoch} -> ${after.epoch})`);
  qemuIoOn(h2, uri2, 'read -P 0x11 0 16M', 'read -P 0x22 16M 16M', 'read -P 0x33 32M 8M', 'read -P 0 40M 4M', 'write -P 0x44 40M 4M', 'flush');

  // The link is back: node-1's agent sees its engine let go and stops it; nothing it held lands.
  h1.join();
  await waitFor('node-1 up again', () => (mustZebuJson(cli, ['node', 'list']) as NodeRow[]).find((n) => n.name === 'node-1')?.ready === true || undefined, 60_000, 500);
  await waitFor('the old engine stopped', () => processesUnder(path.dirname(dirs[0])).every((p) => p.pid !== enginePid) || undefined, 60_000, 500);
  let seen = '';
  await waitFor('healthy on node-2 with two replicas', () => {
    const v = mustZebuJson(cli, ['volume', 'get', 'nv']);
    const all = mustZebuJson(cli, ['replica', 'list', '--volume', 'nv']) as ReplicaRow[];
    seen = JSON.stringify({ v, all });
    const live = all.filter((r) => r.failedAt === null);
    return v.state === 'attached' && v.nodeId === 'node-2' && v.robustness === 'healthy' && live.length === 2 && live.every((r) => r.mode === 'RW') ? v : undefined;
  }, 120_000, 500).catch((e: Error) => {
    throw new Error(`${e.message}: ${seen}\n${JSON.stringify(mustZebuJson(cli, ['events']).slice(0, 30))}`);
  });
  stray.kill('SIGKILL');
  qemuIoOn(h2, uri2, 'read -P 0x11 0 16M', 'read -P 0x22 16M 16M', 'read -P 0x33 32M 8M', 'read -P 0x44 40M 4M');
  const verify = zebu(cli, ['volume', 'verify', 'nv']);
  assert.equal(verify.status, 0, verify.stdout + verify.stderr);
  const reasons = (mustZebuJson(cli, ['events']) as { reason: string; object: string }[]).map((e) => `${e.reason}:${e.object}`);
  for (const r of ['NodeDown:node-3', 'NodeDown:node-1', 'NodeUp:node-1', 'AttachMoved:nv', 'EngineAbandoned:nv']) assert.ok(reasons.includes(r), `${r} in ${reasons.join(', ')}`);
  void three;

  // Data locality: a volume whose replica is on node-2, attached on node-1, gets its replica on node-1.
  mustZebu(cli, ['node', 'update', 'node-1', '--scheduling', 'off']);
  mustZebu(cli, ['volume', 'create', 'loc', '--size', '32MiB', '--replicas', '1', '--data-locality', 'best-effort']);
  mustZebu(cli, ['node', 'update', 'node-1', '--scheduling', 'on']);
  assert.deepEqual((mustZebuJson(cli, ['replica', 'list', '--volume', 'loc']) as ReplicaRow[]).map((r) => r.nodeId), ['node-2']);
  const locUri = mustZebu(cli, ['volume', 'attach', 'loc', '--node', 'node-1']).trim();
  qemuIoOn(h1, locUri, 'write -P 0x66 0 32M', 'flush');
  await waitFor('loc\'s replica on node-1', () => {
    const all = (mustZebuJson(cli, ['replica', 'list', '--volume', 'loc']) as ReplicaRow[]);
    return all.length === 1 && all[0].nodeId === 'node-1' && all[0].mode === 'RW' || undefined;
  }, 120_000, 500);
  qemuIoOn(h1, locUri, 'read -P 0x66 0 32M');
  assert.ok((mustZebuJson(cli, ['events']) as { reason: string }[]).some((e) => e.reason === 'DataLocality'));

  // The recurring backup of a detached volume with data locality: last attached by its workload
  // on node-1, which could take no replica then, the volume is backed up there by the job (its
  // engine reads the replicas on node-2 over the network), and no replica is built on node-1 for
  // the job, though node-1 could take one by then.
  mustZebu(cli, ['backup-target', 'set', `file://${path.join(ext4Dir, 'backups')}`]);
  mustZebu(cli, ['node', 'update', 'node-1', '--scheduling', 'off']);
  mustZebu(cli, ['volume', 'create', 'bl', '--size', '32MiB', '--replicas', '2', '--data-locality', 'best-effort']);
  const blUri = mustZebu(cli, ['volume', 'attach', 'bl', '--node', 'node-1']).trim();
  qemuIoOn(h1, blUri, 'write -P 0x77 0 24M', 'flush');
  await waitFor('locality saying node-1 can take none', () => (mustZebuJson(cli, ['events', '--volume', 'bl']) as { message: string }[]).some((e) => /^data locality: node node-1 cannot take a replica of volume bl/.test(e.message)) || undefined, 30_000, 500);
  mustZebu(cli, ['volume', 'detach', 'bl']);
  await waitFor('bl detached', () => mustZebuJson(cli, ['volume', 'get', 'bl']).state === 'detached' || undefined, 60_000, 200);
  mustZebu(cli, ['node', 'update', 'node-1', '--scheduling', 'on']);
  const blReplicas = (mustZebuJson(cli, ['replica', 'list', '--volume', 'bl']) as ReplicaRow[]).map((r) => `${r.name}@${r.nodeId}`).sort();
  // node-3 is dead by now: both on node-2 (soft anti-affinity), none on node-1.
  assert.deepEqual(blReplicas.map((r) => r.split('@')[1]), ['node-2', 'node-2']);
  mustZebu(cli, ['setting', 'set', 'allow-recurring-job-while-volume-detached', 'true']);
  mustZebu(cli, ['recurring-job', 'create', 'bk', '--task', 'backup', '--cron', '*/2 * * * * *', '--retain', '1']);
  mustZebu(cli, ['volume', 'update', 'bl', '--recurring-job', 'bk']);
  const backup = await waitFor('a backup of bl', () => (mustZebuJson(cli, ['backup', 'list', '--volume', 'bl']) as { name: string; state: string }[]).find((b) => b.state === 'completed'), 120_000, 500);
  mustZebu(cli, ['recurring-job', 'delete', 'bk']);
  await waitFor('bl detached after its job', () => mustZebuJson(cli, ['volume', 'get', 'bl']).state === 'detached' || undefined, 60_000, 200);
  const blEvents = mustZebuJson(cli, ['events', '--volume', 'bl']) as { reason: string; message: string }[];
  assert.ok(blEvents.some((e) => e.reason === 'JobAttached' && / on node node-1 /.test(e.message)), `the job attached bl on node-1: ${JSON.stringify(blEvents.filter((e) => e.reason === 'JobAttached'))}`);
  assert.ok(!blEvents.some((e) => e.reason === 'DataLocality'), 'no replica moved for the job');
  assert.deepEqual((mustZebuJson(cli, ['replica', 'list', '--volume', 'bl']) as ReplicaRow[]).map((r) => `${r.name}@${r.nodeId}`).sort(), blReplicas, 'the same replicas, none on node-1');
  mustZebu(cli, ['volume', 'create', 'blr', '--from-backup', backup.name, '--replicas', '1']);
  await waitFor('the restore of bl', () => mustZebuJson(cli, ['volume', 'get', 'blr']).restore?.state === 'completed' || undefined, 120_000, 500);
  await waitFor('blr detached', () => mustZebuJson(cli, ['volume', 'get', 'blr']).state === 'detached' || undefined, 60_000, 200);
  qemuIoOn(h1, mustZebu(cli, ['volume', 'attach', 'blr', '--node', 'node-1']).trim(), 'read -P 0x77 0 24M', 'read -P 0 24M 8M');
});
