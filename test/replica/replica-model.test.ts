/**
 * Model-based property test: random operation sequences against a Replica and an in-memory
 * model of what every byte should read. Reproduce a failure with ZEBU_TEST_SEED=<seed>.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import fc from 'fast-check';
import { Replica } from '../../src/replica/replica.ts';
import { tempDir, pattern, testSeed } from '../support/tmp.ts';

const SIZE = 64 * 4096;
const NAMES = ['s1', 's2', 's3', 's4'];

type Op =
  | { kind: 'write'; offset: number; length: number; seed: number }
  | { kind: 'zero'; offset: number; length: number }
  | { kind: 'flush' }
  | { kind: 'snapshot'; name: string }
  | { kind: 'delete'; name: string }
  | { kind: 'revert'; name: string }
  | { kind: 'reopen' }
  | { kind: 'flushAndCrash' };

const range = fc
  .tuple(fc.integer({ min: 0, max: SIZE - 1 }), fc.integer({ min: 1, max: 5 * 4096 + 700 }), fc.boolean())
  .map(([offset, length, aligned]) => {
    if (aligned) {
      offset -= offset % 4096;
      length = Math.max(4096, length - (length % 4096));
    }
    return { offset, length: Math.min(length, SIZE - offset) };
  });

const opArb: fc.Arbitrary<Op> = fc.oneof(
  { weight: 8, arbitrary: fc.tuple(range, fc.nat()).map(([r, seed]) => ({ kind: 'write' as const, ...r, seed })) },
  { weight: 3, arbitrary: range.map((r) => ({ kind: 'zero' as const, ...r })) },
  { weight: 2, arbitrary: fc.constant({ kind: 'flush' as const }) },
  { weight: 2, arbitrary: fc.constantFrom(...NAMES).map((name) => ({ kind: 'snapshot' as const, name })) },
  { weight: 2, arbitrary: fc.constantFrom(...NAMES).map((name) => ({ kind: 'delete' as const, name })) },
  { weight: 1, arbitrary: fc.constantFrom(...NAMES).map((name) => ({ kind: 'revert' as const, name })) },
  { weight: 1, arbitrary: fc.constant({ kind: 'reopen' as const }) },
  { weight: 1, arbitrary: fc.constant({ kind: 'flushAndCrash' as const }) },
);

async function checkAll(replica: Replica, view: Uint8Array, step: string): Promise<void> {
  const got = Buffer.alloc(SIZE);
  await replica.read(0, SIZE, got);
  if (!got.equals(view)) {
    let at = 0;
    while (got[at] === view[at]) at++;
    assert.fail(`${step}: byte ${at} (block ${Math.floor(at / 4096)}) reads ${got[at]}, model says ${view[at]}`);
  }
  const extents = await replica.blockStatus(0, SIZE);
  let expect = 0;
  for (const e of extents) {
    assert.equal(e.offset, expect, `${step}: extents are contiguous`);
    expect += e.length;
    if (!e.data) assert.ok(got.subarray(e.offset, e.offset + e.length).every((b) => b === 0), `${step}: zero extent reads zeros`);
  }
  assert.equal(expect, SIZE, `${step}: extents cover the volume`);
}

async function runSequence(dir: string, ops: Op[], withBase: boolean): Promise<void> {
  fs.rmSync(dir, { recursive: true, force: true });
  fs.mkdirSync(dir, { recursive: true });
  let view = new Uint8Array(SIZE);
  let backingFile: string | undefined;
  if (withBase) {
    backingFile = `${dir}.base`;
    const base = pattern(424242, SIZE / 2 + 1000);
    fs.writeFileSync(backingFile, base);
    view.set(base, 0);
  }
  const replicaDir = path.join(dir, 'r');
  let replica = await Replica.create(replicaDir, { sizeBytes: SIZE, backingFile, maxLayers: 6 });
  const snapshots = new Map<string, Uint8Array>();
  try {
    for (const [i, op] of ops.entries()) {
      const step = `step ${i} ${JSON.stringify(op)}`;
      switch (op.kind) {
        case 'write': {
          const data = pattern(op.seed, op.length);
          await replica.write(op.offset, data);
          view.set(data, op.offset);
          break;
        }
        case 'zero':
          await replica.zero(op.offset, op.length);
          view.fill(0, op.offset, op.offset + op.length);
          break;
        case 'flush':
          await replica.flush();
          break;
        case 'snapshot': {
          const full = replica.info().layerCount >= 6;
          const exists = snapshots.has(op.name);
          try {
            await replica.snapshotCreate(op.name);
            assert.ok(!full && !exists, `${step}: snapshot should have been refused`);
            snapshots.set(op.name, Uint8Array.from(view));
          } catch (err) {
            assert.ok(full || exists, `${step}: unexpected ${(err as Error).message}`);
          }
          break;
        }
        case 'delete':
          if (snapshots.has(op.name)) {
            await replica.snapshotDelete(op.name);
            snapshots.delete(op.name);
          } else {
            await assert.rejects(replica.snapshotDelete(op.name), /not found/);
          }
          break;
        case 'revert':
          if (snapshots.has(op.name)) {
            await replica.snapshotRevert(op.name);
            view = Uint8Array.from(snapshots.get(op.name)!);
          } else {
            await assert.rejects(replica.snapshotRevert(op.name), /not found/);
          }
          break;
        case 'reopen':
          await replica.close();
          replica = await Replica.open(replicaDir);
          assert.equal(replica.info().cleanShutdown, true);
          break;
        case 'flushAndCrash':
          await replica.flush();
          await replica.abandon();
          replica = await Replica.open(replicaDir);
          assert.equal(replica.info().cleanShutdown, false);
          break;
      }
      await checkAll(replica, view, step);
      for (const [name, content] of snapshots) {
        const got = Buffer.alloc(SIZE);
        await replica.readSnapshot(name, 0, SIZE, got);
        assert.ok(got.equals(content), `${step}: snapshot ${name} reads as it was taken`);
      }
      assert.deepEqual(
        replica.snapshotList().map((s) => s.name).sort(),
        [...snapshots.keys()].sort(),
        `${step}: snapshot list`,
      );
    }
  } finally {
    await replica.close().catch(() => {});
  }
}

test('replica matches the in-memory model under random operation sequences', async (t) => {
  const dir = tempDir(t);
  const seed = testSeed();
  const numRuns = Number(process.env.ZEBU_MODEL_RUNS ?? 60);
  try {
    await fc.assert(
      fc.asyncProperty(fc.array(opArb, { minLength: 1, maxLength: 40 }), fc.boolean(), async (ops, withBase) => {
        await runSequence(path.join(dir, 'case'), ops, withBase);
      }),
      { seed, numRuns },
    );
  } catch (err) {
    console.error(`model test failed; reproduce with ZEBU_TEST_SEED=${seed}`);
    throw err;
  }
});
