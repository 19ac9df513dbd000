/**
 * The behaviour every Store implementation must have (src/store/store.ts), as a suite that each
 * implementation's test file runs against its own store: the embedded one now, etcd later.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { ErrorCode, ZebuError } from '../../src/errors.ts';
import type { Store, WatchEvent } from '../../src/store/store.ts';

export interface StoreFactory {
  /** A fresh, empty store. */
  open(t: { after: (fn: () => void | Promise<void>) => void }): Promise<Store>;
  /** Advances the store's lease clock (a fake clock, or real sleeping). */
  advanceMs(store: Store, ms: number): Promise<void>;
}

function code(err: unknown): string | undefined {
  return err instanceof ZebuError ? err.code : undefined;
}

async function rejectsWith(promise: Promise<unknown> | (() => unknown), expected: string): Promise<void> {
  try {
    await (typeof promise === 'function' ? promise() : promise);
  } catch (err) {
    assert.equal(code(err), expected, `expected ${expected}, got ${String(err)}`);
    return;
  }
  assert.fail(`expected ${expected}, but it succeeded`);
}

/** Collects watch events; `until(n)` waits for n of them. */
function collector(store: Store, options: { kind?: string; afterRevision?: number }) {
  const events: WatchEvent[] = [];
  const errors: Error[] = [];
  let wake: (() => void) | null = null;
  const watch = store.watch(options, {
    onEvent: (e) => {
      events.push(e);
      wake?.();
    },
    onError: (err) => {
      errors.push(err);
      wake?.();
    },
  });
  return {
    events,
    errors,
    watch,
    async until(count: number, timeoutMs = 5000): Promise<void> {
      const deadline = Date.now() + timeoutMs;
      while (events.length < count && errors.length === 0) {
        if (Date.now() > deadline) assert.fail(`watch delivered ${events.length} of ${count} events`);
        await new Promise<void>((resolve) => {
          wake = resolve;
          setTimeout(resolve, 50);
        });
      }
    },
  };
}

