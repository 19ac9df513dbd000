/**
 * Leader election over the store (leader-election.ts), on the embedded store with a fake lease
 * clock: one leader at a time, takeover when the leader resigns or its lease expires, a restarted
 * node taking its own term back at once, a term that cannot start given up, and a leader whose
 * renewals hang stepping down, the writes of its term fenced.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { SqliteStore } from '../../src/store/sqlite-store.ts';
import { LeaderElection, LEADER_NAME } from '../../src/manager/leader-election.ts';
import { Kind } from '../../src/cluster/objects.ts';
import type { Store } from '../../src/store/store.ts';
import { GuardedStore } from '../../src/store/guarded-store.ts';
import { ErrorCode, type ZebuError } from '../../src/errors.ts';

const TTL_MS = 1000;

function fakeStore(t: { after: (fn: () => unknown) => void }): { store: Store; clock: { ms: number } } {
  const clock = { ms: 0 };
  const store = SqliteStore.open(':memory:', { now: () => clock.ms, leaseCheckIntervalMs: 10 });
  t.after(() => store.close());
  return { store, clock };
}

interface Node {
  election: LeaderElection;
  terms: string[];
}

function node(t: { after: (fn: () => unknown) => void }, store: Store, nodeId: string, onElected: () => Promise<void> = async () => {}): Node {
  const terms: string[] = [];
  const election = new LeaderElection({
    store, nodeId, ttlMs: TTL_MS,
    onElected: async () => {
      await onElected();
      terms.push('elected');
    },
    onDeposed: async (why) => {
      terms.push(`deposed: ${why}`);
    },
  });
  t.after(() => election.stop());
  return { election, terms };
}

async function until(what: string, fn: () => boolean | Promise<boolean>, timeoutMs = 5000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await fn())) {
    if (Date.now() > deadline) assert.fail(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

async function leaderOf(store: Store): Promise<string | null> {
  return ((await store.get<{ nodeId: string }>(Kind.Leader, LEADER_NAME))?.value.nodeId) ?? null;
}

test('one leader at a time; the other takes over when the leader stops (resigns)', async (t) => {
  const { store } = fakeStore(t);
  const a = node(t, store, 'a');
  const b = node(t, store, 'b');
  assert.equal(await a.election.start(), true);
  assert.equal(await b.election.start(), false);
  assert.equal(await leaderOf(store), 'a');
  await new Promise((resolve) => setTimeout(resolve, 700));
  assert.equal(b.election.isLeader, false, 'still one leader after a few rounds');
  await a.election.stop();
  assert.deepEqual(a.terms, ['elected', 'deposed: stopping']);
  await until('b leads', () => b.election.isLeader);
  assert.equal(await leaderOf(store), 'b');
  assert.deepEqual(b.terms, ['elected']);
});

test('a leader whose lease expires (cut off from the store) steps down; another takes over', async (t) => {
  const { store, clock } = fakeStore(t);
  const a = node(t, store, 'a');
  const b = node(t, store, 'b');
  assert.equal(await a.election.start(), true);
  assert.equal(await b.election.start(), false);
  // The store's clock jumps past the TTL between two renewals: the lease is gone.
  clock.ms += TTL_MS + 1;
  await until('a deposed', () => !a.election.isLeader);
  assert.match(a.terms.at(-1) ?? '', /deposed: the leader lease expired/);
  await until('someone leads again', async () => (await leaderOf(store)) !== null);
  await until('exactly one leads', () => a.election.isLeader !== b.election.isLeader);
});

test('a restarted node takes its own term back at once; another node never waits it out', async (t) => {
  const { store } = fakeStore(t);
  const before = new LeaderElection({ store, nodeId: 'a', ttlMs: TTL_MS, onElected: async () => {}, onDeposed: async () => {} });
  assert.equal(await before.start(), true);
  // "Killed": it neither renews nor resigns (its loop is left to run down with the test).
  const other = node(t, store, 'b');
  assert.equal(await other.election.start(), false);
  const again = node(t, store, 'a');
  assert.equal(await again.election.start(), true, 'the same node again leads at once');
  assert.equal(await leaderOf(store), 'a');
  assert.equal(other.election.isLeader, false);
  await before.stop().catch(() => {});
});

test('a term that cannot start is given up: the node does not lead, and another can', async (t) => {
  const { store } = fakeStore(t);
  const a = node(t, store, 'a', async () => {
    throw new Error('cannot listen on 127.0.0.1:9500 for the API: address in use');
  });
  assert.equal(await a.election.start(), false);
  assert.match(a.election.lastStartError?.message ?? '', /address in use/);
  assert.equal(await leaderOf(store), null, 'the Leader object went with the lease');
  const b = node(t, store, 'b');
  assert.equal(await b.election.start(), true);
});

test('a leader whose renewals hang (a dead network) steps down within half the TTL; the writes of its term are refused once another leads', async (t) => {
  const { store } = fakeStore(t);
  // The store as node a sees it: renewals stop answering once the network "dies".
  let dead = false;
  const seenByA = new Proxy(store, {
    get(target, prop) {
      if (prop === 'keepAlive') return (id: string) => (dead ? new Promise<void>(() => {}) : target.keepAlive(id));
      const value = Reflect.get(target, prop) as unknown;
      return typeof value === 'function' ? value.bind(target) : value;
    },
  });
  const a = node(t, seenByA, 'a');
  assert.equal(await a.election.start(), true);
  const term = new GuardedStore(store, a.election.guard);
  await term.create('Volume', 'v', { n: 1 });
  dead = true;
  const cutAt = Date.now();
  await until('a deposed', () => !a.election.isLeader, 3000);
  const tookMs = Date.now() - cutAt;
  assert.ok(tookMs <= TTL_MS, `stepped down after ${tookMs} ms`);
  assert.match(a.terms.at(-1) ?? '', /deposed: the leader lease was not renewed for \d+ ms \(the store does not answer\)/);
  // Its lease expires in the store; b takes over. A write of a's term arriving now changes nothing.
  await store.delete(Kind.Leader, LEADER_NAME);
  const b = node(t, store, 'b');
  assert.equal(await b.election.start(), true);
  await assert.rejects(term.update('Volume', 'v', { n: 2 }), (err: ZebuError) => err.code === ErrorCode.FENCED);
  await assert.rejects(term.create('Volume', 'w', {}), (err: ZebuError) => err.code === ErrorCode.FENCED);
  assert.deepEqual((await store.get('Volume', 'v'))?.value, { n: 1 });
  await new GuardedStore(store, b.election.guard).update('Volume', 'v', { n: 3 });
  assert.deepEqual((await store.get('Volume', 'v'))?.value, { n: 3 });
});
