/**
 * Power failures (src/replica/power-loss-disk.ts): many seeded failures in process, both modes
 * ('drop': unsynced writes reach the disk whole or not at all; 'tear': some in part, cut at a
 * 512-byte boundary), at random moments with writes, zeroes and flushes in flight. After each:
 * - the metadata opens (replica.json, journal, intent slots);
 * - every sector of every block holds the value it had at the last completed flush, or the value
 *   of a write/zero issued after it (nothing acknowledged before the last flush is lost);
 * - every region outside the reopened active set holds exactly the last acknowledged bytes
 *   (what recovery relies on: replicas can only differ inside the union of active sets).
 * Then the same through a real `zebu replica serve --disk-mode power-loss` process.
 * Seeded: ZEBU_TEST_SEED reproduces a run; ZEBU_POWER_ROUNDS sets the number of failures.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Replica } from '../../src/replica/replica.ts';
import { NodeDisk } from '../../src/replica/disk.ts';
import { PowerLossDisk, type PowerLossMode } from '../../src/replica/power-loss-disk.ts';
import { INTENT_REGION_BYTES } from '../../src/replica/intent-log.ts';
import { DataClient } from '../../src/protocol/client.ts';
import { testSeed } from '../support/tmp.ts';
import { startReplica, writeSecret } from '../support/replica-process.ts';

const BLOCK = 4096;
const SECTOR = 512;
const SECTORS = BLOCK / SECTOR;
const R = INTENT_REGION_BYTES;
const REGIONS = 6;
/** Tracked blocks per region: the first ones of each region. */
const BLOCKS_PER_REGION = 16;
const SIZE = REGIONS * R;
const ROUNDS = Number(process.env.ZEBU_POWER_ROUNDS ?? 150);

function rng(seed: number): () => number {
  let s = seed >>> 0 || 1;
  return () => {
    s ^= s << 13;
    s >>>= 0;
    s ^= s >>> 17;
    s ^= s << 5;
    s >>>= 0;
    return s / 2 ** 32;
  };
}

/** Tracked block number -> volume offset. */
function blockOffset(block: number): number {
  return Math.floor(block / BLOCKS_PER_REGION) * R + (block % BLOCKS_PER_REGION) * BLOCK;
}

/** Each sector names its write (tag) and its position; tag 0 = zeros. */
function fillBlocks(buf: Buffer, tag: number, firstBlock: number): void {
  for (let at = 0; at < buf.length; at += SECTOR) {
    const block = firstBlock + Math.floor(at / BLOCK);
    const sector = (at % BLOCK) / SECTOR;
    for (let i = 0; i < SECTOR; i += 8) {
      buf.writeUInt32BE(tag, at + i);
      buf.writeUInt32BE(block * SECTORS + sector, at + i + 4);
    }
  }
}

/** The tag a sector holds; -1 when it is neither zeros nor one whole tagged sector of this place. */
function sectorTag(buf: Buffer, at: number, block: number, sector: number): number {
  const s = buf.subarray(at, at + SECTOR);
  if (s.every((b) => b === 0)) return 0;
  const tag = s.readUInt32BE(0);
  for (let i = 0; i < SECTOR; i += 8) {
    if (s.readUInt32BE(i) !== tag || s.readUInt32BE(i + 4) !== block * SECTORS + sector) return -1;
  }
  return tag;
}

const TRACKED = REGIONS * BLOCKS_PER_REGION;

/** What the test knows about each tracked sector. */
class Model {
  /** Value at the last completed flush. */
  durable = new Uint32Array(TRACKED * SECTORS);
  /** Value of the last acknowledged write/zero. */
  acked = new Uint32Array(TRACKED * SECTORS);
  /**
   * Per block, the tags a sector may hold besides the durable value: those not acknowledged
   * before the last completed flush was issued (tag -> issue number).
   */
  since: Map<number, number>[] = Array.from({ length: TRACKED }, () => new Map());
  /** Issue numbers of the operations not yet acknowledged. */
  private unacked = new Set<number>();
  private issues = 0;

  /** Returns the issue number to pass to acknowledged(). */
  issued(block: number, count: number, tag: number): number {
    const issue = ++this.issues;
    for (let b = block; b < block + count; b++) this.since[b].set(tag, issue);
    this.unacked.add(issue);
    return issue;
  }
  acknowledged(issue: number, block: number, count: number, tag: number): void {
    this.acked.fill(tag, block * SECTORS, (block + count) * SECTORS);
    this.unacked.delete(issue);
  }
  /** A flush is issued: it will cover what is acknowledged now. Call the result when it completes. */
  flushIssued(): () => void {
    const acked = this.acked.slice();
    const issuedBefore = this.issues;
    const unacked = new Set(this.unacked);
    return () => {
      this.durable.set(acked);
      for (const tags of this.since) {
        for (const [tag, issue] of tags) if (issue <= issuedBefore && !unacked.has(issue)) tags.delete(tag);
      }
    };
  }
  /** After a crash: what is read back is the new baseline. */
  reset(actual: Uint32Array): void {
    this.durable.set(actual);
    this.acked.set(actual);
    for (const s of this.since) s.clear();
    this.unacked.clear();
  }
}

