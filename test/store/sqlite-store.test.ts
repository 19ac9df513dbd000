import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import path from 'node:path';
import readline from 'node:readline';
import { ErrorCode, ZebuError } from '../../src/errors.ts';
import { SqliteStore } from '../../src/store/sqlite-store.ts';
import type { Store, WatchEvent } from '../../src/store/store.ts';
import { tempDir } from '../support/tmp.ts';
import { storeContract } from './store-contract.ts';

/** Fake lease clocks, per store. */
const clocks = new WeakMap<Store, { ms: number }>();

storeContract('sqlite (memory)', {
  async open(t) {
    const clock = { ms: 0 };
    const store = SqliteStore.open(':memory:', { now: () => clock.ms, leaseCheckIntervalMs: 10 });
    clocks.set(store, clock);
    t.after(() => store.close());
    return store;
  },
  async advanceMs(store, ms) {
    clocks.get(store)!.ms += ms;
    await new Promise((resolve) => setTimeout(resolve, 30));
  },
});

storeContract('sqlite (file)', {
  async open(t) {
    const store = SqliteStore.open(path.join(tempDir(t), 'store.db'));
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

test('sqlite: objects, revision, history and leases survive a reopen', async (t) => {
  const file = path.join(tempDir(t), 'store.db');
  const clock = { ms: 0 };
  let store = SqliteStore.open(file, { now: () => clock.ms });
  const lease = await store.grantLease(5000);
  await store.create('NodeLease', 'n1', {}, { leaseId: lease.id });
  await store.create('Volume', 'v', { n: 1 });
  const middle = await store.revision();
  await store.update('Volume', 'v', { n: 2 });
  const end = await store.revision();
  await store.close();

  clock.ms = 1_000_000; // long after the lease's TTL: a reopened store gives it a fresh TTL
  store = SqliteStore.open(file, { now: () => clock.ms });
  t.after(() => store.close());
  assert.equal(await store.revision(), end);
  assert.deepEqual((await store.get('Volume', 'v'))?.value, { n: 2 });
  assert.notEqual(await store.get('NodeLease', 'n1'), null, 'the lease got a fresh TTL at reopen');
  await store.keepAlive(lease.id);
  const events: WatchEvent[] = [];
  const w = store.watch({ afterRevision: middle }, { onEvent: (e) => events.push(e) });
  t.after(() => w.close());
  const next = await store.create('Volume', 'w', {});
  assert.ok(next.resourceVersion > end, 'revisions keep growing after a reopen');
  while (events.length < 2) await new Promise((resolve) => setTimeout(resolve, 10));
  assert.deepEqual(events.map((e) => e.name), ['v', 'w']);
  clock.ms += 6000;
  await new Promise((resolve) => setTimeout(resolve, 400));
  assert.equal(await store.get('NodeLease', 'n1'), null, 'expires when not kept alive after the reopen');
});

test('sqlite: a watch from before the kept history fails with COMPACTED', async (t) => {
  const store = SqliteStore.open(':memory:', { historyLimit: 5 });
  t.after(() => store.close());
  for (let i = 0; i < 20; i++) await store.create('Volume', `v${i}`, {});
  const error = await new Promise<Error>((resolve) => {
    store.watch({ afterRevision: 3 }, { onEvent: () => assert.fail('no event after COMPACTED'), onError: resolve });
  });
  assert.equal(codeOf(error), ErrorCode.COMPACTED);
  // From inside the history it works.
  const got: string[] = [];
  const w = store.watch({ afterRevision: 17 }, { onEvent: (e) => got.push(e.name) });
  t.after(() => w.close());
  while (got.length < 3) await new Promise((resolve) => setTimeout(resolve, 10));
  assert.deepEqual(got, ['v17', 'v18', 'v19']);
});

test('sqlite: a second process cannot open a store in use (BUSY), and a bad file is a clear error', async (t) => {
  const dir = tempDir(t);
  const file = path.join(dir, 'store.db');
  const store = SqliteStore.open(file);
  await store.create('Volume', 'v', {});
  t.after(() => store.close());
  const child = spawn(process.execPath, ['--input-type=module', '-e', `
    import { SqliteStore } from ${JSON.stringify(path.resolve('src/store/sqlite-store.ts'))};
    try { const s = SqliteStore.open(${JSON.stringify(file)}); await s.get('Volume', 'v'); await s.create('Volume', 'x', {}); console.log('opened'); }
    catch (err) { console.log(err.code + ' ' + err.message); }
  `], { stdio: ['ignore', 'pipe', 'inherit'] });
  let out = '';
  child.stdout.on('data', (d) => (out += d));
  await new Promise((resolve) => child.on('exit', resolve));
  assert.match(out, /BUSY .*another process/);

  const notADatabase = path.join(dir, 'junk.db');
  (await import('node:fs')).writeFileSync(notADatabase, 'this is not a database file at all, just text '.repeat(100));
  assert.throws(() => SqliteStore.open(notADatabase), (err: unknown) => codeOf(err) === ErrorCode.EIO && /junk\.db/.test((err as Error).message));
});

test('sqlite: every acknowledged write survives SIGKILL of the writer', async (t) => {
  const file = path.join(tempDir(t), 'store.db');
  // The writer prints each write's name once its promise resolved (acknowledged = durable).
  const child = spawn(process.execPath, ['--input-type=module', '-e', `
    import { SqliteStore } from ${JSON.stringify(path.resolve('src/store/sqlite-store.ts'))};
    const s = SqliteStore.open(${JSON.stringify(file)});
    for (let i = 0; ; i++) {
      await s.create('Volume', 'v' + i, { i, pad: 'x'.repeat(i % 500) });
      if (i > 0) await s.update('Volume', 'v' + (i - 1), { i: i - 1, updated: true });
      process.stdout.write('v' + i + '\\n');
    }
  `], { stdio: ['ignore', 'pipe', 'inherit'] });
  const acknowledged: string[] = [];
  const lines = readline.createInterface({ input: child.stdout });
  await new Promise<void>((resolve) => {
    lines.on('line', (line) => {
      acknowledged.push(line);
      if (acknowledged.length === 200) {
        child.kill('SIGKILL');
        resolve();
      }
    });
  });
  await new Promise((resolve) => child.on('exit', resolve));
  assert.ok(acknowledged.length >= 200);
  const store = SqliteStore.open(file);
  t.after(() => store.close());
  const names = new Set((await store.list('Volume')).items.map((o) => o.name));
  for (const name of acknowledged) assert.ok(names.has(name), `acknowledged ${name} survived`);
  const last = acknowledged.length - 1;
  const secondLast = await store.get<{ updated?: boolean }>('Volume', `v${last - 1}`);
  assert.equal(secondLast?.value.updated, true, 'acknowledged updates survived');
});
