/**
 * The etcd store against a real etcd (Debian's etcd-server, started here): the same contract as
 * the embedded store (store-contract.ts), then what only a store over the network has — etcd
 * going away and coming back, several stores sharing one etcd under their own prefixes, history
 * etcd compacted away, a member whose answers are lost.
 */
import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import { ErrorCode, ZebuError } from '../../src/errors.ts';
import { EtcdStore } from '../../src/store/etcd-store.ts';
import type { Store, WatchEvent } from '../../src/store/store.ts';
import { startEtcd, type EtcdServer } from '../support/etcd-server.ts';
import { BlackholeProxy } from '../support/fault-proxy.ts';
import { tempDir } from '../support/tmp.ts';
import { storeContract } from './store-contract.ts';

let shared: EtcdServer | null = null;
let stores = 0;
/** What ends with the file's tests: the shared etcd and its directory. */
const atEnd: (() => unknown)[] = [];
after(async () => {
  for (const fn of atEnd.reverse()) await fn();
});

/** One etcd for the contract tests; each store has a prefix of its own in it. */
async function sharedEtcd(): Promise<EtcdServer> {
  if (shared === null) {
    const keeper = { after: (fn: () => unknown) => atEnd.push(fn) };
    shared = await startEtcd(keeper, tempDir(keeper, 'zebu-etcd-'));
  }
  return shared;
}

storeContract('etcd', {
  async open(t) {
    const etcd = await sharedEtcd();
    const store = await EtcdStore.open({ endpoints: [etcd.endpoint], prefix: `contract-${process.pid}-${++stores}/` });
    t.after(() => store.close());
    return store;
  },
  async advanceMs(_store, ms) {
    await new Promise((resolve) => setTimeout(resolve, ms));
  },
});

function codeOf(err: unknown): string | undefined {
  return err instanceof ZebuError ? err.code : undefined;
}

test('etcd: bad options are refused before connecting; an etcd that is not there fails open with DISCONNECTED or TIMEOUT', async () => {
  for (const endpoints of [[], ['127.0.0.1:2379'], ['ftp://x:1'], 'http://x:1' as unknown as string[]]) {
    await assert.rejects(EtcdStore.open({ endpoints }), (err) => codeOf(err) === ErrorCode.EINVAL);
  }
  await assert.rejects(EtcdStore.open({ endpoints: ['http://127.0.0.1:1'], prefix: 'a b' }), (err) => codeOf(err) === ErrorCode.EINVAL);
  const started = Date.now();
  await assert.rejects(EtcdStore.open({ endpoints: ['http://127.0.0.1:1'], callTimeoutMs: 1500 }), (err) => {
    assert.ok(codeOf(err) === ErrorCode.DISCONNECTED || codeOf(err) === ErrorCode.TIMEOUT, String(err));
    return true;
  });
  assert.ok(Date.now() - started < 10_000, 'it gave up within its deadline');
});

test('etcd: stores under different prefixes do not see each other', async (t) => {
  const etcd = await sharedEtcd();
  const a = await EtcdStore.open({ endpoints: [etcd.endpoint], prefix: `iso-a-${process.pid}/` });
  const b = await EtcdStore.open({ endpoints: [etcd.endpoint], prefix: `iso-b-${process.pid}/` });
  t.after(async () => {
    await a.close();
    await b.close();
  });
  const seen: string[] = [];
  const w = b.watch({}, { onEvent: (e) => seen.push(e.name) });
  t.after(() => w.close());
  await a.create('Volume', 'only-in-a', { n: 1 });
  await b.create('Volume', 'only-in-b', { n: 2 });
  assert.deepEqual((await a.list('Volume')).items.map((o) => o.name), ['only-in-a']);
  assert.deepEqual((await b.list('Volume')).items.map((o) => o.name), ['only-in-b']);
  assert.equal(await b.get('Volume', 'only-in-a'), null);
  for (let i = 0; i < 50 && seen.length === 0; i++) await new Promise((resolve) => setTimeout(resolve, 20));
  assert.deepEqual(seen, ['only-in-b']);
});

test('etcd: a value something else wrote under the prefix is reported, not trusted', async (t) => {
  const etcd = await sharedEtcd();
  const prefix = `foreign-${process.pid}/`;
  const store = await EtcdStore.open({ endpoints: [etcd.endpoint], prefix });
  t.after(() => store.close());
  await fetch(`${etcd.endpoint}/v3/kv/put`, {
    method: 'POST',
    body: JSON.stringify({ key: Buffer.from(`${prefix}o/Volume/junk`).toString('base64'), value: Buffer.from('{not json').toString('base64') }),
  });
  await assert.rejects(store.get('Volume', 'junk'), (err) => codeOf(err) === ErrorCode.EIO && /not JSON/.test((err as Error).message));
});

