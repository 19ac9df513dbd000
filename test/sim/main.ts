/**
 * Runs the simulator from the command line:
 *   npm run sim -- --seed N [--steps M]          one run (replays a failure: same seed, same run)
 *   npm run sim -- --seeds K [--from N]          K runs with seeds N, N+1, …
 *   npm run sim -- --minutes T                   random seeds for T minutes (the long mode)
 * --stop-at-failure ends at the first failing seed; --quiet prints only failures.
 * A failing run prints its seed, the problems, and the last lines of its trace.
 */
import { parseArgs } from 'node:util';
import { runSimulation } from './simulation.ts';
import { report } from './report.ts';

const { values } = parseArgs({
  options: {
    seed: { type: 'string' },
    steps: { type: 'string', default: '3000' },
    seeds: { type: 'string' },
    from: { type: 'string' },
    minutes: { type: 'string' },
    'no-faults': { type: 'boolean', default: false },
    'stop-at-failure': { type: 'boolean', default: false },
    quiet: { type: 'boolean', default: false },
  },
});

function whole(name: string, raw: string | undefined, fallback: number): number {
  if (raw === undefined) return fallback;
  const n = Number(raw);
  if (!Number.isSafeInteger(n) || n < 0) {
    process.stderr.write(`--${name} must be a whole number, got ${JSON.stringify(raw)}\n`);
    process.exit(2);
  }
  return n;
}

const steps = whole('steps', values.steps, 3000);
const faults = !values['no-faults'];
let failures = 0;
let runs = 0;
const runOne = async (seed: number): Promise<void> => {
  const result = await runSimulation({ seed, steps, faults });
  runs++;
  if (!result.ok) failures++;
  if (!result.ok || !values.quiet) process.stdout.write(report(result) + '\n');
};

if (values.seed !== undefined) {
  await runOne(whole('seed', values.seed, 0));
} else if (values.minutes !== undefined) {
  const endMs = Date.now() + whole('minutes', values.minutes, 1) * 60_000;
  while (Date.now() < endMs && !(values['stop-at-failure'] && failures > 0)) await runOne(Math.floor(Math.random() * 0xffffffff));
} else {
  const from = whole('from', values.from, 1);
  const count = whole('seeds', values.seeds, 20);
  for (let seed = from; seed < from + count && !(values['stop-at-failure'] && failures > 0); seed++) await runOne(seed);
}
process.stdout.write(`${runs} run(s), ${failures} failed\n`);
process.exit(failures > 0 ? 1 : 0);
