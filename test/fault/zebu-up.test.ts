/**
 * The whole `zebu up` under faults, through the real CLI and NBD, with the recording writer on
 * an attached 3-replica volume:
 *   - a replica process SIGKILLed: the agent restarts it and the manager adds it back within
 *     the replenishment wait — a delta rebuild of the same replica, no new replica scheduled;
 *   - `zebu up` alone SIGKILLed and started again: the data path never stopped (no client error,
 *     no acknowledged write lost), the new `zebu up` adopts it;
 *   - everything SIGKILLed at once (`zebu up` and every data-path process), then `zebu up`
 *     started again: the volume comes back attached, the engine's recovery resyncs what may
 *     differ; every write acknowledged before the last acknowledged flush is there, and the
 *     replica set is the same (no full rebuild);
 *   - a simulated power loss of the whole machine (replicas run with --disk-mode power-loss, tests
 *     only: each loses a seeded part of what it had not synced, torn or dropped), with `zebu up`,
 *     the engines and the frontend SIGKILLed in the same tick, then `zebu up` started again;
 *   - every data-path process of the volume (its replicas, its engine, the node's frontend)
 *     SIGKILLed at once, `zebu up` running on: the agent restarts them in whatever order the race
 *     gives, the engine waits for its replicas, the frontend serves the volume again at once; the
 *     writer and a reader reconnect and see no error, and no write acknowledged before the last
 *     acknowledged flush is lost (a replica keeps unflushed writes' metadata in memory).
 * A reader reads the writer's regions all along and checks every block against the ledger. A
 * second attached volume must come back by itself too: after every round a new connection reads
 * what was written to it (and flushed) at the start.
 * After each: `zebu volume verify --json` and a direct read of every replica find 0 differing
 * regions. Prints a table of figures. ZEBU_FAULT_SEED reproduces the schedule;
 * ZEBU_FAULT_UP_ROUNDS sets the kills per kind (default 1; ZEBU_FAULT_FULL=1: 4), and
 * ZEBU_FAULT_VOLUME_KILLS the whole-volume kills (default 3; ZEBU_FAULT_FULL=1: 50).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Prng, faultSeed, faultFull, envCount } from '../support/fault-prng.ts';
import { NbdClient, parseNbdUri } from '../support/nbd-client.ts';
import { FaultWriter, Ledger, REGION_BYTES } from '../support/fault-writer.ts';
import { FaultReader } from '../support/fault-reader.ts';
import { checkAndRebase, compareReplicasOnline, describeViolations, type CheckMode } from '../support/fault-checker.ts';
import { emptyFigures, printFigures, type FaultFigures } from '../support/fault-table.ts';
import { sleep } from '../support/fault-rounds.ts';
import { startZebuUp, stopZebuUp, zebu, mustZebu, mustZebuJson, zebuDataDir, waitFor, killAllUnder, processesUnder, type ZebuUp } from '../support/zebu-up.ts';
import { readSecretFile } from '../../src/protocol/auth.ts';
import fs from 'node:fs';
import path from 'node:path';
import { DataClient } from '../../src/protocol/client.ts';
import { mustRun, run } from '../support/volume-cluster.ts';

const MiB = 1024 * 1024;
const SIZE = 32 * MiB;
const VOLUME = 'fv';
const SECOND = 'fv2';
const VOLUME_KILL = 'every data-path process of the volume' as const;
const POWER_LOSS = 'power loss of the whole machine' as const;
const KINDS = ['replica (agent restarts it)', 'zebu up alone', 'everything at once', POWER_LOSS, VOLUME_KILL] as const;
const UP_ENV = { ZEBU_TEST_REPLICA_ARGS: '--disk-mode power-loss' };

interface ReplicaEntry {
  name: string;
  address: string;
  pid: number | null;
  mode: string;
}

function portOf(url: string): number {
  return Number(new URL(url.replace(/^nbd:/, 'http:')).port);
}

test('zebu up: a replica, zebu up alone, everything at once, every data-path process of the volume SIGKILLed under a writer and a reader', { timeout: 60 * 60_000 }, async (t) => {
  const seed = faultSeed();
  t.diagnostic(`ZEBU_FAULT_SEED=${seed}`);
  const perKind = envCount('ZEBU_FAULT_UP_ROUNDS', faultFull() ? 4 : 1);
  const volumeKills = envCount('ZEBU_FAULT_VOLUME_KILLS', faultFull() ? 50 : 3);
  const random = new Prng(seed);
  const dataDir = zebuDataDir(t);
  let up: ZebuUp = await startZebuUp({ dataDir, env: UP_ENV });
  t.after(() => stopZebuUp(up));
  const apiPort = portOf(up.api);
  const nbdPort = portOf(`nbd://${up.nbd}`);
  mustZebu(up, ['volume', 'create', VOLUME, '--size', String(SIZE), '--replicas', '3']);
  const uri = mustZebu(up, ['volume', 'attach', VOLUME]).trim();
  const { target, name } = parseNbdUri(uri);
  const secret = readSecretFile(path.join(dataDir, 'secret'));
  // The second volume: written and flushed once; read back through a new connection after every round.
  mustZebu(up, ['volume', 'create', SECOND, '--size', String(SIZE), '--replicas', '2']);
  const secondUri = mustZebu(up, ['volume', 'attach', SECOND]).trim();
  mustRun('qemu-io', ['-f', 'raw', '-c', 'write -P 0x6b 0 8M', '-c', 'flush', secondUri]);

  const ledger = new Ledger(SIZE);
  const writer = new FaultWriter({ connect: () => NbdClient.connect(target, name, 5000), ledger, prng: random.fork(), hotRegions: [0], regionBytes: REGION_BYTES, depth: 8 });
  await writer.start();
  const reader = new FaultReader({ connect: () => NbdClient.connect(target, name, 5000), ledger, prng: random.fork(), hotRegions: [0], regionBytes: REGION_BYTES });
  await reader.start();

  const figures = new Map<string, FaultFigures>(KINDS.map((k) => [k, emptyFigures(k)]));
  const failures: string[] = [];
  let powerLosses = 0;
  const replicas = (): ReplicaEntry[] => mustZebuJson<ReplicaEntry[]>(up, ['replica', 'list', '--volume', VOLUME]);
  const healthy = (what: string): Promise<Record<string, any>> =>
    waitFor(`${what}: volume attached, healthy, 3 RW replicas`, () => {
      const v = mustZebuJson(up, ['volume', 'get', VOLUME]);
      return v.state === 'attached' && v.robustness === 'healthy' && v.replicas.length === 3 && v.replicas.every((r: { mode: string }) => r.mode === 'RW') ? v : undefined;
    }, 180_000, 250);

  const schedule: (typeof KINDS)[number][] = [
    ...Array.from({ length: perKind * (KINDS.length - 1) }, (_, i) => KINDS[i % (KINDS.length - 1)]),
    ...Array.from({ length: volumeKills }, () => VOLUME_KILL),
  ];
  for (let i = schedule.length - 1; i > 0; i--) {
    const j = random.int(i + 1);
    [schedule[i], schedule[j]] = [schedule[j], schedule[i]];
  }
  try {
    for (const [round, kind] of schedule.entries()) {
      const f = figures.get(kind)!;
      const started = performance.now();
      const hot = Array.from({ length: 1 + random.int(4) }, () => random.int(SIZE / REGION_BYTES));
      writer.setHotRegions(hot);
      reader.setHotRegions(hot);
      const before = await healthy(`round ${round} start`);
      const namesBefore = before.replicas.map((r: { name: string }) => r.name).sort();
      const recoveryBefore = before.lastRecovery?.at ?? null;
      const errorsBefore = writer.errors + reader.errors;
      const wrongBefore = reader.wrong;
      const ackedBefore = ledger.ackedWrites;
      const disconnectsBefore = writer.disconnects;
      await sleep(random.range(300, 1000));
      let mode: CheckMode = 'acked';
      if (kind === 'replica (agent restarts it)') {
        const victim = random.pick(replicas());
        assert.ok(victim.pid !== null, `replica ${victim.name} has a pid`);
        process.kill(victim.pid, 'SIGKILL');
        await waitFor(`replica ${victim.name} seen failed`, () => mustZebuJson(up, ['volume', 'get', VOLUME]).robustness !== 'healthy', 30_000, 50).catch(() => {});
      } else if (kind === 'zebu up alone') {
        up.child.kill('SIGKILL');
        await up.exited;
        await sleep(random.range(0, 500));
        up = await startZebuUp({ dataDir, apiPort, nbdPort, env: UP_ENV });
      } else if (kind === POWER_LOSS) {
        mode = 'contract';
        // Connected first, then everything in one tick: zebu up, the engines, the frontend, and
        // the power of every replica (each exits 137 having lost a seeded part of what it had not synced).
        const clients: DataClient[] = [];
        for (const volume of [VOLUME, SECOND]) {
          const epoch = mustZebuJson(up, ['volume', 'get', volume]).epoch as number;
          for (const r of mustZebuJson<ReplicaEntry[]>(up, ['replica', 'list', '--volume', volume])) {
            clients.push(await DataClient.connect({ port: Number(r.address.split(':').pop()), secret, epoch }));
          }
        }
        const others = processesUnder(dataDir).filter((p) => p.role === 'up' || p.role === 'engine' || p.role === 'frontend');
        const powerMode = random.pick(['drop', 'tear'] as const);
        reader.allowTorn = true;
        for (const p of others) process.kill(p.pid, 'SIGKILL');
        for (const c of clients) c.powerFail(random.int(2 ** 31), powerMode);
        await up.exited;
        await writer.connectionLost();
        ledger.forgetUnflushed();
        await killAllUnder(dataDir);
        for (const c of clients) c.close();
        powerLosses += clients.length;
        await sleep(random.range(0, 500));
        up = await startZebuUp({ dataDir, apiPort, nbdPort, env: UP_ENV });
      } else if (kind === VOLUME_KILL) {
        // A power cut of the volume's data path only: its replicas, its engine, the node's frontend.
        const victims = processesUnder(dataDir).filter((p) => p.role === 'frontend' || (p.role === 'engine' && p.cmdline.includes(VOLUME)) || (p.role === 'replica' && p.cmdline.some((a) => a.includes(`/replicas/${VOLUME}-r-`))));
        assert.equal(victims.filter((p) => p.role === 'replica').length, 3, 'three replica processes');
        assert.equal(victims.filter((p) => p.role === 'engine').length, 1, 'one engine');
        mode = 'contract';
        for (const p of victims) process.kill(p.pid, 'SIGKILL');
        await writer.connectionLost();
        // Every replica process died: what they had not flushed (presence maps included) may be gone.
        ledger.forgetUnflushed();
      } else {
        mode = 'contract';
        await killAllUnder(dataDir);
        await up.exited;
        await writer.connectionLost();
        ledger.forgetUnflushed();
        await sleep(random.range(0, 500));
        up = await startZebuUp({ dataDir, apiPort, nbdPort, env: UP_ENV });
      }
      f.count++;
      const after = await healthy(`round ${round} (${kind}) recovery`);
      const namesAfter = after.replicas.map((r: { name: string }) => r.name).sort();
      const replaced = namesAfter.filter((n: string) => !namesBefore.includes(n)).length;
      f.fullRebuilds += replaced;
      if (replaced > 0) failures.push(`round ${round} (${kind}): ${replaced} replica(s) replaced by new ones (full rebuild) where a delta or log resync sufficed: ${namesBefore} -> ${namesAfter}`);
      const recovery = after.lastRecovery;
      if (kind === 'everything at once' || kind === VOLUME_KILL || kind === POWER_LOSS) {
        if (recovery === null || recovery === undefined || recovery.at === recoveryBefore) failures.push(`round ${round} (${kind}): the volume reports no new start-up recovery (lastRecovery ${JSON.stringify(recovery)})`);
        else {
          f.recoveryRegions += recovery.regions;
          f.recoveryBytes += recovery.bytes;
          f.deltaRebuilds += recovery.deltaReplicas?.length ?? 0;
        }
      }
      if (kind === 'replica (agent restarts it)' && replaced === 0) f.deltaRebuilds++;

      await sleep(random.range(100, 500));
      await writer.quiesce();
      await reader.quiesce();
      const client = await NbdClient.connect(target, name, 5000);
      const report = await checkAndRebase(client, ledger, mode).finally(() => client.disconnect());
      reader.allowTorn = false;
      f.ackedWrites += ledger.ackedWrites - ackedBefore;
      f.lostAcked += report.lost;
      f.unflushedLost += report.unflushedLost;
      f.torn += report.torn;
      f.clientErrors += writer.errors + reader.errors - errorsBefore;
      f.lostAcked += reader.wrong - wrongBefore;
      if (reader.wrong > wrongBefore) failures.push(`round ${round} (${kind}): the reader saw ${reader.wrong - wrongBefore} block(s) older than acknowledged or foreign: ${reader.log.slice(-5).join('; ')}`);
      f.disconnects += writer.disconnects - disconnectsBefore;
      if (report.lost > 0) failures.push(`round ${round} (${kind}, ${mode}): ${report.lost} block(s) lost acknowledged writes:\n${describeViolations(report)}`);
      if (writer.errors + reader.errors > errorsBefore) failures.push(`round ${round} (${kind}): client errors: ${[...writer.errorLog.slice(-5).map((e) => e.what), ...reader.log.slice(-5)].join('; ')}`);

      const verify = zebu(up, ['volume', 'verify', VOLUME, '--json']);
      let verifyDiffering = 0;
      try {
        const verified = JSON.parse(verify.stdout) as { differing: unknown[]; replicas: string[] };
        verifyDiffering = verified.differing.length;
        if (verifyDiffering > 0 || verify.status !== 0) failures.push(`round ${round} (${kind}): zebu volume verify: ${verify.stdout}`);
        if (verified.replicas.length !== 3) failures.push(`round ${round} (${kind}): zebu volume verify compared ${verified.replicas.length} replica(s), not 3: ${verify.stdout}`);
      } catch {
        failures.push(`round ${round} (${kind}): zebu volume verify --json gave no report (exit ${verify.status}): ${verify.stdout}${verify.stderr}`);
      }
      const current = replicas();
      const direct = await compareReplicasOnline(current.map((r) => Number(r.address.split(':').pop())), { secret, epoch: after.epoch, sizeBytes: SIZE, regionBytes: REGION_BYTES });
      if (direct.differing.length > 0) failures.push(`round ${round} (${kind}): replicas differ (read directly): ${JSON.stringify(direct.differing)}`);
      f.differingRegions += Math.max(verifyDiffering, direct.differing.length);
      // The other volume came back by itself, and holds what it held.
      await waitFor(`round ${round} (${kind}): ${SECOND} attached and healthy`, () => {
        const v = mustZebuJson(up, ['volume', 'get', SECOND]);
        return v.state === 'attached' && v.robustness === 'healthy' ? v : undefined;
      }, 180_000, 250);
      const second = run('qemu-io', ['-f', 'raw', '-c', 'read -P 0x6b 0 8M', secondUri]);
      if (second.status !== 0 || /error|fail/i.test(second.stdout + second.stderr)) failures.push(`round ${round} (${kind}): ${SECOND} read back wrong: ${second.stdout}${second.stderr}`);
      f.seconds += (performance.now() - started) / 1000;
      writer.resume();
      reader.resume();
    }
  } catch (err) {
    failures.push(`aborted: ${(err as Error).stack}\nzebu up stderr:\n${up.stderr().slice(-3000)}`);
  }
  await writer.stop();
  await reader.stop();
  // The simulation did its part: every replica powered off reported what it lost.
  const reports = fs.readdirSync(path.join(dataDir, 'logs')).filter((f) => f.startsWith('r.') && f.endsWith('.log'))
    .flatMap((f) => fs.readFileSync(path.join(dataDir, 'logs', f), 'utf8').split('\n').filter((l) => l.includes('"event":"power-loss"')));
  if (reports.length !== powerLosses) failures.push(`${powerLosses} replica power loss(es) sent, ${reports.length} reported`);
  t.diagnostic(`power losses: ${reports.length} replica(s); unsynced writes: ${reports.map((l) => JSON.parse(l) as { writes: number; dropped: number; torn: number }).reduce((a, r) => `${a} ${r.writes}/${r.dropped}/${r.torn}`, '(writes/dropped/torn)')}`);
  if (reader.reads === 0) failures.push('the reader never completed a read');
  printFigures(t, `zebu up, ${schedule.length} kills, ${SIZE / MiB} MiB volume, 3 replicas`, seed, [...figures.values()]);
  if (ledger.ackedFlushes === 0) failures.push('the writer never got a flush acknowledged');
  assert.deepEqual(failures, [], `ZEBU_FAULT_SEED=${seed}:\n${failures.join('\n')}`);
});
