/**
 * Simulated power loss (replicas run with --disk-mode power-loss: writes not yet fdatasync'd stay
 * in memory; FAULT_INJECT {"powerLoss": {seed, mode}} writes a seeded part of them to the files,
 * drops the rest — in 'tear' mode also cuts some at a 512-byte boundary — and ends the process):
 *   - one replica loses power under the recording writer: the volume goes on with no client
 *     error and no acknowledged write lost; the replica comes back by a delta rebuild;
 *   - the whole machine loses power: every replica at once, with the engine and the frontend
 *     killed in the same instant. Every replica keeps a different part of the unflushed writes
 *     (the case a process kill cannot produce); after the restart the engine's recovery must
 *     make them identical again from one source, every write acknowledged before the last
 *     acknowledged flush must be there, and no replica may need a full rebuild.
 * Then verify and a direct read of every replica find 0 differing regions, and the stopped
 * replica directories compare equal. Prints a table of figures. ZEBU_FAULT_SEED reproduces it;
 * ZEBU_FAULT_ROUNDS sets the power losses per kind (default 2; ZEBU_FAULT_FULL=1: 10).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Op } from '../../src/protocol/frames.ts';
import type { DataClient } from '../../src/protocol/client.ts';
import { Prng, faultSeed, faultFull, envCount } from '../support/fault-prng.ts';
import { FaultCluster, faultRoot } from '../support/fault-cluster.ts';
import { FaultRounds, sleep } from '../support/fault-rounds.ts';
import { checkContent, describeViolations, readReplicaDir } from '../support/fault-checker.ts';

const MiB = 1024 * 1024;
const SIZE = 32 * MiB;
const KINDS = ['power loss: one replica', 'power loss: whole machine'] as const;

/**
 * Sends the power failure; the replica ends without answering (the connection just closes).
 * Resolves once the request is on its way.
 */
function powerFail(client: DataClient, seed: number, mode: 'drop' | 'tear'): void {
  client.send(Op.FAULT_INJECT, 0, 0, 0, Buffer.from(JSON.stringify({ powerLoss: { seed, mode } })), () => {});
}

test('simulated power loss: one replica, and every replica at once', { timeout: 20 * 60_000 }, async (t) => {
  const seed = faultSeed();
  t.diagnostic(`ZEBU_FAULT_SEED=${seed}`);
  const perKind = envCount('ZEBU_FAULT_ROUNDS', faultFull() ? 10 : 2);
  const random = new Prng(seed);
  const root = faultRoot(t);
  const cluster = await FaultCluster.start(t, { root, sizeBytes: SIZE, replicaArgs: ['--disk-mode', 'power-loss'] });
  const rounds = await FaultRounds.start(cluster, random, seed);

  const schedule = Array.from({ length: perKind * KINDS.length }, (_, i) => KINDS[i % KINDS.length]);
  for (let i = schedule.length - 1; i > 0; i--) {
    const j = random.int(i + 1);
    [schedule[i], schedule[j]] = [schedule[j], schedule[i]];
  }
  for (const kind of schedule) {
    const mode = random.pick(['drop', 'tear'] as const);
    const ok = await rounds.run(`${kind} (${mode})`, kind === 'power loss: one replica' ? 'acked' : 'contract', async () => {
      if (kind === 'power loss: one replica') {
        const i = random.int(cluster.replicaDirs.length);
        const client = await cluster.replicaClient(i);
        const exited = cluster.replicaProcs[i]!.exited;
        powerFail(client, random.int(2 ** 31), mode);
        const code = await exited;
        client.close();
        if (code !== 137) throw new Error(`replica ${i} exited ${code} after its power loss, expected 137`);
        await sleep(random.range(0, 300));
        await cluster.startReplica(i);
        return { rebuilds: [await cluster.readd(i)] };
      }
      // The whole machine: connect first, then everything in one tick.
      const clients = await Promise.all(cluster.replicaDirs.map((_, i) => cluster.replicaClient(i)));
      const exits = cluster.replicaProcs.map((p) => p!.exited);
      cluster.engine?.child.kill('SIGKILL');
      cluster.frontend?.child.kill('SIGKILL');
      for (const c of clients) powerFail(c, random.int(2 ** 31), mode);
      const codes = await Promise.all(exits);
      for (const c of clients) c.close();
      await cluster.killAll();
      await rounds.crashed();
      if (codes.some((c) => c !== 137)) throw new Error(`replicas exited ${codes.join(', ')} after the power loss, expected 137`);
      // Before any recovery: a flush was acknowledged only once every replica had it durable, so
      // each replica on its own must hold every write acknowledged before it (blames the replica
      // layer, not the engine's recovery, when this fails).
      for (const [i, dir] of cluster.replicaDirs.entries()) {
        const report = checkContent(rounds.ledger, await readReplicaDir(dir), 'contract');
        if (report.lost > 0) rounds.failures.push(`${kind} (${mode}): replica ${i} on its own, before recovery, lost ${report.lost} flushed block(s):\n${describeViolations(report)}`);
      }
      await sleep(random.range(0, 200));
      return { engineStarted: true, rebuilds: await cluster.restartAll() };
    });
    if (!ok) break;
  }
  // The simulation did its part: unsynced writes were there and some were lost or torn.
  const reports = cluster.replicaDirs.flatMap((_, i) => cluster.logEvents(`replica-${i}`, 'power-loss'));
  const sum = (k: string): number => reports.reduce((n, r) => n + Number(r[k] ?? 0), 0);
  t.diagnostic(`power failures ${reports.length}: unsynced writes ${sum('writes')}, applied ${sum('applied')}, torn ${sum('torn')}, dropped ${sum('dropped')}`);
  const failures = await rounds.finish(t, `simulated power loss, ${schedule.length} power failures, ${SIZE / MiB} MiB volume, 3 replicas`);
  assert.deepEqual(failures, [], `ZEBU_FAULT_SEED=${seed}:\n${failures.join('\n')}`);
  assert.equal(reports.length, schedule.filter((k) => k === 'power loss: one replica').length + 3 * schedule.filter((k) => k === 'power loss: whole machine').length, 'every power failure reported');
  assert.ok(sum('dropped') + sum('torn') > 0, 'some unsynced writes were lost or torn');
});
