/**
 * The rebuild bandwidth limit (rebuild-pacer.ts) under a simulated clock: region copies that
 * take 10 ms each, started 16 at once as the rebuild starts them.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { RebuildPacer } from '../../src/engine/rebuild-pacer.ts';
import { forEachIndex } from '../../src/engine/recovery.ts';

const MiB = 1024 * 1024;
const REGION = 4 * MiB;

/** Time that passes only when every pending piece of work is waiting for it. */
class SteppedClock {
  now = 0;
  private timers: { at: number; resolve: () => void }[] = [];

  sleep = (ms: number): Promise<void> => new Promise((resolve) => this.timers.push({ at: this.now + ms, resolve }));

  /** Runs `work` to its end, moving time forward to the next timer whenever nothing else can run. */
  async run<T>(work: Promise<T>): Promise<T> {
    let done = false;
    const result = work.finally(() => {
      done = true;
    });
    while (!done) {
      await new Promise((resolve) => setImmediate(resolve));
      if (done || this.timers.length === 0) continue;
      this.timers.sort((a, b) => a.at - b.at);
      const next = this.timers.shift()!;
      this.now = Math.max(this.now, next.at);
      next.resolve();
    }
    return result;
  }
}

interface Run {
  elapsedMs: number;
  maxInFlight: number;
}

/** `regions` copies through the pacer, each writing `bytes(i)` in 10 ms; `done(n)` runs as the n-th ends. */
async function copyRegions(clock: SteppedClock, pacer: RebuildPacer, regions: number, bytes: (i: number) => number, done?: (n: number) => void): Promise<Run> {
  let inFlight = 0;
  let ended = 0;
  let maxInFlight = 0;
  const start = clock.now;
  await clock.run(forEachIndex(regions, 16, async (i) => {
    await pacer.paced(async () => {
      inFlight++;
      maxInFlight = Math.max(maxInFlight, inFlight);
      await clock.sleep(10);
      inFlight--;
      return bytes(i);
    });
    done?.(++ended);
  }));
  return { elapsedMs: clock.now - start, maxInFlight };
}

test('a rebuild limited to 16 MiB/s copies 64 MiB in 4 s, one region at a time (a quarter second ahead at most)', async () => {
  const clock = new SteppedClock();
  const pacer = new RebuildPacer(16 * MiB, REGION, () => clock.now, clock.sleep);
  const run = await copyRegions(clock, pacer, 16, () => REGION);
  assert.equal(run.maxInFlight, 1);
  assert.ok(run.elapsedMs >= 3990 && run.elapsedMs <= 4010, `took ${run.elapsedMs} ms`);
});

test('a higher limit copies several regions at once and still holds the rate', async () => {
  const clock = new SteppedClock();
  const pacer = new RebuildPacer(256 * MiB, REGION, () => clock.now, clock.sleep);
  const run = await copyRegions(clock, pacer, 256, () => REGION);
  // 1 GiB at 256 MiB/s: 4 s; a quarter second at the limit is 16 regions.
  assert.equal(run.maxInFlight, 16);
  assert.ok(run.elapsedMs >= 3990 && run.elapsedMs <= 4300, `took ${run.elapsedMs} ms`);
});

test('no limit: every region at once, no wait', async () => {
  const clock = new SteppedClock();
  const pacer = new RebuildPacer(0, REGION, () => clock.now, clock.sleep);
  const run = await copyRegions(clock, pacer, 16, () => REGION);
  assert.equal(run.maxInFlight, 16);
  assert.equal(run.elapsedMs, 10);
});

test('regions that write nothing (empty in the source) are not charged', async () => {
  const clock = new SteppedClock();
  const pacer = new RebuildPacer(16 * MiB, REGION, () => clock.now, clock.sleep);
  const run = await copyRegions(clock, pacer, 64, (i) => (i === 63 ? REGION : 0));
  // 63 empty regions one at a time (10 ms each), then one of 4 MiB paid in a quarter second.
  assert.ok(run.elapsedMs >= 640 && run.elapsedMs <= 900, `took ${run.elapsedMs} ms`);
});

test('a limit changed during the copy applies from the next region: lifted, the rest goes at once; lowered, it slows', async () => {
  const clock = new SteppedClock();
  const pacer = new RebuildPacer(16 * MiB, REGION, () => clock.now, clock.sleep);
  const lifted = await copyRegions(clock, pacer, 64, () => REGION, (n) => {
    if (n === 20) pacer.setLimit(0);
  });
  // Some 20 regions at the limit (5 s), the other 44 at once.
  assert.ok(lifted.elapsedMs >= 4500 && lifted.elapsedMs <= 5600, `took ${lifted.elapsedMs} ms`);
  pacer.setLimit(64 * MiB);
  const lowered = await copyRegions(clock, pacer, 16, () => REGION, (n) => {
    if (n === 4) pacer.setLimit(8 * MiB);
  });
  // At 64 MiB/s all 16 would take 1 s; the last 8 or so at 8 MiB/s take some 4 s more.
  assert.ok(lowered.elapsedMs >= 3500 && lowered.elapsedMs <= 5600, `took ${lowered.elapsedMs} ms`);
  assert.equal(pacer.limit, 8 * MiB);
});

test('a limit that is not a whole number of bytes per second >= 0 is refused', () => {
  const clock = new SteppedClock();
  for (const bad of [-1, 1.5, Number.NaN, Number.POSITIVE_INFINITY]) {
    assert.throws(() => new RebuildPacer(bad, REGION, () => clock.now, clock.sleep), /whole number of bytes per second/);
  }
  const pacer = new RebuildPacer(0, REGION, () => clock.now, clock.sleep);
  assert.throws(() => pacer.setLimit(-5), /whole number/);
  assert.equal(pacer.limit, 0);
});