async function readTracked(read: (offset: number, length: number) => Promise<Buffer>): Promise<{ tags: Uint32Array; problems: string[] }> {
  const tags = new Uint32Array(TRACKED * SECTORS);
  const problems: string[] = [];
  for (let region = 0; region < REGIONS; region++) {
    const buf = await read(region * R, BLOCKS_PER_REGION * BLOCK);
    for (let i = 0; i < BLOCKS_PER_REGION; i++) {
      const block = region * BLOCKS_PER_REGION + i;
      for (let s = 0; s < SECTORS; s++) {
        const tag = sectorTag(buf, i * BLOCK + s * SECTOR, block, s);
        if (tag < 0) problems.push(`block ${block} sector ${s}: foreign or torn bytes`);
        tags[block * SECTORS + s] = Math.max(tag, 0);
      }
    }
  }
  return { tags, problems };
}

/** The checks after a failure; returns what is wrong (empty: all good). */
function check(model: Model, actual: { tags: Uint32Array; problems: string[] }, active: number[]): string[] {
  const problems = [...actual.problems];
  const activeSet = new Set(active);
  for (let block = 0; block < TRACKED; block++) {
    const region = Math.floor(block / BLOCKS_PER_REGION);
    for (let s = 0; s < SECTORS; s++) {
      const i = block * SECTORS + s;
      const tag = actual.tags[i];
      if (tag !== model.durable[i] && !model.since[block].has(tag)) {
        problems.push(`block ${block} sector ${s}: holds ${tag}, flushed value ${model.durable[i]}, later ${[...model.since[block].keys()].join(',') || 'none'}`);
      }
      if (!activeSet.has(region) && tag !== model.acked[i]) {
        problems.push(`block ${block} sector ${s} in inactive region ${region}: holds ${tag}, last acknowledged ${model.acked[i]}`);
      }
    }
  }
  return problems;
}

test(`${ROUNDS} seeded power failures in process lose nothing flushed; regions outside the active set are exact`, async (t) => {
  const seed = testSeed();
  t.diagnostic(`seed ${seed} (ZEBU_TEST_SEED to reproduce)`);
  const random = rng(seed);
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'zebu-power-'));
  t.after(() => fs.rmSync(root, { recursive: true, force: true }));
  const dir = path.join(root, 'r');
  const model = new Model();
  let disk = new PowerLossDisk(new NodeDisk());
  let replica = await Replica.create(dir, { sizeBytes: SIZE, disk });
  let nextTag = 1;
  const stats = { torn: 0, applied: 0, dropped: 0, activeAfter: 0 };

  for (let round = 0; round < ROUNDS; round++) {
    const mode: PowerLossMode = round % 2 === 0 ? 'drop' : 'tear';
    let seq = 0;
    let completed = 0;
    let flushedRevision = replica.info().flushedRevision;
    // Most writes go to a few hot regions: the others leave the active set as flushes confirm.
    const hot = Array.from({ length: 1 + Math.floor(random() * 2) }, () => Math.floor(random() * REGIONS));
    const op = (): Promise<void> => {
      const region = random() < 0.9 ? hot[Math.floor(random() * hot.length)] : Math.floor(random() * REGIONS);
      const block = region * BLOCKS_PER_REGION + Math.floor(random() * BLOCKS_PER_REGION);
      const inRegion = block % BLOCKS_PER_REGION;
      const count = Math.min(1 + Math.floor(random() * 4), BLOCKS_PER_REGION - inRegion);
      if (random() < 0.15) {
        const issue = model.issued(block, count, 0);
        return replica.zero(blockOffset(block), count * BLOCK).then(() => model.acknowledged(issue, block, count, 0));
      }
      const tag = nextTag++;
      const buf = Buffer.allocUnsafe(count * BLOCK);
      fillBlocks(buf, tag, block);
      const issue = model.issued(block, count, tag);
      return replica.write(blockOffset(block), buf).then(() => model.acknowledged(issue, block, count, tag));
    };
    const flush = async (): Promise<void> => {
      const mySeq = ++seq;
      replica.flushArrived(mySeq, completed);
      const revision = replica.info().revision;
      const done = model.flushIssued();
      await replica.flush();
      completed = mySeq;
      flushedRevision = revision;
      done();
    };

    const steps = 3 + Math.floor(random() * 12);
    for (let step = 0; step < steps; step++) {
      await Promise.all(Array.from({ length: 1 + Math.floor(random() * 6) }, op));
      if (random() < 0.35) await flush();
    }
    // Sometimes long enough for the lazy write of the regions that left.
    if (random() < 0.1) await new Promise((r) => setTimeout(r, 150));
    // The failure strikes with operations (and maybe a flush) in flight.
    const inflight: Promise<void>[] = Array.from({ length: Math.floor(random() * 6) }, op);
    if (random() < 0.3) inflight.push(flush());
    for (const p of inflight) p.catch(() => {});
    const ticks = Math.floor(random() * 6);
    for (let i = 0; i < ticks; i++) await new Promise((r) => setImmediate(r));
    const report = disk.powerFail(Math.floor(random() * 2 ** 31), mode);
    stats.torn += report.torn;
    stats.applied += report.applied;
    stats.dropped += report.dropped;
    await replica.abandon();
    await Promise.allSettled(inflight);

    disk = new PowerLossDisk(new NodeDisk());
    replica = await Replica.open(dir, { disk });
    const info = replica.info();
    assert.ok(info.flushedRevision >= flushedRevision, `round ${round}: flushedRevision ${info.flushedRevision} < ${flushedRevision}`);
    const active = replica.intentGet().active;
    stats.activeAfter += active.length;
    const actual = await readTracked(async (offset, length) => {
      const buf = Buffer.alloc(length);
      await replica.read(offset, length, buf);
      return buf;
    });
    const problems = check(model, actual, active);
    assert.deepEqual(problems.slice(0, 10), [], `round ${round} (${mode}), seed ${seed}`);
    model.reset(actual.tags);
  }
  await replica.close();
  t.diagnostic(`writes at failures: ${stats.applied} applied, ${stats.torn} torn, ${stats.dropped} dropped; ${stats.activeAfter} active regions after reopen in all`);
  assert.ok(stats.dropped > 0 && stats.torn > 0, 'the failures did lose and tear writes');
});

