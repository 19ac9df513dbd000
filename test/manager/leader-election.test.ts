/**
 * Leader election over the store (leader-election.ts), on the embedded store with a fake lease
 * clock: one leader at a time, takeover when the leader resigns or its lease expires, a restarted
 * node taking its own term back at once, and a term that cannot start given up.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { SqliteStore } from '../../src/store/sqlite-store.ts';
import { LeaderElection, LEADER_NAME } from '../../src/manager/leader-election.ts';
import { Kind } from '../../src/cluster/objects.ts';
import type { Store } from '../../src/store/store.ts';

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
