/**
 * Recovery costs on a 3-replica volume (real processes: replicas, engine, frontend):
 *  1. Recovery after an engine crash under load: a writer keeps N regions (4 MiB) busy with 4k
 *     writes and no flush, the engine is SIGKILLed and started again; the table shows the
 *     regions and bytes the engine's start-up recovery resynced, its own duration, the time from
 *     the kill to the engine being ready, and the longest the client waited for a write across
 *     the crash — for several N.
 *  2. Delta vs full rebuild: the volume filled with data, one replica stopped, 1% of the volume
 *     written (whole regions, picked at random), the replica started again and added back (a
 *     delta rebuild: only the regions written meanwhile); then the same replica wiped and added
 *     as new (a full rebuild). Bytes copied and seconds, side by side.
 * Run on demand: `node bench/recovery.ts`.  BENCH_SIZE_MIB (1024), BENCH_ACTIVE (1,8,32,128).
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { FaultCluster } from '../test/support/fault-cluster.ts';
import { renderTable } from '../test/support/fault-table.ts';
import { BLOCK_BYTES, REGION_BYTES, encodeBlock } from '../test/support/fault-writer.ts';
import { Prng } from '../test/support/fault-prng.ts';
import type { NbdClient } from '../test/support/nbd-client.ts';

const MiB = 1024 * 1024;
const SIZE_MIB = Number(process.env.BENCH_SIZE_MIB ?? 1024);
const SIZE = SIZE_MIB * MiB;
const REGIONS = SIZE / REGION_BYTES;
const ACTIVE = (process.env.BENCH_ACTIVE ?? '1,8,32,128').split(',').map(Number).filter((n) => n > 0 && n <= REGIONS);

async function withCluster<T>(fn: (cluster: FaultCluster) => Promise<T>): Promise<T> {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'zb-rec-'));
  const cleanups: (() => unknown)[] = [];
  try {
    const cluster = await FaultCluster.start({ after: (f) => cleanups.push(f) }, { root, sizeBytes: SIZE, requestTimeoutMs: 8000 });
    return await fn(cluster);
  } finally {
    for (const f of cleanups) await f();
    fs.rmSync(root, { recursive: true, force: true });
  }
}

/**
 * Writes 4k blocks at random inside `regions`, `depth` at a time, until stop() — no flush, so
 * the regions stay active. Records the longest time any write waited for its reply.
 */
function loadRegions(client: NbdClient, regions: number[], random: Prng): { stop: () => Promise<number>; writes: () => number } {
  let running = true;
  let writes = 0;
  let maxWaitMs = 0;
  const regionBlocks = REGION_BYTES / BLOCK_BYTES;
  const worker = async (): Promise<void> => {
    const data = Buffer.allocUnsafe(BLOCK_BYTES);
    while (running) {
      const block = random.pick(regions) * regionBlocks + random.int(regionBlocks);
      encodeBlock(data, 0, ++writes, block);
      const sent = performance.now();
      const errno = await client.write(block * BLOCK_BYTES, data);
      if (errno !== 0) throw new Error(`write errno ${errno}`);
      maxWaitMs = Math.max(maxWaitMs, performance.now() - sent);
    }
  };
  const workers = Array.from({ length: 8 }, worker);
  return {
    writes: () => writes,
    stop: async () => {
      running = false;
      await Promise.all(workers);
      return maxWaitMs;
    },
  };
}

async function engineCrash(active: number, random: Prng): Promise<string[]> {
  return withCluster(async (cluster) => {
    const client = await cluster.connectNbd();
    // Every region to be busy gets one write first, so all of them are active at the kill.
    const regions = Array.from({ length: REGIONS }, (_, i) => i).sort(() => random.next() - 0.5).slice(0, active);
    const warm = Buffer.alloc(BLOCK_BYTES, 1);
    await Promise.all(regions.map((r) => client.write(r * REGION_BYTES, warm)));
    const load = loadRegions(client, regions, random);
    await new Promise((r) => setTimeout(r, 1000));
    const killed = performance.now();
    await cluster.killEngine();
    await cluster.startEngine();
    const readyMs = performance.now() - killed;
    const recovery = await cluster.recovery();
    await new Promise((r) => setTimeout(r, 500));
    const maxWaitMs = await load.stop();
    await client.disconnect();
    return [
      String(active), String(recovery?.regions ?? '?'), recovery ? `${(recovery.bytes / MiB).toFixed(0)} MiB` : '?',
      recovery ? recovery.durationMs.toFixed(0) : '?', readyMs.toFixed(0), maxWaitMs.toFixed(0),
    ];
  });
}

