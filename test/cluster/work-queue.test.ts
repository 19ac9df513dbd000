import { test } from 'node:test';
import assert from 'node:assert/strict';
import { WorkQueue } from '../../src/cluster/work-queue.ts';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

test('a key never runs twice at once; one added while running runs again once', async () => {
  let running = 0;
  let maxRunning = 0;
  let runs = 0;
  const q = new WorkQueue({
    name: 't',
    reconcile: async () => {
      running++;
      maxRunning = Math.max(maxRunning, running);
      runs++;
      await sleep(30);
      running--;
      return null;
    },
  });
  q.add('a');
  await sleep(5);
  q.add('a');
  q.add('a');
  q.add('a');
  await sleep(150);
  await q.idle();
  assert.equal(maxRunning, 1);
  assert.equal(runs, 2);
  await q.stop();
});

test('different keys run concurrently up to the limit', async () => {
  let running = 0;
  let maxRunning = 0;
  const q = new WorkQueue({
    name: 't',
    concurrency: 3,
    reconcile: async () => {
      running++;
      maxRunning = Math.max(maxRunning, running);
      await sleep(20);
      running--;
      return null;
    },
  });
  for (const k of ['a', 'b', 'c', 'd', 'e']) q.add(k);
  await sleep(10);
  await q.idle();
  assert.equal(maxRunning, 3);
  await q.stop();
});

test('a failing reconcile is retried with growing backoff; success clears it', async () => {
  const times: number[] = [];
  const q = new WorkQueue({
    name: 't',
    backoffMsMin: 20,
    backoffMsMax: 100,
    reconcile: async () => {
      times.push(Date.now());
      if (times.length < 4) throw new Error('not yet');
      return null;
    },
  });
  q.add('k');
  for (let i = 0; i < 100 && times.length < 4; i++) await sleep(20);
  assert.equal(times.length, 4);
  assert.ok(times[2] - times[1] >= times[1] - times[0] - 5, 'backoff grows');
  await sleep(150);
  assert.equal(times.length, 4, 'no more runs after success');
  await q.stop();
});

test('requeue after a delay; an earlier wake-up replaces a later one', async () => {
  const runs: number[] = [];
  const start = Date.now();
  const q = new WorkQueue({
    name: 't',
    reconcile: async () => {
      runs.push(Date.now() - start);
      return runs.length === 1 ? 10_000 : null;
    },
  });
  q.add('k');
  await sleep(20);
  q.add('k', 30);
  await sleep(200);
  assert.equal(runs.length, 2);
  assert.ok(runs[1] < 1000);
  await q.stop();
});
