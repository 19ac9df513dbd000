/**
 * replica.json: the rebuilding mark in its three spellings (old replicas wrote true), and a mark
 * nobody wrote refused as damage rather than read as "not rebuilding".
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { ZebuError, ErrorCode } from '../../src/errors.ts';
import { decodeMeta, encodeMeta, rebuildKindOf, layerIdFor, type ReplicaMeta } from '../../src/replica/meta.ts';

function meta(rebuilding?: unknown): ReplicaMeta {
  const head = layerIdFor(1);
  const m = { format: 1, sizeBytes: 1 << 20, epoch: 3, maxLayers: 250, nextLayerId: 2, headId: head, layers: [{ id: head, kind: 'head', name: null, parent: null, createdAt: 'now' }] } as unknown as ReplicaMeta;
  if (rebuilding !== undefined) (m as { rebuilding?: unknown }).rebuilding = rebuilding;
  return m;
}

test('rebuilding marks: absent, false, true (an older replica: full), "full", "delta"', () => {
  for (const [mark, kind] of [[undefined, null], [false, null], [true, 'full'], ['full', 'full'], ['delta', 'delta']] as const) {
    const back = decodeMeta(encodeMeta(meta(mark)), 'replica.json');
    assert.equal(rebuildKindOf(back), kind, String(mark));
  }
});

test('an unknown rebuilding mark is damage, named', () => {
  for (const mark of ['partial', 2, null, {}]) {
    assert.throws(() => decodeMeta(encodeMeta(meta(mark)), 'r0/replica.json'), (err) =>
      err instanceof ZebuError && err.code === ErrorCode.EIO && /r0\/replica\.json is unreadable: rebuilding mark .* is none of/.test(err.message), JSON.stringify(mark));
  }
});
