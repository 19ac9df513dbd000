/**
 * `zebu up` as a new user meets it, through the real CLI and real NBD clients: create, attach,
 * write and verify with qemu-io, detach, attach again (data intact), snapshots, online and
 * offline expansion, delete (replica directories gone), and bad requests that change nothing.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { run } from '../support/volume-cluster.ts';
import { startZebuUp, stopZebuUp, zebu, mustZebu, mustZebuJson, zebuDataDir, waitFor, processesUnder } from '../support/zebu-up.ts';

const MiB = 1024 * 1024;

function qemuIo(uri: string, ...commands: string[]): string {
  const r = run('qemu-io', ['-f', 'raw', ...commands.flatMap((c) => ['-c', c]), uri], { timeoutMs: 120_000 });
  assert.equal(r.status, 0, `qemu-io ${commands.join('; ')}: ${r.stdout}${r.stderr}`);
  assert.doesNotMatch(r.stdout + r.stderr, /Pattern verification failed|error/i, r.stdout + r.stderr);
  return r.stdout;
}

test('a new user: create, attach, write, detach, attach again, data intact; snapshots; expand; delete', async (t) => {
  const dataDir = zebuDataDir(t);
  const up = await startZebuUp({ dataDir });
  t.after(() => stopZebuUp(up));

  // The token file is private.
  assert.equal(fs.statSync(path.join(dataDir, 'token')).mode & 0o777, 0o600);

  const created = mustZebu(up, ['volume', 'create', 'v1', '--size', '1GiB', '--replicas', '3']);
  assert.match(created, /v1/);
  const v1 = mustZebuJson(up, ['volume', 'get', 'v1']);
  assert.equal(v1.state, 'detached');
  assert.equal(v1.sizeBytes, 1024 * MiB);
  assert.equal(v1.replicas.length, 3);
  assert.equal(new Set(v1.replicas.map((r: { diskId: string }) => r.diskId)).size, 3, 'three distinct disks');

  const uri = mustZebu(up, ['volume', 'attach', 'v1']).trim();
  assert.match(uri, /^nbd:\/\/127\.0\.0\.1:\d+\/v1$/);
  const attached = mustZebuJson(up, ['volume', 'get', 'v1']);
  assert.equal(attached.state, 'attached');
  assert.equal(attached.robustness, 'healthy');
  assert.equal(attached.epoch, 1);
  assert.deepEqual(attached.replicas.map((r: { mode: string }) => r.mode), ['RW', 'RW', 'RW']);

  qemuIo(uri, 'write -P 0xa1 0 1M', 'write -P 0xb2 512M 4k', 'write -P 0xc3 1020M 4M', 'flush');
  qemuIo(uri, 'read -P 0xa1 0 1M', 'read -P 0xb2 512M 4k', 'read -P 0xc3 1020M 4M');

  // Snapshots while attached.
  mustZebu(up, ['snapshot', 'create', 'v1', 'before']);
  qemuIo(uri, 'write -P 0xd4 0 64k');
  const snaps = mustZebuJson(up, ['snapshot', 'list', 'v1']);
  assert.deepEqual(snaps.map((s: { name: string }) => s.name), ['before']);

  mustZebu(up, ['volume', 'detach', 'v1']);
  assert.equal(mustZebuJson(up, ['volume', 'get', 'v1']).state, 'detached');
  // Detached: no engine or replica process runs for it.
  assert.deepEqual(processesUnder(dataDir).filter((p) => p.role === 'engine' || p.role === 'replica'), []);
  // The snapshot list is still shown while detached.
  assert.deepEqual(mustZebuJson(up, ['snapshot', 'list', 'v1']).map((s: { name: string }) => s.name), ['before']);

  const uri2 = mustZebu(up, ['volume', 'attach', 'v1']).trim();
  assert.equal(mustZebuJson(up, ['volume', 'get', 'v1']).epoch, 2, 'a new epoch at every attach');
  qemuIo(uri2, 'read -P 0xd4 0 64k', 'read -P 0xa1 64k 960k', 'read -P 0xb2 512M 4k', 'read -P 0xc3 1020M 4M');

  // Online expansion: a new connection sees the new size and can write at the end.
  mustZebu(up, ['volume', 'expand', 'v1', '--size', '2GiB']);
  await waitFor('the new size over NBD', () => run('nbdinfo', ['--size', uri2]).stdout.trim() === String(2048 * MiB));
  qemuIo(uri2, 'write -P 0xe5 2047M 1M', 'read -P 0xe5 2047M 1M', 'read -P 0xc3 1020M 4M');

  // Revert needs maintenance mode.
  const refused = zebu(up, ['snapshot', 'revert', 'v1', 'before']);
  assert.equal(refused.status, 1);
  assert.match(refused.stderr, /maintenance/);
  mustZebu(up, ['volume', 'detach', 'v1']);
  mustZebu(up, ['volume', 'attach', 'v1', '--maintenance']);
  assert.equal(mustZebuJson(up, ['volume', 'get', 'v1']).endpoint, null, 'no NBD export in maintenance mode');
  mustZebu(up, ['snapshot', 'revert', 'v1', 'before']);
  mustZebu(up, ['volume', 'detach', 'v1']);

  // Offline expansion: applied at the next attach.
  mustZebu(up, ['volume', 'expand', 'v1', '--size', '3GiB']);
  const uri3 = mustZebu(up, ['volume', 'attach', 'v1']).trim();
  assert.equal(run('nbdinfo', ['--size', uri3]).stdout.trim(), String(3072 * MiB));
  // Reverted: the write after the snapshot is gone, the one before it is back.
  qemuIo(uri3, 'read -P 0xa1 0 1M', 'read -P 0 2047M 1M');
  mustZebu(up, ['volume', 'detach', 'v1']);

  // Delete removes the replica directories.
  const dirs = mustZebuJson(up, ['replica', 'list', '--volume', 'v1']).map((r: { dataPath: string }) => r.dataPath);
  assert.equal(dirs.length, 3);
  for (const d of dirs) assert.ok(fs.existsSync(d), d);
  mustZebu(up, ['volume', 'delete', 'v1']);
  for (const d of dirs) assert.ok(!fs.existsSync(d), `${d} removed`);
  assert.equal(zebu(up, ['volume', 'get', 'v1']).status, 1);

  const events = mustZebuJson(up, ['events', '--volume', 'v1']);
  const reasons = new Set(events.map((e: { reason: string }) => e.reason));
  for (const r of ['Created', 'Attached', 'Detached', 'SnapshotCreated', 'Expanding', 'SnapshotReverted', 'Deleted']) assert.ok(reasons.has(r), `event ${r}`);
});

test('bad requests get clear errors and change nothing', async (t) => {
  const dataDir = zebuDataDir(t);
  const up = await startZebuUp({ dataDir });
  t.after(() => stopZebuUp(up));
  mustZebu(up, ['volume', 'create', 'ok', '--size', '64MiB', '--replicas', '2']);
  const before = mustZebuJson(up, ['volume', 'list']);

  const cases: [string[], RegExp][] = [
    [['volume', 'get', 'nope'], /volume nope not found/],
    [['volume', 'attach', 'nope'], /not found/],
    [['volume', 'create', 'v2', '--size', '1000000'], /multiple of 4096/],
    [['volume', 'create', 'v2', '--size', '0'], /size/],
    [['volume', 'create', 'v2', '--size', '17TiB'], /size/],
    [['volume', 'create', 'v2', '--size', '1GiB', '--replicas', '0'], /replicas/i],
    [['volume', 'create', 'v2', '--size', '1GiB', '--replicas', '4'], /only 3 of 4 replicas can be placed/],
    [['volume', 'create', 'ok', '--size', '1GiB'], /already exists/],
    [['volume', 'create', 'Bad_Name', '--size', '1GiB'], /name/],
    [['volume', 'expand', 'ok', '--size', '32MiB'], /shrink/],
    [['snapshot', 'create', 'ok', 's1'], /attached/],
    [['setting', 'set', 'default-replica-count', '0'], /between 1 and 20/],
    [['setting', 'set', 'no-such-setting', '1'], /not found/],
  ];
  for (const [args, pattern] of cases) {
    const r = zebu(up, args);
    assert.equal(r.status, 1, `${args.join(' ')} should fail: ${r.stdout}${r.stderr}`);
    assert.match(r.stderr, pattern, args.join(' '));
    assert.equal(r.stderr.trim().split('\n').length, 1, `one line: ${r.stderr}`);
  }
  // Missing or wrong token.
  const noToken = zebu({ api: up.api, token: 'wrong-token' }, ['volume', 'list']);
  assert.equal(noToken.status, 1);
  assert.match(noToken.stderr, /token|unauthori[sz]ed/i);
  const raw = await fetch(`${up.api}/v1/volumes`);
  assert.equal(raw.status, 401);
  const bad = await fetch(`${up.api}/v1/volumes`, {
    method: 'POST',
    headers: { authorization: `Bearer ${up.token}`, 'content-type': 'application/json' },
    body: JSON.stringify({ name: 'v3', sizeBytes: 4095 }),
  });
  assert.equal(bad.status, 400);
  const body = (await bad.json()) as { error: { field?: string } };
  assert.equal(body.error.field, 'sizeBytes');

  assert.deepEqual(mustZebuJson(up, ['volume', 'list']).map((v: { name: string }) => v.name), before.map((v: { name: string }) => v.name));
  assert.equal(mustZebuJson(up, ['setting', 'get', 'default-replica-count']).value, '3');
});
