/**
 * The process supervisor with small stand-in programs: a crashing process is restarted with
 * growing, capped delays; a supervisor that goes away leaves its processes running and a new one
 * adopts them (no duplicate) — but not a record whose pid now belongs to someone else.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { ProcessSupervisor } from '../../src/agent/process-supervisor.ts';
import { procStat } from '../../src/os/process-identity.ts';
import { tempDir } from '../support/tmp.ts';
import { waitFor } from '../support/zebu-up.ts';

/** A stand-in for src/cli/main.ts: `crash` exits at once; `serve` prints ready and waits. */
function program(dir: string): string {
  const file = path.join(dir, 'program.mjs');
  fs.writeFileSync(file, `
    const [mode] = process.argv.slice(2);
    if (mode === 'crash') { console.error('crashing on purpose'); process.exit(3); }
    console.log(JSON.stringify({ ready: true, pid: process.pid }));
    process.on('SIGTERM', () => process.exit(0));
    setInterval(() => {}, 1000);
  `);
  return file;
}

function supervisor(dir: string, main: string, events: Record<string, unknown>[] = []): ProcessSupervisor {
  return new ProcessSupervisor({
    recordDir: path.join(dir, 'procs'), logDir: path.join(dir, 'logs'), main, pollMs: 50, backoffMsMin: 50, backoffMsMax: 400,
    log: (e) => events.push(e),
  });
}

function alive(pid: number): boolean {
  return procStat(pid) !== null;
}

test('a crashing process is restarted with exponential backoff, capped', async (t) => {
  const dir = tempDir(t);
  const events: Record<string, unknown>[] = [];
  const sup = supervisor(dir, program(dir), events);
  t.after(async () => {
    await sup.stop('c');
    sup.detach();
  });
  const startedAt: number[] = [];
  sup.ensure('c', ['crash']);
  await waitFor('seven restarts', () => {
    const view = sup.get('c')!;
    if (startedAt.length === 0 || view.restarts > startedAt.length - 1) startedAt.push(Date.now());
    return view.restarts >= 7;
  }, 30_000, 5);
  const view = sup.get('c')!;
  assert.notEqual(view.state, 'running');
  assert.match(view.message ?? '', /exit|code 3|crash/i);
  const gaps = startedAt.slice(1).map((at, i) => at - startedAt[i]);
  // 50, 100, 200, 400, 400, ... ms (plus start-up time): growing, then no longer.
  assert.ok(gaps.at(-1)! < 3000, `capped: ${gaps.join(', ')}`);
  assert.ok(Math.max(...gaps) >= 300, `grew: ${gaps.join(', ')}`);
  assert.match(fs.readFileSync(path.join(dir, 'logs', 'c.log'), 'utf8'), /crashing on purpose/);
});

test('a process killed after it served is restarted after the shortest wait every time: no growing backoff for a working process', async (t) => {
  const dir = tempDir(t);
  const sup = new ProcessSupervisor({ recordDir: path.join(dir, 'procs'), logDir: path.join(dir, 'logs'), main: program(dir), pollMs: 50, backoffMsMin: 50, backoffMsMax: 5000 });
  t.after(async () => {
    await sup.stop('s');
    sup.detach();
  });
  sup.ensure('s', ['serve']);
  const downMs: number[] = [];
  for (let i = 0; i < 6; i++) {
    await waitFor('running', () => sup.get('s')?.state === 'running', 20_000, 5);
    const pid = sup.get('s')!.pid!;
    process.kill(pid, 'SIGKILL');
    const killedAt = Date.now();
    await waitFor('running again', () => sup.get('s')?.state === 'running' && sup.get('s')!.pid !== pid, 20_000, 5);
    downMs.push(Date.now() - killedAt);
  }
  assert.equal(sup.get('s')!.restarts, 6);
  // 50 ms each time plus the start (a crash loop at start-up would be at 3.2 s by now).
  assert.ok(Math.max(...downMs) < 2500, `down for ${downMs.join(', ')} ms`);
});

test('processes outlive their supervisor and are adopted once; a recycled pid is not adopted', async (t) => {
  const dir = tempDir(t);
  const main = program(dir);
  const first = supervisor(dir, main);
  first.ensure('a', ['serve']);
  first.ensure('b', ['serve']);
  await waitFor('both running', () => first.get('a')?.state === 'running' && first.get('b')?.state === 'running', 20_000, 20);
  const pidA = first.get('a')!.pid!;
  const pidB = first.get('b')!.pid!;
  first.detach();
  assert.ok(alive(pidA) && alive(pidB), 'still running without a supervisor');

  // Forge a record whose pid is alive but is another process (ours), as after a pid reuse.
  const forged = JSON.parse(fs.readFileSync(path.join(dir, 'procs', 'b.json'), 'utf8'));
  fs.writeFileSync(path.join(dir, 'procs', 'b.json'), JSON.stringify({ ...forged, pid: process.pid }));
  process.kill(pidB, 'SIGKILL');

  const second = supervisor(dir, main);
  t.after(async () => {
    await second.stop('a');
    await second.stop('b');
    second.detach();
  });
  const adopted = second.adopt();
  assert.deepEqual(adopted, ['a'], 'only the process that is really ours');
  const view = second.ensure('a', ['serve']);
  assert.equal(view.pid, pidA, 'ensure() keeps the adopted process: no duplicate');
  assert.equal(view.adopted, true);
  const b = second.ensure('b', ['serve']);
  await waitFor('b started afresh', () => second.get('b')?.state === 'running', 20_000, 20);
  assert.notEqual(second.get('b')!.pid, pidB);
  assert.notEqual(b.pid, process.pid);

  // An adopted process that dies is noticed (by polling) and restarted.
  process.kill(pidA, 'SIGKILL');
  await waitFor('a restarted', () => {
    const a = second.get('a')!;
    return a.state === 'running' && a.pid !== pidA;
  }, 20_000, 20);
  await second.stop('a');
  assert.equal(second.get('a')?.state ?? 'stopped', 'stopped');
});
