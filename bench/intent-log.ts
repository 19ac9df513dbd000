/**
 * Cost of the write-intent log: fio 4k random writes (iodepth 16, a FLUSH every BENCH_FSYNC
 * writes) over a 1 GiB working set on a 3-replica volume (real processes: replicas, engine,
 * frontend), with the log on and with it off (`zebu replica serve --no-intent-log`, the baseline),
 * measured in the same run, alternating, each on a fresh volume. Prints IOPS, mean and p99
 * latency, and the cost of the log against the baseline (target: at most 5%).
 * Run on demand: `node bench/intent-log.ts`.  BENCH_SIZE_MIB (1024), BENCH_SECONDS (10),
 * BENCH_FSYNC (64), BENCH_PAIRS (2).
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { FaultCluster } from '../test/support/fault-cluster.ts';
import { renderTable } from '../test/support/fault-table.ts';

const SIZE_MIB = Number(process.env.BENCH_SIZE_MIB ?? 1024);
const SECONDS = Number(process.env.BENCH_SECONDS ?? 10);
const FSYNC = Number(process.env.BENCH_FSYNC ?? 64);
const PAIRS = Number(process.env.BENCH_PAIRS ?? 2);

interface Sample {
  variant: 'log on' | 'log off';
  iops: number;
  latMeanUs: number;
  latP99Us: number;
  activeRegions: number | null;
}

async function measure(variant: Sample['variant']): Promise<Sample> {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'zb-wil-'));
  const cleanups: (() => unknown)[] = [];
  try {
    const cluster = await FaultCluster.start({ after: (fn) => cleanups.push(fn) }, {
      root, sizeBytes: SIZE_MIB * 1024 * 1024, replicaArgs: variant === 'log off' ? ['--no-intent-log'] : [], requestTimeoutMs: 8000,
    });
    const uri = `nbd+unix:///${cluster.name}?socket=${cluster.nbdSocket}`;
    const r = spawnSync('fio', [
      '--name=wil', '--ioengine=nbd', `--uri=${uri}`, '--rw=randwrite', '--bs=4k', '--iodepth=16', `--size=${SIZE_MIB}M`,
      `--fsync=${FSYNC}`, '--time_based', `--runtime=${SECONDS}`, '--ramp_time=1', '--randrepeat=0', '--output-format=json',
    ], { maxBuffer: 64 * 1024 * 1024 });
    if (r.status !== 0) throw new Error(`fio failed: ${r.stderr}`);
    const out = r.stdout.toString();
    const job = JSON.parse(out.slice(out.indexOf('{'))).jobs[0];
    const info = await cluster.info();
    await cluster.stop();
    return {
      variant,
      iops: job.write.iops,
      latMeanUs: job.write.clat_ns.mean / 1000,
      latP99Us: (job.write.clat_ns.percentile?.['99.000000'] ?? 0) / 1000,
      activeRegions: typeof info.activeRegions === 'number' ? info.activeRegions : null,
    };
  } finally {
    for (const fn of cleanups) await fn();
    fs.rmSync(root, { recursive: true, force: true });
  }
}

async function main(): Promise<void> {
  const samples: Sample[] = [];
  // Alternating, baseline first: drift of the machine hits both variants alike.
  for (let i = 0; i < PAIRS; i++) {
    for (const variant of ['log off', 'log on'] as const) {
      const s = await measure(variant);
      samples.push(s);
      process.stderr.write(`${variant}: ${s.iops.toFixed(0)} IOPS\n`);
    }
  }
  const mean = (v: Sample['variant'], k: 'iops' | 'latMeanUs' | 'latP99Us'): number => {
    const xs = samples.filter((s) => s.variant === v).map((s) => s[k]);
    return xs.reduce((a, b) => a + b, 0) / xs.length;
  };
  const base = mean('log off', 'iops');
  const rows = (['log off', 'log on'] as const).map((v) => [
    v === 'log off' ? 'write-intent log off (baseline)' : 'write-intent log on',
    mean(v, 'iops').toFixed(0),
    mean(v, 'latMeanUs').toFixed(0),
    mean(v, 'latP99Us').toFixed(0),
    v === 'log off' ? '-' : `${(((base - mean(v, 'iops')) / base) * 100).toFixed(1)}%`,
  ]);
  console.log(`fio 4k randwrite, iodepth 16, flush every ${FSYNC} writes, ${SIZE_MIB} MiB working set, 3 replicas, ${SECONDS} s x ${PAIRS} runs each, ${os.cpus().length} cores`);
  console.log(renderTable(['variant', 'IOPS', 'lat mean us', 'lat p99 us', 'IOPS cost'], rows));
}

await main();
