/**
 * The simulator's default run in the test suite: a block of seeds, each a subtest. A failure
 * prints the seed, the problems and the trace, and the command that replays it. The seeds are
 * fixed (the suite gives the same answer every time); `npm run sim -- --minutes T` explores new ones.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { runSimulation } from './simulation.ts';
import { report } from './report.ts';

export const DEFAULT_STEPS = 2000;

export function simulateSeeds(from: number, count: number, steps = DEFAULT_STEPS): void {
  for (let seed = from; seed < from + count; seed++) {
    test(`simulated volume, seed ${seed}`, async () => {
      const result = await runSimulation({ seed, steps });
      assert.ok(result.ok, report(result));
    });
  }
}
