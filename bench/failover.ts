/**
 * What a client sees when the data path fails under it, on a 3-replica volume (real processes):
 *
 *  1. `zebu volume serve`: a client keeps 4 KiB random writes and reads going (4 at a time);
 *     the engine is SIGKILLed (the supervisor restarts it, the frontend re-issues the held
 *     requests), then SIGSTOPped (hung: the frontend's heartbeat finds it, kills it, and the
 *     same follows). The stall of one fault is the longest any request waited around it; the
 *     table gives median, p99 and max over the faults. Baseline, same run: the request latency
 *     with no fault.
 *  2. `zebu up`: every data-path process of the volume (replicas, engine, frontend) SIGKILLed at
 *     once; the time from the kill to the first request a new client connection got served
 *     (the agent restarts the replicas and the frontend, the manager gives the engine a new
 *     epoch, the engine waits for its replicas and recovers). Baseline, same run: a cold attach,
 *     from `volume attach` to the first request served.
 *
 * Run on demand: `npm run bench:failover`. BENCH_FAULTS (10), BENCH_HANG_TIMEOUT_MS (10000).
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { renderTable } from '../test/support/fault-table.ts';
import { Prng } from '../test/support/fault-prng.ts';
import { NbdClient } from '../test/support/nbd-client.ts';
import { startVolume } from '../test/support/volume-cluster.ts';
import { startZebuUp, stopZebuUp, mustZebu, mustZebuJson, killAllUnder, waitFor, processesUnder } from '../test/support/zebu-up.ts';

const MiB = 1024 * 1024;
const SIZE = 256 * MiB;
const FAULTS = Number(process.env.BENCH_FAULTS ?? 10);
const HANG_TIMEOUT_MS = Number(process.env.BENCH_HANG_TIMEOUT_MS ?? 10_000);
const random = new Prng(Number(process.env.BENCH_SEED ?? 7));

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

function percentile(values: number[], p: number): number {
  if (values.length === 0) return NaN;
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.ceil((p / 100) * sorted.length) - 1)];
}

function ms(value: number): string {
  return Number.isNaN(value) ? '-' : value < 10 ? `${value.toFixed(2)} ms` : `${Math.round(value)} ms`;
}

/** 4 KiB random writes and reads, `depth` at a time, every latency recorded with its end time. */
function load(client: NbdClient, depth: number): { stop: () => Promise<void>; samples: { endMs: number; latencyMs: number }[]; errors: () => number } {
  let running = true;
  let errors = 0;
  const samples: { endMs: number; latencyMs: number }[] = [];
  const blocks = SIZE / 4096;
  const worker = async (): Promise<void> => {
    const data = Buffer.alloc(4096, 0x5a);
    while (running) {
      const offset = random.int(blocks) * 4096;
      const started = performance.now();
      const errno = random.chance(0.5) ? await client.write(offset, data) : (await client.read(offset, 4096)).errno;
      const now = performance.now();
      if (errno !== 0) errors++;
      samples.push({ endMs: now, latencyMs: now - started });
    }
  };
  const workers = Array.from({ length: depth }, worker);
  return {
    samples,
    errors: () => errors,
    stop: async () => {
      running = false;
      await Promise.all(workers);
    },
  };
}

function enginePids(name: string, dir: string): number[] {
  return spawnSync('pgrep', ['-f', `engine serve --name ${name} .*${dir}`]).stdout.toString().split('\n').filter((x) => x !== '').map(Number);
}

async function withDir<T>(prefix: string, fn: (dir: string, after: (f: () => unknown) => void) => Promise<T>): Promise<T> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  const cleanups: (() => unknown)[] = [];
  try {
    return await fn(dir, (f) => cleanups.push(f));
  } finally {
    for (const f of cleanups.reverse()) await f();
    await killAllUnder(dir);
    fs.rmSync(dir, { recursive: true, force: true, maxRetries: 3 });
  }
}

