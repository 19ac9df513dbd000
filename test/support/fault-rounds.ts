/**
 * The round structure every direct-data-path fault test shares: the writer runs; one fault is
 * injected and recovered from; the writer is quiesced; the volume is checked against the ledger;
 * the replicas are compared (engine verify and direct reads); figures are added to the fault's
 * row. Failures are collected (not thrown at once) so that the table is printed in any case.
 */
import { FaultCluster, type RebuildOutcome } from './fault-cluster.ts';
import { FaultWriter, Ledger, REGION_BYTES } from './fault-writer.ts';
import { checkAndRebase, compareReplicaDirs, describeViolations, type CheckMode } from './fault-checker.ts';
import { emptyFigures, printFigures, type FaultFigures } from './fault-table.ts';
import type { Prng } from './fault-prng.ts';

export const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

export interface RoundResult {
  /** Rebuilds the recovery needed (replicas added back). */
  rebuilds?: RebuildOutcome[];
  /** Whether an engine was started (its start-up recovery figures are then expected). */
  engineStarted?: boolean;
}

export class FaultRounds {
  readonly cluster: FaultCluster;
  readonly ledger: Ledger;
  readonly writer: FaultWriter;
  readonly random: Prng;
  readonly seed: number;
  readonly failures: string[] = [];
  readonly figures = new Map<string, FaultFigures>();
  private round = 0;
  private verifyMissing = 0;
  private recoveryMissing = 0;

  private constructor(cluster: FaultCluster, random: Prng, seed: number, depth: number) {
    this.cluster = cluster;
    this.random = random;
    this.seed = seed;
    this.ledger = new Ledger(cluster.sizeBytes);
    this.writer = new FaultWriter({ connect: () => cluster.connectNbd(), ledger: this.ledger, prng: random.fork(), hotRegions: [0], regionBytes: REGION_BYTES, depth });
  }

  static async start(cluster: FaultCluster, random: Prng, seed: number, depth = 8): Promise<FaultRounds> {
    const rounds = new FaultRounds(cluster, random, seed, depth);
    await rounds.writer.start();
    return rounds;
  }

  figuresFor(fault: string): FaultFigures {
    let f = this.figures.get(fault);
    if (f === undefined) {
      f = emptyFigures(fault);
      this.figures.set(fault, f);
    }
    return f;
  }

  /**
   * To call after every replica crashed (with the frontend): waits until the writer saw its
   * connection die, then marks acknowledged-but-unflushed writes as possibly lost (a flush after
   * the crash does not cover them).
   */
  async crashed(): Promise<void> {
    await this.writer.connectionLost();
    this.ledger.forgetUnflushed();
  }

  /**
   * One round: new hot regions, writes for a while, `inject` (the fault and the recovery from
   * it, while the writer runs), more writes, then the checks. Returns false when the round
   * could not complete (the failure is recorded; the caller should stop).
   */
  async run(fault: string, mode: CheckMode, inject: () => Promise<RoundResult>): Promise<boolean> {
    const round = this.round++;
    const f = this.figuresFor(fault);
    const { random, writer, ledger, cluster } = this;
    const started = performance.now();
    const regions = Math.ceil(cluster.sizeBytes / REGION_BYTES);
    writer.setHotRegions(Array.from({ length: 1 + random.int(4) }, () => random.int(regions)));
    const errorsBefore = writer.errors;
    const ackedBefore = ledger.ackedWrites;
    const disconnectsBefore = writer.disconnects;
    try {
      await sleep(random.range(100, 500));
      const result = await inject();
      f.count++;
      if (result.engineStarted) {
        const recovery = await cluster.recovery();
        if (recovery === null) {
          this.recoveryMissing++;
          this.failures.push(`round ${round} (${fault}): the engine reports no start-up recovery (GET /v1/info .recovery)`);
        } else {
          f.recoveryRegions += recovery.regions;
          f.recoveryBytes += recovery.bytes;
        }
      }
      for (const o of result.rebuilds ?? []) {
        if (o.kind === 'delta') {
          f.deltaRebuilds++;
          f.recoveryRegions += Math.ceil(o.bytes / REGION_BYTES);
          f.recoveryBytes += o.bytes;
        } else if (o.kind === 'full') {
          f.fullRebuilds++;
          this.failures.push(`round ${round} (${fault}): a replica was rebuilt in full (${o.bytes} bytes) where a delta or log resync sufficed`);
        }
      }
      // Writes go on after the recovery, then the checks on a quiet volume.
      await sleep(random.range(50, 300));
      await writer.quiesce();
      const client = await cluster.connectNbd();
      const report = await checkAndRebase(client, ledger, mode).finally(() => client.disconnect());
      f.ackedWrites += ledger.ackedWrites - ackedBefore;
      f.lostAcked += report.lost;
      f.unflushedLost += report.unflushedLost;
      f.torn += report.torn;
      f.clientErrors += writer.errors - errorsBefore;
      f.disconnects += writer.disconnects - disconnectsBefore;
      if (report.lost > 0) this.failures.push(`round ${round} (${fault}, ${mode}): ${report.lost} block(s) lost acknowledged writes:\n${describeViolations(report)}`);
      if (writer.errors > errorsBefore) {
        this.failures.push(`round ${round} (${fault}): ${writer.errors - errorsBefore} client error(s) with a healthy replica left: ${writer.errorLog.slice(-5).map((e) => e.what).join('; ')}`);
      }
      // Replicas compared twice: by the engine's verify, and by reading each one directly.
      const verify = await cluster.verify();
      if (verify === null) this.verifyMissing++;
      else if (verify.differing.length > 0) this.failures.push(`round ${round} (${fault}): verify found differing regions ${JSON.stringify(verify.differing.map((d) => d.region))}`);
      const direct = await cluster.compareOnline(REGION_BYTES);
      if (direct.differing.length > 0) this.failures.push(`round ${round} (${fault}): replicas differ (read directly) in regions ${JSON.stringify(direct.differing)}`);
      f.differingRegions += Math.max(verify?.differing.length ?? 0, direct.differing.length);
      f.seconds += (performance.now() - started) / 1000;
      writer.resume();
      return true;
    } catch (err) {
      f.seconds += (performance.now() - started) / 1000;
      this.failures.push(`round ${round} (${fault}) aborted: ${(err as Error).stack}\nengine log:\n${cluster.logTail('engine')}`);
      return false;
    }
  }

  /**
   * Stops the writer and the volume (clean), compares the stopped replica directories, prints the
   * table and returns every failure (empty: all good).
   */
  async finish(t: { diagnostic: (message: string) => void }, title: string): Promise<string[]> {
    await this.writer.stop();
    await this.cluster.stop();
    const offline = await compareReplicaDirs(this.cluster.replicaDirs, REGION_BYTES);
    const rows = [...this.figures.values(), { ...emptyFigures('offline compare (stopped)'), count: 1, differingRegions: offline.differing.length }];
    printFigures(t, title, this.seed, rows);
    if (offline.differing.length > 0) this.failures.push(`stopped replica directories differ: ${JSON.stringify(offline.differing)}`);
    if (this.verifyMissing > 0) this.failures.push(`the engine has no verify (POST /v1/verify): ${this.verifyMissing} round(s) not verified by it`);
    if (this.ledger.ackedFlushes === 0) this.failures.push('the writer never got a flush acknowledged');
    return this.failures;
  }
}