export function storeContract(name: string, factory: StoreFactory): void {
  test(`${name}: create, get, list in name order`, async (t) => {
    const store = await factory.open(t);
    assert.equal(await store.get('Volume', 'a'), null);
    const b = await store.create('Volume', 'b', { size: 2 });
    const a = await store.create('Volume', 'a', { size: 1 });
    await store.create('Replica', 'a', { other: true });
    assert.ok(a.resourceVersion > b.resourceVersion, 'revisions grow');
    assert.equal(a.createdRevision, a.resourceVersion);
    assert.equal(a.leaseId, null);
    assert.deepEqual((await store.get('Volume', 'a'))?.value, { size: 1 });
    const list = await store.list<{ size: number }>('Volume');
    assert.deepEqual(list.items.map((o) => o.name), ['a', 'b']);
    assert.equal(list.revision, await store.revision());
    assert.deepEqual((await store.list('Node')).items, []);
    await rejectsWith(store.create('Volume', 'a', {}), ErrorCode.EXISTS);
    assert.deepEqual((await store.get('Volume', 'a'))?.value, { size: 1 }, 'a refused create changes nothing');
  });

  test(`${name}: update and delete with optimistic concurrency`, async (t) => {
    const store = await factory.open(t);
    const v1 = await store.create('Volume', 'v', { n: 1 });
    const v2 = await store.update('Volume', 'v', { n: 2 }, { resourceVersion: v1.resourceVersion });
    assert.ok(v2.resourceVersion > v1.resourceVersion);
    assert.equal(v2.createdRevision, v1.createdRevision);
    await rejectsWith(store.update('Volume', 'v', { n: 3 }, { resourceVersion: v1.resourceVersion }), ErrorCode.CONFLICT);
    await rejectsWith(store.delete('Volume', 'v', { resourceVersion: v1.resourceVersion }), ErrorCode.CONFLICT);
    assert.deepEqual((await store.get('Volume', 'v'))?.value, { n: 2 });
    const v3 = await store.update('Volume', 'v', { n: 3 });
    assert.equal(v3.value.n, 3);
    await rejectsWith(store.update('Volume', 'nope', {}), ErrorCode.NOT_FOUND);
    await rejectsWith(store.delete('Volume', 'nope'), ErrorCode.NOT_FOUND);
    await store.delete('Volume', 'v', { resourceVersion: v3.resourceVersion });
    assert.equal(await store.get('Volume', 'v'), null);
    // A name can be reused after a delete, with a new createdRevision.
    const again = await store.create('Volume', 'v', { n: 4 });
    assert.ok(again.createdRevision > v3.resourceVersion);
  });

  test(`${name}: a guarded write lands only while its guard object is the one it names (a leader's term)`, async (t) => {
    const store = await factory.open(t);
    const term = await store.create('Leader', 'manager', { nodeId: 'a' });
    const guard = { kind: 'Leader', name: 'manager', createdRevision: term.createdRevision };
    const v = await store.create('Volume', 'g', { n: 1 }, { guard });
    const v2 = await store.update('Volume', 'g', { n: 2 }, { resourceVersion: v.resourceVersion, guard });
    // The guard holds, the object's own check does not: the object's error, not FENCED.
    await rejectsWith(store.update('Volume', 'g', { n: 9 }, { resourceVersion: v.resourceVersion, guard }), ErrorCode.CONFLICT);
    await rejectsWith(store.create('Volume', 'g', {}, { guard }), ErrorCode.EXISTS);
    await rejectsWith(store.delete('Volume', 'nope', { guard }), ErrorCode.NOT_FOUND);
    // The term ends (another leader's object in its place): every guarded write is refused and changes nothing.
    await store.delete('Leader', 'manager');
    await rejectsWith(store.update('Volume', 'g', { n: 3 }, { guard }), ErrorCode.FENCED);
    await store.create('Leader', 'manager', { nodeId: 'b' });
    await rejectsWith(store.update('Volume', 'g', { n: 3 }, { guard }), ErrorCode.FENCED);
    await rejectsWith(store.update('Volume', 'g', { n: 3 }, { resourceVersion: v2.resourceVersion, guard }), ErrorCode.FENCED);
    await rejectsWith(store.create('Volume', 'h', { n: 1 }, { guard }), ErrorCode.FENCED);
    await rejectsWith(store.delete('Volume', 'g', { guard }), ErrorCode.FENCED);
    assert.deepEqual((await store.get('Volume', 'g'))?.value, { n: 2 });
    assert.equal(await store.get('Volume', 'h'), null);
    // Unguarded writes (an agent's) are not affected; a bad guard is bad input.
    await store.update('Volume', 'g', { n: 4 });
    await rejectsWith(store.update('Volume', 'g', { n: 5 }, { guard: { kind: 'Leader', name: 'manager', createdRevision: 0 } }), ErrorCode.EINVAL);
  });

  test(`${name}: values come back as written and callers cannot change stored ones`, async (t) => {
    const store = await factory.open(t);
    const value = { s: 'ünïcode ✓', n: 16 * 2 ** 40, f: 0.5, b: false, nil: null, list: [1, [2, { x: 'y' }]] };
    await store.create('Volume', 'v', value);
    const got = await store.get<typeof value>('Volume', 'v');
    assert.deepEqual(got?.value, value);
    got!.value.s = 'changed';
    assert.equal((await store.get<typeof value>('Volume', 'v'))?.value.s, 'ünïcode ✓');
  });

  test(`${name}: bad input is refused with EINVAL and changes nothing`, async (t) => {
    const store = await factory.open(t);
    const before = await store.revision();
    for (const bad of ['', 'a/b', '-x', 'a b', 'x'.repeat(254)]) {
      await rejectsWith(() => store.create('Volume', bad, {}), ErrorCode.EINVAL);
      await rejectsWith(() => store.create(bad, 'x', {}), ErrorCode.EINVAL);
    }
    for (const bad of [undefined, () => 1, Symbol('s'), 1n, NaN, Infinity, new Date(), { nested: { fn: () => 1 } }]) {
      await rejectsWith(() => store.create('Volume', 'v', bad), ErrorCode.EINVAL);
    }
    const cyclic: Record<string, unknown> = {};
    cyclic.self = cyclic;
    await rejectsWith(() => store.create('Volume', 'v', cyclic), ErrorCode.EINVAL);
    await rejectsWith(() => store.create('Volume', 'v', { big: 'x'.repeat(1024 * 1024 + 1) }), ErrorCode.EINVAL);
    await rejectsWith(() => store.update('Volume', 'v', {}, { resourceVersion: 0 }), ErrorCode.EINVAL);
    await rejectsWith(() => store.update('Volume', 'v', {}, { resourceVersion: 1.5 }), ErrorCode.EINVAL);
    await rejectsWith(() => store.grantLease(10), ErrorCode.EINVAL);
    await rejectsWith(() => store.watch({ afterRevision: -1 }, { onEvent: () => {} }), ErrorCode.EINVAL);
    assert.equal(await store.revision(), before, 'nothing was written');
    assert.deepEqual((await store.list('Volume')).items, []);
  });

  test(`${name}: watch from a revision delivers every change once, in order`, async (t) => {
    const store = await factory.open(t);
    await store.create('Volume', 'early', { n: 0 });
    const listed = await store.list('Volume');
    await store.create('Volume', 'a', { n: 1 });
    await store.create('Node', 'n1', {});
    await store.update('Volume', 'a', { n: 2 });
    await store.delete('Volume', 'early');
    const all = collector(store, { afterRevision: listed.revision });
    const volumes = collector(store, { kind: 'Volume', afterRevision: listed.revision });
    t.after(() => {
      all.watch.close();
      volumes.watch.close();
    });
    await all.until(4);
    await volumes.until(3);
    assert.deepEqual(all.events.map((e) => `${e.type} ${e.kind}/${e.name}`), ['put Volume/a', 'put Node/n1', 'put Volume/a', 'delete Volume/early']);
    assert.deepEqual(volumes.events.map((e) => e.type + ' ' + e.name), ['put a', 'put a', 'delete early']);
    assert.deepEqual(all.events[2].object.value, { n: 2 });
    assert.deepEqual(all.events[3].object.value, { n: 0 }, 'a delete event carries the object as it was');
    // Live changes after the catch-up, interleaved with the history, still once and in order.
    for (let i = 0; i < 50; i++) await store.update('Volume', 'a', { n: 100 + i });
    await all.until(54);
    const revisions = all.events.map((e) => e.revision);
    assert.deepEqual(revisions, [...revisions].sort((x, y) => x - y));
    assert.equal(new Set(revisions).size, revisions.length, 'no event twice');
    assert.equal(all.events.length, 54);
    assert.deepEqual(all.events.at(-1)?.object.value, { n: 149 });
  });

  test(`${name}: a watch without afterRevision sees only later changes; close stops delivery`, async (t) => {
    const store = await factory.open(t);
    await store.create('Volume', 'old', {});
    const w = collector(store, {});
    await store.create('Volume', 'new', {});
    await w.until(1);
    assert.deepEqual(w.events.map((e) => e.name), ['new']);
    w.watch.close();
    await store.create('Volume', 'after-close', {});
    await new Promise((resolve) => setTimeout(resolve, 100));
    assert.equal(w.events.length, 1);
  });

  test(`${name}: a watch with a callback that throws ends with onError; others go on`, async (t) => {
    const store = await factory.open(t);
    const errors: Error[] = [];
    store.watch({}, {
      onEvent: () => {
        throw new Error('consumer bug');
      },
      onError: (err) => errors.push(err),
    });
    const good = collector(store, {});
    t.after(() => good.watch.close());
    await store.create('Volume', 'a', {});
    await store.create('Volume', 'b', {});
    await good.until(2);
    for (let i = 0; i < 100 && errors.length === 0; i++) await new Promise((resolve) => setTimeout(resolve, 10));
    assert.equal(errors.length, 1);
    assert.match(errors[0].message, /consumer bug/);
  });

  test(`${name}: leases delete their objects when they expire or are revoked`, async (t) => {
    const store = await factory.open(t);
    const lease = await store.grantLease(2000);
    const kept = await store.grantLease(2000);
    await store.create('NodeLease', 'n1', { node: 'n1' }, { leaseId: lease.id });
    const n2 = await store.create('NodeLease', 'n2', { node: 'n2' }, { leaseId: kept.id });
    assert.equal(n2.leaseId, kept.id);
    await store.create('Volume', 'unleased', {});
    const w = collector(store, { kind: 'NodeLease' });
    t.after(() => w.watch.close());
    await factory.advanceMs(store, 1200);
    await store.keepAlive(kept.id);
    await factory.advanceMs(store, 1200);
    await w.until(1);
    assert.equal(await store.get('NodeLease', 'n1'), null, 'expired');
    assert.notEqual(await store.get('NodeLease', 'n2'), null, 'kept alive');
    assert.notEqual(await store.get('Volume', 'unleased'), null);
    assert.equal(w.events[0].type, 'delete');
    assert.equal(w.events[0].name, 'n1');
    await rejectsWith(store.keepAlive(lease.id), ErrorCode.NOT_FOUND);
    await rejectsWith(store.create('NodeLease', 'n3', {}, { leaseId: lease.id }), ErrorCode.NOT_FOUND);
    // An update keeps the lease attachment.
    const updated = await store.update('NodeLease', 'n2', { node: 'n2', beat: 1 });
    assert.equal(updated.leaseId, kept.id);
    await store.revokeLease(kept.id);
    await store.revokeLease(kept.id); // already gone: no error
    assert.equal(await store.get('NodeLease', 'n2'), null);
  });

  test(`${name}: concurrent read-modify-write with resourceVersion loses no increment`, async (t) => {
    const store = await factory.open(t);
    await store.create('Setting', 'counter', { n: 0 });
    let conflicts = 0;
    const increment = async (): Promise<void> => {
      for (;;) {
        const cur = (await store.get<{ n: number }>('Setting', 'counter'))!;
        await new Promise((resolve) => setImmediate(resolve));
        try {
          await store.update('Setting', 'counter', { n: cur.value.n + 1 }, { resourceVersion: cur.resourceVersion });
          return;
        } catch (err) {
          if (code(err) !== ErrorCode.CONFLICT) throw err;
          conflicts++;
        }
      }
    };
    await Promise.all(Array.from({ length: 20 }, () => increment()));
    assert.equal((await store.get<{ n: number }>('Setting', 'counter'))!.value.n, 20);
    assert.ok(conflicts > 0, 'the increments did race');
  });

  test(`${name}: a closed store refuses calls and ends its watches`, async (t) => {
    const store = await factory.open(t);
    const w = collector(store, {});
    await store.close();
    await w.until(0);
    assert.equal(w.errors.length, 1);
    assert.equal(code(w.errors[0]), ErrorCode.CLOSED);
    await rejectsWith(() => store.get('Volume', 'a'), ErrorCode.CLOSED);
    await store.close(); // twice is fine
  });
}
