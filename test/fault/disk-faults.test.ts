/**
 * Disk and link faults on one replica of a 3-replica volume under the recording writer (real
 * processes, no manager):
 *   - a write failing with EIO, or with ENOSPC, on one replica's disk (FAULT_INJECT);
 *   - an fdatasync failing with EIO (the replica refuses everything until it is restarted);
 *   - the engine's connection to one replica blackholed by a proxy (no FIN, no RST: requests,
 *     replies or both dropped) until the engine's deadline takes the replica out.
 * The engine must take the faulty replica out with no client error; once the fault is gone the
 * replica comes back by a delta rebuild (its data is intact apart from the regions it was
 * writing), not a full one; then no acknowledged write is lost, verify and a direct read of every
 * replica find 0 differing regions, and at the end the stopped replica directories compare equal.
 * Prints a table of figures. ZEBU_FAULT_SEED reproduces the schedule; ZEBU_FAULT_ROUNDS sets the
 * faults per kind (default 2; ZEBU_FAULT_FULL=1: 6).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Prng, faultSeed, faultFull, envCount } from '../support/fault-prng.ts';
import { FaultCluster, faultRoot } from '../support/fault-cluster.ts';
import { FaultRounds, sleep } from '../support/fault-rounds.ts';
import type { BlackholeDirection } from '../support/fault-proxy.ts';

const MiB = 1024 * 1024;
const SIZE = 32 * MiB;
const KINDS = ['write EIO', 'write ENOSPC', 'sync EIO', 'blackhole'] as const;
/** The engine's deadline per replica request: how long a blackholed replica takes to be dropped. */
const REQUEST_TIMEOUT_MS = 1500;
const PROXIED = 0;

/** Polls until replica `i` is out of the set (ERR) in the engine's view. */
async function waitErr(cluster: FaultCluster, i: number, what: string, timeoutMs = 20_000): Promise<void> {
  const address = cluster.engineAddress(i);
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const row = (await cluster.replicaRows()).find((r) => r.address === address);
    if (row?.mode === 'ERR') return;
    if (Date.now() > deadline) throw new Error(`${what}: replica ${address} still ${row?.mode} after ${timeoutMs} ms`);
    await sleep(20);
  }
}

test('EIO and ENOSPC on one replica\'s disk; one replica\'s link blackholed', { timeout: 20 * 60_000 }, async (t) => {
  const seed = faultSeed();
  t.diagnostic(`ZEBU_FAULT_SEED=${seed}`);
  const perKind = envCount('ZEBU_FAULT_ROUNDS', faultFull() ? 6 : 2);
  const random = new Prng(seed);
  const root = faultRoot(t);
  const cluster = await FaultCluster.start(t, { root, sizeBytes: SIZE, replicaArgs: ['--fault-injection'], proxied: [PROXIED], requestTimeoutMs: REQUEST_TIMEOUT_MS });
  const rounds = await FaultRounds.start(cluster, random, seed);

  const schedule = Array.from({ length: perKind * KINDS.length }, (_, i) => KINDS[i % KINDS.length]);
  for (let i = schedule.length - 1; i > 0; i--) {
    const j = random.int(i + 1);
    [schedule[i], schedule[j]] = [schedule[j], schedule[i]];
  }
  for (const kind of schedule) {
    const ok = await rounds.run(kind, 'acked', async () => {
      if (kind === 'blackhole') {
        const direction = random.pick<BlackholeDirection>(['both', 'requests', 'replies']);
        const proxy = cluster.proxies[PROXIED]!;
        const droppedBefore = proxy.droppedRequestBytes + proxy.droppedReplyBytes;
        proxy.blackhole(direction);
        await waitErr(cluster, PROXIED, `blackhole (${direction})`);
        // The replica went out because its link went dark, not for another reason.
        if (proxy.droppedRequestBytes + proxy.droppedReplyBytes === droppedBefore) throw new Error(`blackhole (${direction}): nothing was dropped`);
        await sleep(random.range(0, 300));
        proxy.restore();
        return { rebuilds: [await cluster.readd(PROXIED)] };
      }
      const i = random.int(cluster.replicaDirs.length);
      const client = await cluster.replicaClient(i);
      try {
        if (kind === 'sync EIO') {
          await client.injectFaults({ rules: [{ op: 'sync', errno: 'EIO', count: 1 }] });
        } else {
          // Layer data files only: the write itself fails (a failing journal write is a sync-class fault).
          await client.injectFaults({ rules: [{ op: 'write', errno: kind === 'write EIO' ? 'EIO' : 'ENOSPC', count: 1, afterOps: random.int(50), pathIncludes: '.data' }] });
        }
        await waitErr(cluster, i, kind);
        await client.injectFaults({ clear: true });
      } finally {
        client.close();
      }
      if (kind === 'sync EIO') {
        // A replica whose sync failed refuses all I/O until it is opened again: restart it.
        await cluster.killReplica(i, 'SIGTERM');
        await cluster.startReplica(i);
      }
      return { rebuilds: [await cluster.readd(i)] };
    });
    if (!ok) break;
  }
  const failures = await rounds.finish(t, `disk and link faults on one replica, ${schedule.length} faults, ${SIZE / MiB} MiB volume, 3 replicas`);
  assert.deepEqual(failures, [], `ZEBU_FAULT_SEED=${seed}:\n${failures.join('\n')}`);
});
