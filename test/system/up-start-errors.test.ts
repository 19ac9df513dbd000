/**
 * `zebu up` that cannot start says why in one line, exits 1 and leaves no process behind:
 * the data directory in use, the API address taken, the NBD address taken, a bad or unreachable
 * --store.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import path from 'node:path';
import { ZEBU_MAIN } from '../support/replica-process.ts';
import { startZebuUp, stopZebuUp, zebuDataDir, processesUnder } from '../support/zebu-up.ts';

function up(dataDir: string, api: string, nbd: string, extra: string[] = []): { status: number | null; stderr: string } {
  const r = spawnSync(process.execPath, [ZEBU_MAIN, 'up', '--data-dir', dataDir, '--api', api, '--nbd', nbd, '--node', 'node-2', ...extra], { timeout: 120_000 });
  return { status: r.status, stderr: r.stderr.toString() };
}

function lastLine(text: string): string {
  return text.trim().split('\n').filter((l) => !l.startsWith('{')).at(-1) ?? '';
}

test('zebu up that cannot start: one clear line, exit 1, nothing left running', async (t) => {
  const dataDir = zebuDataDir(t);
  const first = await startZebuUp({ dataDir });
  t.after(() => stopZebuUp(first));
  const apiAddress = first.api.replace(/^http:\/\//, '');

  const same = up(dataDir, '127.0.0.1:0', '127.0.0.1:0');
  assert.equal(same.status, 1);
  assert.match(lastLine(same.stderr), /^zebu: another zebu up \(pid \d+\) is running on /);

  const other = path.join(path.dirname(dataDir), 'other');
  const apiTaken = up(other, apiAddress, '127.0.0.1:0');
  assert.equal(apiTaken.status, 1);
  assert.match(lastLine(apiTaken.stderr), /^zebu: cannot listen on .* for the API: .*EADDRINUSE/);
  assert.deepEqual(processesUnder(other), []);

  const nbdTaken = up(other, '127.0.0.1:0', first.nbd);
  assert.equal(nbdTaken.status, 1);
  assert.match(lastLine(nbdTaken.stderr), /^zebu: the NBD frontend on .* does not start: .*EADDRINUSE/);
  assert.deepEqual(processesUnder(other), []);

  for (const [extra, message] of [
    [['--store', 'postgres://x:1'], /^zebu: --store "postgres:\/\/x:1": etcd:\/\/HOST:PORT/],
    [['--store', 'etcd://nohostport'], /^zebu: --store: "nohostport" is not HOST:PORT/],
    [['--store', 'etcds://127.0.0.1:2379'], /^zebu: etcds:\/\/ needs --store-ca FILE/],
    [['--store-prefix', 'x/'], /^zebu: --store-prefix is for an etcd store/],
    // Nothing listens there: refused at once, or after the call deadline.
    [['--store', 'etcd://127.0.0.1:1'], /^zebu: etcd (is unreachable|did not answer in time)/],
  ] as const) {
    const bad = up(other, '127.0.0.1:0', '127.0.0.1:0', [...extra]);
    assert.equal(bad.status, 1, bad.stderr);
    assert.match(lastLine(bad.stderr), message);
    assert.deepEqual(processesUnder(other), []);
  }

  // The first one is unaffected.
  const health = await fetch(`${first.api}/healthz`);
  assert.equal(health.status, 200);
});
