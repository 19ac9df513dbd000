import type { SimResult } from './simulation.ts';

/** A run in words: a line for a pass; for a failure the problems, the trace and how to replay it. */
export function report(result: SimResult): string {
  const lines = [`seed ${result.seed}: ${result.ok ? 'ok' : `FAILED at step ${result.failedAtStep}`} (${result.steps} steps) ${JSON.stringify(result.stats)}`];
  if (!result.ok) {
    lines.push('problems:', ...result.problems.map((p) => `  ${p}`));
    lines.push('trace (last lines):', ...result.trace.map((t) => `  ${t}`));
    lines.push(`replay: npm run sim -- --seed ${result.seed} --steps ${result.steps}`);
  }
  return lines.join('\n');
}