test('etcd: history compacted away ends a watch from before it with COMPACTED; a list then a watch from its revision goes on', async (t) => {
  const etcd = await sharedEtcd();
  const store = await EtcdStore.open({ endpoints: [etcd.endpoint], prefix: `compact-${process.pid}/` });
  t.after(() => store.close());
  const first = await store.create('Volume', 'v', { n: 0 });
  for (let i = 1; i <= 5; i++) await store.update('Volume', 'v', { n: i });
  const now = await store.revision();
  const res = await fetch(`${etcd.endpoint}/v3/kv/compaction`, { method: 'POST', body: JSON.stringify({ revision: String(now), physical: true }) });
  assert.ok(res.ok, await res.text());
  const errors: Error[] = [];
  const old = store.watch({ afterRevision: first.resourceVersion }, { onEvent: () => assert.fail('no event from compacted history'), onError: (err) => errors.push(err) });
  t.after(() => old.close());
  for (let i = 0; i < 100 && errors.length === 0; i++) await new Promise((resolve) => setTimeout(resolve, 20));
  assert.equal(codeOf(errors[0]), ErrorCode.COMPACTED, String(errors[0]));
  const listed = await store.list('Volume');
  const events: WatchEvent[] = [];
  const w = store.watch({ afterRevision: listed.revision }, { onEvent: (e) => events.push(e) });
  t.after(() => w.close());
  await store.update('Volume', 'v', { n: 6 });
  for (let i = 0; i < 100 && events.length === 0; i++) await new Promise((resolve) => setTimeout(resolve, 20));
  assert.deepEqual(events.map((e) => e.object.value), [{ n: 6 }]);
});

test('etcd stopped and started again: calls fail with a clear error meanwhile, a watch resumes where it was and misses nothing', async (t) => {
  const dir = tempDir(t);
  let etcd = await startEtcd(t, dir, 'restarted');
  const store: Store = await EtcdStore.open({ endpoints: [etcd.endpoint], callTimeoutMs: 2000 });
  t.after(() => store.close());
  const events: WatchEvent[] = [];
  const errors: Error[] = [];
  const w = store.watch({}, { onEvent: (e) => events.push(e), onError: (err) => errors.push(err) });
  t.after(() => w.close());
  await store.create('Volume', 'before', {});
  for (let i = 0; i < 100 && events.length < 1; i++) await new Promise((resolve) => setTimeout(resolve, 20));
  etcd.child.kill('SIGKILL');
  await new Promise<void>((resolve) => etcd.child.once('exit', () => resolve()));
  await assert.rejects(store.create('Volume', 'during', {}), (err) => {
    assert.ok(codeOf(err) === ErrorCode.DISCONNECTED || codeOf(err) === ErrorCode.TIMEOUT, String(err));
    return true;
  });
  // The same member, on the same data and ports.
  etcd = await startEtcd(t, dir, 'restarted', etcd.ports);
  let created = false;
  for (let i = 0; i < 100 && !created; i++) {
    created = await store.create('Volume', 'after', {}).then(() => true, async () => {
      await new Promise((resolve) => setTimeout(resolve, 200));
      return false;
    });
  }
  assert.ok(created, 'calls work again once etcd is back');
  for (let i = 0; i < 250 && events.length < 2; i++) await new Promise((resolve) => setTimeout(resolve, 20));
  assert.deepEqual(events.map((e) => e.name), ['before', 'after'], `errors: ${errors.join('; ')}`);
  assert.deepEqual((await store.list('Volume')).items.map((o) => o.name), ['after', 'before']);
});

test('etcd with two members, one whose answers are lost (each request applied, its reply never arrives): creates, updates and deletes tried again on the other are answered as done, applied once; the silent member is skipped until it answers again', async (t) => {
  const etcd = await sharedEtcd();
  const proxy = await BlackholeProxy.start(Number(new URL(etcd.endpoint).port));
  t.after(() => proxy.close());
  const lines: string[] = [];
  const store = await EtcdStore.open({ endpoints: [`http://${proxy.address}`, etcd.endpoint], prefix: `lost-answers-${process.pid}/`, log: (m) => lines.push(m) });
  t.after(() => store.close());
  const count = (what: string): number => lines.filter((l) => l.includes(`${proxy.address} ${what}`)).length;
  const ops = ['create', 'update', 'delete'] as const;
  for (const [phase, op] of ops.entries()) {
    // Objects to update or delete, made while both members answer.
    const names = Array.from({ length: 40 }, (_, i) => `${op}-${i}`);
    const made = new Map<string, number>();
    if (op !== 'create') for (const name of names) made.set(name, (await store.create('Thing', name, { n: 0 })).resourceVersion);
    proxy.blackhole('replies');
    const done: string[] = [];
    for (const name of names) {
      // Each call may go to either member: one to the silent one is applied there, its answer lost.
      if (op === 'create') assert.deepEqual((await store.create('Thing', name, { n: 1 })).value, { n: 1 });
      if (op === 'update') {
        const updated = await store.update('Thing', name, { n: 2 }, { resourceVersion: made.get(name)! });
        assert.deepEqual(updated.value, { n: 2 });
        assert.ok(updated.resourceVersion > made.get(name)!);
      }
      if (op === 'delete') await store.delete('Thing', name, { resourceVersion: made.get(name)! });
      done.push(name);
      if (count('is not answering') > phase) break;
    }
    assert.equal(count('is not answering'), phase + 1, `a ${op} went to the silent member: ${lines.join('\n')}`);
    assert.ok(proxy.droppedReplyBytes > 0);
    // Each applied once, as answered (an update applied twice would have a second revision).
    for (const name of done) {
      const got = await store.get('Thing', name);
      if (op === 'delete') assert.equal(got, null, name);
      else assert.deepEqual(got?.value, { n: op === 'create' ? 1 : 2 }, name);
    }
    // The member answers again (its broken connections gone): the probe finds it, calls use it again.
    proxy.dropConnections();
    proxy.restore();
    const deadline = Date.now() + 10_000;
    while (count('answers again') < phase + 1) {
      assert.ok(Date.now() < deadline, `the member not found answering again: ${lines.join('\n')}`);
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
  }
});