test('a real replica process: FAULT_INJECT powerLoss exits 137 at once; flushed data and the active set survive', async (t) => {
  const seed = testSeed();
  t.diagnostic(`seed ${seed} (ZEBU_TEST_SEED to reproduce)`);
  const random = rng(seed);
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'zebu-power-proc-'));
  const { file: secretFile, secret } = writeSecret(root);
  const dir = path.join(root, 'replica');
  const children: { kill: (s: NodeJS.Signals) => boolean; exitCode: number | null; signalCode: string | null }[] = [];
  t.after(() => {
    for (const c of children) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
    fs.rmSync(root, { recursive: true, force: true });
  });
  const model = new Model();
  let nextTag = 1;
  for (let round = 0; round < 4; round++) {
    const proc = await startReplica({ dir, sizeBytes: SIZE, secretFile, extraArgs: ['--disk-mode', 'power-loss'] });
    children.push(proc.child);
    const client = await DataClient.connect({ port: proc.port, secret, epoch: round + 1 });
    await client.open();
    if (round > 0) {
      const actual = await readTracked((offset, length) => client.read(offset, length));
      const problems = check(model, actual, (await client.intentGet()).active);
      assert.deepEqual(problems.slice(0, 10), [], `after failure ${round}, seed ${seed}`);
      model.reset(actual.tags);
    }
    let seq = 0;
    for (let step = 0; step < 8; step++) {
      await Promise.all(
        Array.from({ length: 1 + Math.floor(random() * 8) }, async () => {
          const block = Math.floor(random() * TRACKED);
          const count = Math.min(1 + Math.floor(random() * 4), BLOCKS_PER_REGION - (block % BLOCKS_PER_REGION));
          const tag = nextTag++;
          const buf = Buffer.allocUnsafe(count * BLOCK);
          fillBlocks(buf, tag, block);
          const issue = model.issued(block, count, tag);
          await client.write(blockOffset(block), buf);
          model.acknowledged(issue, block, count, tag);
        }),
      );
      if (step % 3 === 1) {
        seq++;
        const done = model.flushIssued();
        await client.flush(seq, seq - 1);
        done();
      }
    }
    // Unflushed writes are in the replica's memory only: the failure loses or tears them.
    client.powerFail(Math.floor(random() * 2 ** 31), round % 2 === 0 ? 'tear' : 'drop');
    assert.equal(await proc.exited, 137, proc.stderr());
    assert.match(proc.stderr(), /"event":"power-loss"/);
    client.close();
  }
  // A normal start opens what the last failure left.
  const proc = await startReplica({ dir, sizeBytes: SIZE, secretFile });
  children.push(proc.child);
  assert.equal(proc.ready.cleanShutdown, false);
  const client = await DataClient.connect({ port: proc.port, secret, epoch: 10 });
  await client.open();
  const actual = await readTracked((offset, length) => client.read(offset, length));
  assert.deepEqual(check(model, actual, (await client.intentGet()).active).slice(0, 10), []);
  client.close();
});