async function deltaVsFull(random: Prng): Promise<string[][]> {
  return withCluster(async (cluster) => {
    const uri = `nbd+unix:///${cluster.name}?socket=${cluster.nbdSocket}`;
    const fill = spawnSync('fio', ['--name=fill', '--ioengine=nbd', `--uri=${uri}`, '--rw=write', '--bs=1M', '--iodepth=8', `--size=${SIZE_MIB}M`, '--output-format=json'], { maxBuffer: 64 * MiB });
    if (fill.status !== 0) throw new Error(`fio fill failed: ${fill.stderr}`);
    const client = await cluster.connectNbd();
    // Settle: regions leave the active sets at the flush after the one that confirmed them.
    for (let i = 0; i < 3; i++) {
      if ((await client.flush()) !== 0) throw new Error('flush failed');
      await new Promise((r) => setTimeout(r, 200));
    }
    const victim = 2;
    const probe = await cluster.replicaClient(victim);
    const activeBefore = (await probe.intentGet()).active.length;
    probe.close();
    await cluster.killReplica(victim, 'SIGTERM');
    // 1% of the volume, in whole regions picked at random (at least one).
    const count = Math.max(1, Math.round(REGIONS / 100));
    const regions = Array.from({ length: REGIONS }, (_, i) => i).sort(() => random.next() - 0.5).slice(0, count);
    const data = Buffer.allocUnsafe(REGION_BYTES);
    for (const r of regions) {
      for (let b = 0; b < REGION_BYTES / BLOCK_BYTES; b++) encodeBlock(data, b * BLOCK_BYTES, r + 1, r * (REGION_BYTES / BLOCK_BYTES) + b);
      if ((await client.write(r * REGION_BYTES, data)) !== 0) throw new Error('write failed');
    }
    if ((await client.flush()) !== 0) throw new Error('flush failed');
    await client.disconnect();
    await cluster.startReplica(victim);
    const delta = await cluster.readd(victim, 600_000);
    // Now the same replica as a new one: a full copy.
    await cluster.control('DELETE', `/v1/replicas/${encodeURIComponent(cluster.engineAddress(victim))}`);
    await cluster.killReplica(victim, 'SIGTERM');
    fs.rmSync(cluster.replicaDirs[victim], { recursive: true, force: true });
    await cluster.startReplica(victim);
    const full = await cluster.readd(victim, 600_000);
    process.stderr.write(`active regions of the stopped replica before it stopped: ${activeBefore}\n`);
    return [
      [`${delta.kind} rebuild after ${count} region(s) written`, `${(delta.bytes / MiB).toFixed(0)} MiB`, ((delta.bytes / SIZE) * 100).toFixed(1) + '%', (delta.durationMs / 1000).toFixed(2)],
      [`${full.kind} rebuild (new replica)`, `${(full.bytes / MiB).toFixed(0)} MiB`, ((full.bytes / SIZE) * 100).toFixed(1) + '%', (full.durationMs / 1000).toFixed(2)],
    ];
  });
}

async function main(): Promise<void> {
  const random = new Prng(Number(process.env.BENCH_SEED ?? 1));
  const crashRows: string[][] = [];
  for (const n of ACTIVE) {
    crashRows.push(await engineCrash(n, random));
    process.stderr.write(`engine crash with ${n} active region(s) done\n`);
  }
  const rebuildRows = await deltaVsFull(random);
  console.log(`${SIZE_MIB} MiB volume, 3 replicas, ${os.cpus().length} cores`);
  console.log('\nengine SIGKILL under 4k write load (8 in flight, no flush) on N regions, then restart:');
  console.log(renderTable(['active regions', 'resynced regions', 'resynced', 'recovery ms', 'kill to ready ms', 'max client write wait ms'], crashRows));
  console.log(`\nrebuild of a replica that was away while 1% of the volume was written (volume full of data):`);
  console.log(renderTable(['rebuild', 'bytes copied', 'of volume', 'seconds'], rebuildRows));
}

await main();
