/**
 * Two nodes on one etcd (issue: a real cluster, first steps): each runs `zebu up --store etcd://`
 * with its own data directory; one leads (runs the controllers and the API), the other waits. The
 * cluster's API token and data secret come from the store, so both nodes hold the same ones; a
 * volume's replicas go to both nodes (the engine reaches the other node's replica over TCP). The
 * leader's `zebu up` SIGKILLed: the other node takes over the controllers and the API within the
 * leader lease's TTL while the data path serves on; the old leader started again waits as a
 * follower, re-adopts its processes, and the volume is healthy with its data. Snapshots of a volume
 * attached on the node that does not lead go through that node's agent (the cluster token guards it), and
 * so do its backups (a data tunnel to its engine).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { run, freePort } from '../support/volume-cluster.ts';
import { startEtcd } from '../support/etcd-server.ts';
import { startZebuUp, stopZebuUp, zebu, mustZebu, mustZebuJson, zebuDataDir, waitFor, processesUnder } from '../support/zebu-up.ts';

function qemuIo(uri: string, ...commands: string[]): void {
  const r = run('qemu-io', ['-f', 'raw', ...commands.flatMap((c) => ['-c', c]), uri], { timeoutMs: 120_000 });
  assert.equal(r.status, 0, r.stdout + r.stderr);
  assert.doesNotMatch(r.stdout + r.stderr, /verification failed|error/i);
}

test('two nodes on etcd: one leads, secrets shared, replicas on both; the leader killed, the other takes over; the old one comes back as a follower', async (t) => {
  const dir1 = zebuDataDir(t);
  const dir2 = zebuDataDir(t);
  const etcdDir = path.join(path.dirname(dir1), 'etcd');
  fs.mkdirSync(etcdDir);
  const etcd = await startEtcd(t, etcdDir);
  const store = `etcd://${new URL(etcd.endpoint).host}`;
  const nbd1 = await freePort();
  const api2 = await freePort();

  const one = await startZebuUp({ dataDir: dir1, store, node: 'node-1', nbdPort: nbd1 });
  assert.equal(one.leader, true);
  const two = await startZebuUp({ dataDir: dir2, store, node: 'node-2', apiPort: api2 });
  t.after(() => stopZebuUp(two));
  assert.equal(two.leader, false, 'the second node waits');
  assert.equal(two.api, `http://127.0.0.1:${api2}`, 'its API address passes requests on to the leader');
  assert.equal(two.token, one.token, 'the API token is the cluster\'s');
  assert.equal(fs.readFileSync(path.join(dir2, 'secret'), 'utf8'), fs.readFileSync(path.join(dir1, 'secret'), 'utf8'), 'so is the data secret');
  const nodes = await waitFor('both nodes up', () => {
    const list = mustZebuJson(one, ['node', 'list']) as { name: string; ready: boolean; leader: boolean }[];
    return list.length === 2 && list.every((n) => n.ready) ? list : undefined;
  }, 30_000);
  assert.deepEqual(nodes.map((n) => `${n.name}${n.leader ? ' (leader)' : ''}`).sort(), ['node-1 (leader)', 'node-2']);

  mustZebu(one, ['volume', 'create', 'cv', '--size', '64MiB', '--replicas', '2']);
  const uri = mustZebu(one, ['volume', 'attach', 'cv']).trim();
  qemuIo(uri, 'write -P 0x4c 0 16M', 'flush');
  const replicas = mustZebuJson(one, ['replica', 'list', '--volume', 'cv']) as { name: string; nodeId: string; mode: string }[];
  assert.deepEqual(replicas.map((r) => r.nodeId).sort(), ['node-1', 'node-2'], 'a replica on each node');
  assert.ok(replicas.every((r) => r.mode === 'RW'), JSON.stringify(replicas));
  assert.deepEqual(mustZebuJson(two, ['replica', 'list', '--volume', 'cv']), replicas, 'asked on node-2: the leader answers');
  const wrong = await fetch(`${two.api}/v1/volumes`, { headers: { authorization: 'Bearer wrong' } });
  assert.equal(wrong.status, 401, 'the leader checks the token of a passed-on request');
  // The web UI and its live feed through node-2 too: the stream is passed on as it comes.
  assert.match(await (await fetch(`${two.api}/`)).text(), /<script type="module" src="\/ui\/app.js">/);
  const following = new AbortController();
  const stream = await fetch(`${two.api}/v1/stream/volumes`, { headers: { authorization: `Bearer ${two.token}` }, signal: following.signal });
  assert.equal(stream.status, 200);
  const reader = stream.body!.pipeThrough(new TextDecoderStream()).getReader();
  let received = '';
  while (!received.includes('\n\n')) {
    const chunk = await reader.read();
    assert.ok(!chunk.done, `the stream ended early: ${received}`);
    received += chunk.value;
  }
  assert.match(received, /^event: snapshot\ndata: \[.*"name":"cv"/);
  following.abort();

  // A volume attached on the node that does not lead: the leader reaches its engine through node-2's agent.
  mustZebu(one, ['volume', 'create', 'far', '--size', '32MiB', '--replicas', '1']);
  const farUri = mustZebu(one, ['volume', 'attach', 'far', '--node', 'node-2']).trim();
  assert.match(farUri, new RegExp(`^nbd://${two.nbd.replace(/\./g, '\\.')}/far$`), 'served by node-2\'s frontend');
  qemuIo(farUri, 'write -P 0x6e 0 4M', 'flush');
  mustZebu(one, ['snapshot', 'create', 'far', 'from-the-leader']);
  assert.deepEqual((mustZebuJson(one, ['snapshot', 'list', 'far']) as { name: string }[]).map((s) => s.name), ['from-the-leader']);
  // Backed up by the leader through node-2's agent (a data tunnel to the engine), restored: the same bytes.
  mustZebu(one, ['backup-target', 'set', `file://${path.join(path.dirname(dir1), 'backups')}`]);
  const backup = mustZebuJson(one, ['backup', 'create', 'far']);
  assert.equal(backup.state, 'completed', JSON.stringify(backup));
  const restored = mustZebuJson(one, ['backup', 'restore', backup.name, '--to', 'far-copy', '--replicas', '1']);
  assert.equal(restored.restore.state, 'completed', JSON.stringify(restored));
  qemuIo(mustZebu(one, ['volume', 'attach', 'far-copy']).trim(), 'read -P 0x6e 0 4M', 'read -P 0 4M 28M');

  // The agent's endpoint serves only the cluster: no token or a wrong one is refused, bad requests too.
  const endpoint = (mustZebuJson(one, ['node', 'list']) as { name: string; agentEndpoint: string | null }[]).find((n) => n.name === 'node-2')?.agentEndpoint ?? null;
  assert.ok(endpoint !== null, 'node-2 says where its agent is');
  const ask = (token: string | null, body: unknown): Promise<Response> => fetch(`http://${endpoint}/v1/engines/far/request`, {
    method: 'POST', headers: token === null ? {} : { authorization: `Bearer ${token}` }, body: JSON.stringify(body),
  });
  assert.equal((await ask(null, { method: 'GET', path: '/v1/snapshots' })).status, 401);
  assert.equal((await ask('wrong', { method: 'GET', path: '/v1/snapshots' })).status, 401);
  assert.equal((await ask(two.token, { method: 'GET', path: '../etc/passwd' })).status, 400);
  assert.equal((await ask(two.token, { method: 'PATCH', path: '/v1/snapshots' })).status, 400);
  // A data tunnel with a wrong token is refused before it reaches the engine.
  const tunnel = await new Promise<string>((resolve) => {
    const socket = net.createConnection(Number(endpoint!.split(':')[1]), '127.0.0.1', () => socket.write('GET /v1/engines/far/data HTTP/1.1\r\nhost: x\r\nauthorization: Bearer wrong\r\nupgrade: zebu-data\r\nconnection: upgrade\r\n\r\n'));
    let got = '';
    socket.on('data', (d) => (got += d.toString()));
    socket.on('close', () => resolve(got));
    socket.on('error', () => resolve(got));
  });
  assert.match(tunnel, /^HTTP\/1\.1 401/);
  const listed = await ask(two.token, { method: 'GET', path: '/v1/snapshots' });
  assert.equal(listed.status, 200);

  // The leader's `zebu up` dies; its data path does not.
  one.child.kill('SIGKILL');
  await one.exited;
  const killedAt = Date.now();
  qemuIo(uri, 'read -P 0x4c 0 16M', 'write -P 0x5d 16M 8M', 'flush');
  const takeover = { api: `http://127.0.0.1:${api2}`, token: two.token };
  await waitFor('node-2 serving the API', async () => (await fetch(`${takeover.api}/v1/volumes`, { headers: { authorization: `Bearer ${two.token}` } }).then((r) => r.ok, () => false)) || undefined, 40_000, 200);
  const tookMs = Date.now() - killedAt;
  assert.ok(tookMs < 30_000, `took over in ${tookMs} ms`);
  const volume = mustZebuJson(takeover, ['volume', 'get', 'cv']) as { state: string; replicas: unknown[] };
  assert.equal(volume.replicas.length, 2);
  assert.deepEqual((mustZebuJson(takeover, ['node', 'list']) as { name: string; leader: boolean }[]).filter((n) => n.leader).map((n) => n.name), ['node-2']);
  const events = mustZebuJson(takeover, ['events']) as { reason: string; object: string }[];
  assert.ok(events.some((e) => e.reason === 'LeaderElected' && e.object === 'node-2'), JSON.stringify(events.map((e) => e.reason)));

  // The new leader cannot reach node-1's engine while node-1's agent is down.
  const away = zebu(takeover, ['snapshot', 'create', 'cv', 'while-away']);
  assert.notEqual(away.status, 0);
  assert.match(away.stderr, /agent of node node-1 .*cannot be reached|did not answer/);

  // node-1 again: a follower now, with the processes it had.
  const enginesBefore = processesUnder(dir1).filter((p) => p.role === 'engine').map((p) => p.pid);
  const again = await startZebuUp({ dataDir: dir1, store, node: 'node-1', nbdPort: nbd1 });
  t.after(() => stopZebuUp(again));
  assert.equal(again.leader, false);
  assert.equal(again.nbd, one.nbd);
  assert.equal((mustZebuJson(again, ['volume', 'get', 'cv']) as { name: string }).name, 'cv', 'node-1\'s API address now passes requests on to node-2');
  await waitFor('the volume healthy', () => {
    const v = mustZebuJson(takeover, ['volume', 'get', 'cv']);
    return v.state === 'attached' && v.robustness === 'healthy' ? v : undefined;
  }, 60_000);
  assert.deepEqual(processesUnder(dir1).filter((p) => p.role === 'engine').map((p) => p.pid), enginesBefore, 'its engine re-adopted, not restarted');
  qemuIo(uri, 'read -P 0x4c 0 16M', 'read -P 0x5d 16M 8M');
  // Its agent is back (at a new port): the leader on node-2 reaches its engine again.
  await waitFor('a snapshot of a volume on node-1 taken from node-2', () => zebu(takeover, ['snapshot', 'create', 'cv', 'from-node-2']).status === 0, 30_000, 500);
  assert.deepEqual((mustZebuJson(takeover, ['snapshot', 'list', 'cv']) as { name: string }[]).map((s) => s.name), ['from-node-2']);
});
