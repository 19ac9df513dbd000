/**
 * Memory given back after a load: the trim comes once after an interval with work is followed by a
 * quiet one, never while the process works, never again while it stays idle; the real addon's
 * trim runs (glibc) and memory freed after a burst of Buffer allocations leaves the process.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import v8 from 'node:v8';
import vm from 'node:vm';
import { releaseMemoryAfterLoad, memoryReleaseUnavailable } from '../../src/os/memory-release.ts';
import { loadAddon } from '../../src/os/native-addon.ts';

function fakeTimer(): { tick: () => void; options: { setInterval: (fn: () => void) => object; clearInterval: () => void }; stopped: () => boolean } {
  let fn: (() => void) | null = null;
  let stopped = false;
  return {
    tick: () => fn!(),
    options: { setInterval: (f) => ((fn = f), {}), clearInterval: () => void (stopped = true) },
    stopped: () => stopped,
  };
}

/** V8's gc(), made available at run time (the test runner starts this file without --expose-gc). */
function fullCollection(): void {
  v8.setFlagsFromString('--expose-gc');
  (vm.runInNewContext('gc') as () => void)();
}

test('a trim (caches emptied first) after work followed by a quiet interval, when memory grew; none while busy or idle', () => {
  let cpu = 0;
  let resident = 100;
  let trims = 0;
  let emptied = 0;
  const timer = fakeTimer();
  const release = releaseMemoryAfterLoad({
    intervalMs: 1000, busyCpuMs: 50, minGrowthBytes: 10, cpuMicros: () => cpu, residentBytes: () => resident,
    emptyCaches: () => void emptied++,
    trim: () => {
      assert.equal(emptied, trims + 1, 'the caches are emptied before every trim');
      trims++;
      resident = 105;
      return true;
    },
    ...timer.options,
  });
  const interval = (cpuMs: number, grownTo = resident): void => {
    cpu += cpuMs * 1000;
    resident = grownTo;
    timer.tick();
  };
  interval(1);
  interval(2);
  assert.equal(trims, 0, 'idle from the start: nothing to give back');
  interval(300, 150);
  interval(400);
  assert.equal(trims, 0, 'busy: no trim');
  interval(10);
  assert.equal(trims, 1, 'quiet after work, memory grew: one trim');
  interval(0);
  interval(5);
  assert.equal(trims, 1, 'still idle: no second trim');
  interval(60, 108);
  interval(0);
  assert.equal(trims, 1, 'a light load that took little memory: nothing worth a trim');
  interval(60, 140);
  interval(0);
  assert.equal(trims, 2);
  assert.equal(emptied, 2, 'the caches are emptied with every trim, never otherwise');
  assert.equal(release.trims, 2);
  release.stop();
  assert.ok(timer.stopped());
});

test('the memory addon trims malloc\'s heap: freed Buffer memory leaves the process', { skip: memoryReleaseUnavailable() ?? false }, async () => {
  const addon = loadAddon<{ trimMalloc(): boolean }>('memory').addon!;
  const privateKb = (): number => {
    const text = fs.readFileSync('/proc/self/smaps_rollup', 'utf8');
    return ['Private_Clean', 'Private_Dirty'].reduce((a, k) => a + Number(new RegExp(`^${k}:\\s+(\\d+) kB`, 'm').exec(text)![1]), 0);
  };
  addon.trimMalloc();
  const before = privateKb();
  // 64 MiB in 16 KiB Buffers (below malloc's mmap threshold: they come from its heap), one in 64 kept.
  let held: Buffer[] = [];
  const kept: Buffer[] = [];
  for (let i = 0; i < 4096; i++) {
    const b = Buffer.allocUnsafeSlow(16 * 1024).fill(i & 0xff);
    held.push(b);
    if (i % 64 === 63) kept.push(b);
  }
  const loaded = privateKb();
  assert.ok(loaded - before > 48 * 1024, `the allocations took memory (${before} → ${loaded} kB)`);
  held = [];
  // Buffers are freed when V8 collects them: a full collection, asked for (allocating until V8
  // chose to collect was not always enough on a busy machine).
  fullCollection();
  // The freed backing stores may be swept off the main thread: give it a moment, then again.
  await new Promise((r) => setTimeout(r, 100));
  fullCollection();
  const collected = privateKb();
  assert.equal(typeof addon.trimMalloc(), 'boolean');
  const trimmed = privateKb();
  // glibc keeps the freed chunks (they lie below the kept ones); the trim gives them back.
  assert.ok(trimmed - before < 24 * 1024, `trimmed ${collected} → ${trimmed} kB (before the load ${before})`);
  assert.equal(kept.length, 64);
});