/** Part 1: engine SIGKILL and SIGSTOP under `zebu volume serve`. */
async function engineFaults(): Promise<string[][]> {
  return withDir('zb-fo-', async (dir, after) => {
    const vol = await startVolume({ after }, { dir, replicas: 3, sizeBytes: SIZE, extraArgs: ['--hang-timeout-ms', String(HANG_TIMEOUT_MS)] });
    const client = await NbdClient.connect({ path: vol.nbdSocket }, vol.name);
    after(() => client.destroy());
    // Baseline: no fault.
    const quiet = load(client, 4);
    await sleep(5000);
    await quiet.stop();
    const baseline = quiet.samples.map((s) => s.latencyMs);

    const measure = async (signal: 'SIGKILL' | 'SIGSTOP'): Promise<{ stalls: number[]; errors: number }> => {
      const stalls: number[] = [];
      let errors = 0;
      for (let i = 0; i < FAULTS; i++) {
        const running = load(client, 4);
        await sleep(1000 + random.int(500));
        const [pid] = enginePids(vol.name, dir);
        const faultAt = performance.now();
        process.kill(pid, signal);
        // Until requests complete quickly again for a second after the fault.
        await waitFor('the volume serving again', () => {
          const recent = running.samples.filter((s) => s.endMs > faultAt);
          const last = recent.at(-1);
          return last !== undefined && performance.now() - faultAt > 500 && recent.some((s) => s.latencyMs > 0 && s.endMs - s.latencyMs > faultAt) && performance.now() - last.endMs < 100 ? true : undefined;
        }, 120_000, 20);
        await sleep(1000);
        await running.stop();
        errors += running.errors();
        // The stall: the longest request that was in flight at the fault or started after it.
        stalls.push(Math.max(...running.samples.filter((s) => s.endMs >= faultAt).map((s) => s.latencyMs)));
        if (signal === 'SIGSTOP') {
          try {
            process.kill(pid, 'SIGKILL');
          } catch {
            // killed by the frontend, as it should be
          }
        }
      }
      return { stalls, errors };
    };
    const kill = await measure('SIGKILL');
    const hang = await measure('SIGSTOP');
    await vol.stop();
    return [
      ['no fault (baseline: request latency)', String(baseline.length), ms(percentile(baseline, 50)), ms(percentile(baseline, 99)), ms(Math.max(...baseline)), '0'],
      ['engine SIGKILL: stall', String(kill.stalls.length), ms(percentile(kill.stalls, 50)), ms(percentile(kill.stalls, 99)), ms(Math.max(...kill.stalls)), String(kill.errors)],
      [`engine hung (SIGSTOP), hang timeout ${HANG_TIMEOUT_MS / 1000} s: stall`, String(hang.stalls.length), ms(percentile(hang.stalls, 50)), ms(percentile(hang.stalls, 99)), ms(Math.max(...hang.stalls)), String(hang.errors)],
    ];
  });
}

/** Part 2: every data-path process of a `zebu up` volume SIGKILLed at once. */
async function wholeVolumeKills(): Promise<string[][]> {
  return withDir('zb-up-', async (root) => {
    const dataDir = path.join(root, 'data');
    const up = await startZebuUp({ dataDir });
    try {
      mustZebu(up, ['volume', 'create', 'v', '--size', String(SIZE), '--replicas', '3']);
      const target = { host: up.nbd.slice(0, up.nbd.lastIndexOf(':')), port: Number(up.nbd.slice(up.nbd.lastIndexOf(':') + 1)) };
      const firstServed = async (): Promise<void> => {
        for (;;) {
          try {
            const c = await NbdClient.connect(target, 'v', 60_000);
            const { errno } = await c.read(0, 4096);
            c.destroy();
            if (errno === 0) return;
          } catch {
            // not served yet (export not there during a cold attach): again
          }
          await sleep(20);
        }
      };
      // Baseline: cold attach to first request.
      const attaches: number[] = [];
      for (let i = 0; i < 3; i++) {
        const started = performance.now();
        mustZebu(up, ['volume', 'attach', 'v']);
        await firstServed();
        attaches.push(performance.now() - started);
        mustZebu(up, ['volume', 'detach', 'v']);
        await waitFor('detached', () => mustZebuJson(up, ['volume', 'get', 'v']).state === 'detached', 60_000, 100);
      }
      mustZebu(up, ['volume', 'attach', 'v']);
      await firstServed();
      const recoveries: number[] = [];
      for (let i = 0; i < FAULTS; i++) {
        await waitFor('healthy', () => mustZebuJson(up, ['volume', 'get', 'v']).robustness === 'healthy', 120_000, 200);
        const victims = processesUnder(dataDir).filter((p) => p.role === 'frontend' || p.cmdline.some((a) => a === 'v' || a.includes('/replicas/v-r-')));
        const killedAt = performance.now();
        for (const p of victims) process.kill(p.pid, 'SIGKILL');
        await firstServed();
        recoveries.push(performance.now() - killedAt);
      }
      return [
        ['cold attach to first request served (baseline)', String(attaches.length), ms(percentile(attaches, 50)), ms(percentile(attaches, 99)), ms(Math.max(...attaches)), '0'],
        ['whole-volume SIGKILL to first request served', String(recoveries.length), ms(percentile(recoveries, 50)), ms(percentile(recoveries, 99)), ms(Math.max(...recoveries)), '0'],
      ];
    } finally {
      await stopZebuUp(up);
    }
  });
}

const rows = [...(await engineFaults()), ...(await wholeVolumeKills())];
process.stdout.write(`\nfailover, 3 replicas, ${SIZE / MiB} MiB volume, ${FAULTS} faults each, 4 KiB random I/O 4 at a time (${os.cpus().length} cores)\n`);
process.stdout.write(renderTable(['what', 'samples', 'median', 'p99', 'max', 'client errors'], rows) + '\n');
