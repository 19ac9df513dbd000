/**
 * SIGKILL matrix on one volume's data path (3 replica processes, engine, frontend — real
 * processes, no manager): under a writer that records every acknowledged write and flush, kill
 * at a random moment a replica, the engine, the frontend, the rebuild copier while a replica killed
 * a moment before is rebuilt (its regions are copied again by a new copier; the rebuild goes on),
 * or all of them at once; bring back what
 * was killed (the harness does the manager's part: a new epoch per engine, a failed replica added
 * back); then check:
 *   - every block holds a write allowed by the ledger: no acknowledged write lost at all where
 *     the replicas' page caches survived (replica, engine, frontend kills), none acknowledged
 *     before the last acknowledged flush lost when every process died;
 *   - no NBD error reached the client;
 *   - the engine's verify and a direct read of every replica find 0 differing regions, and at
 *     the end, stopped, the replica directories compare equal (offline, Replica.open);
 *   - no replica was rebuilt in full: a log resync (engine start) or a delta rebuild (a replica
 *     back with its data) sufficed every time.
 * Prints a table of figures. ZEBU_FAULT_SEED reproduces the schedule; ZEBU_FAULT_KILLS sets the
 * number of kills (default 16; ZEBU_FAULT_FULL=1: 208).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Prng, faultSeed, faultFull, envCount } from '../support/fault-prng.ts';
import { FaultCluster, faultRoot } from '../support/fault-cluster.ts';
import { FaultRounds, sleep } from '../support/fault-rounds.ts';
import { processesUnder } from '../support/zebu-up.ts';

const MiB = 1024 * 1024;
const SIZE = 32 * MiB;
const KINDS = ['replica', 'engine', 'frontend', 'copier during a rebuild', 'all data-path processes'] as const;

test('SIGKILL matrix: a replica, the engine, the frontend, the copier during a rebuild, all data-path processes', { timeout: 30 * 60_000 }, async (t) => {
  const seed = faultSeed();
  t.diagnostic(`ZEBU_FAULT_SEED=${seed}`);
  const kills = envCount('ZEBU_FAULT_KILLS', faultFull() ? 208 : 16);
  const random = new Prng(seed);
  const root = faultRoot(t);
  const cluster = await FaultCluster.start(t, { root, sizeBytes: SIZE });
  const rounds = await FaultRounds.start(cluster, random, seed);

  // An even share of each kind, in a seeded order.
  const schedule = Array.from({ length: kills }, (_, i) => KINDS[i % KINDS.length]);
  for (let i = schedule.length - 1; i > 0; i--) {
    const j = random.int(i + 1);
    [schedule[i], schedule[j]] = [schedule[j], schedule[i]];
  }
  for (const kind of schedule) {
    const ok = await rounds.run(kind, kind === 'all data-path processes' ? 'contract' : 'acked', async () => {
      if (kind === 'replica') {
        const i = random.int(cluster.replicaDirs.length);
        await cluster.killReplica(i);
        await sleep(random.range(0, 300));
        await cluster.startReplica(i);
        return { rebuilds: [await cluster.readd(i)] };
      }
      if (kind === 'engine') {
        await cluster.killEngine();
        await sleep(random.range(0, 200));
        await cluster.startEngine();
        return { engineStarted: true, rebuilds: await cluster.healAll() };
      }
      if (kind === 'copier during a rebuild') {
        const i = random.int(cluster.replicaDirs.length);
        await cluster.killReplica(i);
        await sleep(random.range(0, 300));
        await cluster.startReplica(i);
        const rebuilt = cluster.readd(i);
        await sleep(random.range(0, 100));
        // Idle (the rebuild over already) it dies too: the next rebuild starts another.
        for (const p of processesUnder(root).filter((p) => p.role === 'copier')) {
          try {
            process.kill(p.pid, 'SIGKILL');
          } catch {
            // gone already
          }
        }
        return { rebuilds: [await rebuilt] };
      }
      if (kind === 'frontend') {
        await cluster.killFrontend();
        await sleep(random.range(0, 200));
        await cluster.startFrontend();
        return {};
      }
      await cluster.killAll();
      await rounds.crashed();
      await sleep(random.range(0, 200));
      return { engineStarted: true, rebuilds: await cluster.restartAll() };
    });
    if (!ok) break;
  }
  const failures = await rounds.finish(t, `SIGKILL matrix, ${kills} kills, ${SIZE / MiB} MiB volume, 3 replicas`);
  assert.deepEqual(failures, [], `ZEBU_FAULT_SEED=${seed}:\n${failures.join('\n')}`);
});
