/**
 * Crash test with real processes: a writer that recognises each of its writes flushes at random
 * points while the replica process is SIGKILLed at random moments. After every restart the
 * metadata must open and every write acknowledged before the last acknowledged flush must read
 * back (or a write issued after it to the same block). Seeded: ZEBU_TEST_SEED reproduces the
 * schedule (process timing still varies).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { DataClient } from '../../src/protocol/client.ts';
import { Op } from '../../src/protocol/frames.ts';
import { tempDir, testSeed } from '../support/tmp.ts';
import { startReplica, writeSecret } from '../support/replica-process.ts';

const BLOCK = 4096;
const SIZE = 16 * 1024 * 1024;
const BLOCKS = SIZE / BLOCK;
const ROUNDS = Number(process.env.ZEBU_CRASH_ROUNDS ?? 50);

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

/** Block content that names its write: header (writeId, block) then bytes derived from both. */
function blockBytes(buf: Buffer, at: number, writeId: number, block: number): void {
  buf.writeUInt32BE(writeId, at);
  buf.writeUInt32BE(block, at + 4);
  let x = (writeId * 2654435761 + block * 40503) >>> 0 || 7;
  for (let i = 8; i < BLOCK; i += 4) {
    x = (Math.imul(x, 1664525) + 1013904223) >>> 0;
    buf.writeUInt32BE(x, at + i);
  }
}

/** 0 for a zero block, the write id for an intact block, -1 for anything else (torn, foreign). */
function identify(buf: Buffer, at: number, block: number): number {
  const slice = buf.subarray(at, at + BLOCK);
  if (slice.every((b) => b === 0)) return 0;
  const writeId = slice.readUInt32BE(0);
  if (slice.readUInt32BE(4) !== block || writeId === 0) return -1;
  const expect = Buffer.allocUnsafe(BLOCK);
  blockBytes(expect, 0, writeId, block);
  return expect.equals(slice) ? writeId : -1;
}

test(`replica survives ${ROUNDS} SIGKILLs under a flushing writer`, async (t) => {
  const seed = testSeed();
  const random = rng(seed);
  t.diagnostic(`seed ${seed} (ZEBU_TEST_SEED to reproduce)`);
  const dir = tempDir(t);
  const { file: secretFile, secret } = writeSecret(dir);
  const replicaDir = path.join(dir, 'replica');

  // Per block: write ids in issue order; the earliest index that must still be visible.
  const history: number[][] = Array.from({ length: BLOCKS }, () => [0]);
  const floor = new Int32Array(BLOCKS); // index into history
  const lastAcked = new Int32Array(BLOCKS); // index into history
  let nextWriteId = 1;
  let totalWrites = 0;
  let totalFlushes = 0;
  let totalSnapshots = 0;
  let checkedBlocks = 0;

  for (let round = 0; round < ROUNDS; round++) {
    const proc = await startReplica({ dir: replicaDir, sizeBytes: SIZE, secretFile });
    let killed = false;
    t.after(() => {
      if (!killed) proc.child.kill('SIGKILL');
    });
    const client = await DataClient.connect({ port: proc.port, secret, epoch: round + 1, requestTimeoutMs: 10_000 });

    // Verify what the previous round left, then make it the new baseline.
    const all = await client.read(0, SIZE);
    for (let block = 0; block < BLOCKS; block++) {
      const id = identify(all, block * BLOCK, block);
      assert.notEqual(id, -1, `round ${round}: block ${block} holds bytes no write produced (seed ${seed})`);
      const index = history[block].lastIndexOf(id);
      assert.ok(index >= 0, `round ${round}: block ${block} holds write ${id}, never written there (seed ${seed})`);
      assert.ok(
        index >= floor[block],
        `round ${round}: block ${block} lost flushed write ${history[block][floor[block]]}, reads write ${id} (seed ${seed})`,
      );
      history[block] = [id];
      floor[block] = 0;
      lastAcked[block] = 0;
      checkedBlocks++;
    }

    // Run a writer and kill the process at a random moment.
    let stop = false;
    let inflight = 0;
    const maxInflight = 1 + Math.floor(random() * 16);
    const pump = (): void => {
      while (!stop && inflight < maxInflight) {
        const r = random();
        if (r < 0.08) {
          const captured = Int32Array.from(lastAcked);
          inflight++;
          client.send(Op.FLUSH, 0, 0, 0, Buffer.alloc(0), (err) => {
            inflight--;
            if (err === null) {
              totalFlushes++;
              for (let b = 0; b < BLOCKS; b++) if (captured[b] > floor[b]) floor[b] = captured[b];
            }
            pump();
          });
        } else if (r < 0.085 && totalSnapshots < 1e9) {
          // A snapshot implies a flush; keep the layer count bounded by deleting the previous one.
          const captured = Int32Array.from(lastAcked);
          const name = `s${round}-${nextWriteId}`;
          inflight++;
          client.snapshotCreate(name).then(
            async () => {
              totalSnapshots++;
              for (let b = 0; b < BLOCKS; b++) if (captured[b] > floor[b]) floor[b] = captured[b];
              const list = await client.snapshotList();
              for (const s of list) if (s.name !== name) await client.snapshotDelete(s.name);
            },
            () => {},
          ).catch(() => {}).finally(() => {
            inflight--;
            pump();
          });
        } else {
          const count = 1 + Math.floor(random() * 8);
          const first = Math.floor(random() * (BLOCKS - count));
          const writeId = nextWriteId++;
          const data = Buffer.allocUnsafe(count * BLOCK);
          const indexes: number[] = [];
          for (let i = 0; i < count; i++) {
            blockBytes(data, i * BLOCK, writeId, first + i);
            history[first + i].push(writeId);
            indexes.push(history[first + i].length - 1);
          }
          inflight++;
          client.send(Op.WRITE, 0, first * BLOCK, data.length, data, (err) => {
            inflight--;
            if (err === null) {
              totalWrites++;
              for (let i = 0; i < count; i++) if (indexes[i] > lastAcked[first + i]) lastAcked[first + i] = indexes[i];
            }
            pump();
          });
        }
      }
    };
    pump();
    await new Promise((resolve) => setTimeout(resolve, 30 + random() * 300));
    proc.child.kill('SIGKILL');
    killed = true;
    stop = true;
    assert.equal(await proc.exited, 'SIGKILL');
    client.close();
  }
  t.diagnostic(`rounds ${ROUNDS}, writes acknowledged ${totalWrites}, flushes acknowledged ${totalFlushes}, snapshots ${totalSnapshots}, blocks checked ${checkedBlocks}`);
  assert.ok(totalFlushes > ROUNDS / 2, 'the writer flushed');
});
