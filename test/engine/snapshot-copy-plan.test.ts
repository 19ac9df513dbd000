import { test } from 'node:test';
import assert from 'node:assert/strict';
import { fullResumeRefusal, snapshotCopyPlan } from '../../src/engine/rebuild-plan.ts';
import type { ReplicaInfo, SnapshotInfo } from '../../src/replica/replica.ts';

function snap(name: string, id: string, parent: string | null, createdAt: string, inChain: boolean): SnapshotInfo {
  return { name, id, parent, createdAt, sizeBytesUsed: 0, inChain };
}

test('a chain: oldest first; the head sits on the newest', () => {
  const plan = snapshotCopyPlan([snap('b', 'L2', 'L1', '2', true), snap('a', 'L1', null, '1', true), snap('c', 'L3', 'L2', '3', true)]);
  assert.deepEqual(plan.order, [{ name: 'a', parent: null }, { name: 'b', parent: 'a' }, { name: 'c', parent: 'b' }]);
  assert.equal(plan.headParent, 'c');
});

test('a tree: parents before children, depth first, oldest child first; the head on its chain\'s newest', () => {
  // s1 -> s2 (branch, older) and s1 -> s3 -> s4 (chain); a base layer id as s1's parent counts as none.
  const plan = snapshotCopyPlan([
    snap('s4', 'L7', 'L5', '5', true), snap('s2', 'L3', 'L2', '3', false), snap('s1', 'L2', 'L1', '1', true), snap('s3', 'L5', 'L2', '4', true),
  ]);
  assert.deepEqual(plan.order.map((x) => `${x.parent ?? '-'}>${x.name}`), ['->s1', 's1>s2', 's1>s3', 's3>s4']);
  assert.equal(plan.headParent, 's4');
});

test('two roots (a root snapshot was deleted) and no snapshot at all', () => {
  const plan = snapshotCopyPlan([snap('x', 'L4', null, '2', false), snap('y', 'L6', null, '3', true)]);
  assert.deepEqual(plan.order, [{ name: 'x', parent: null }, { name: 'y', parent: null }]);
  assert.equal(plan.headParent, 'y');
  assert.deepEqual(snapshotCopyPlan([]), { order: [], headParent: null });
});

test('a stopped full rebuild goes on only over snapshots that are the volume\'s, on the same parents', () => {
  const volume = [snap('a', 'L1', null, '1', true), snap('b', 'L2', 'L1', '2', true), snap('c', 'L4', 'L2', '3', true)];
  const marked = { rebuilding: true, rebuildKind: 'full' } as ReplicaInfo;
  // The target's layer ids are its own; names and parents count.
  assert.equal(fullResumeRefusal(marked, [], volume), null);
  assert.equal(fullResumeRefusal(marked, [snap('a', 'L7', null, '9', true), snap('b', 'L9', 'L7', '9', true)], volume), null);
  assert.match(fullResumeRefusal(marked, [snap('z', 'L7', null, '9', true)], volume)!, /its snapshot z is not in the volume/);
  assert.match(fullResumeRefusal(marked, [snap('a', 'L7', null, '9', true), snap('c', 'L9', 'L7', '9', true)], volume)!, /its snapshot c sits on a, the volume's on b/);
  assert.match(fullResumeRefusal({ rebuilding: true, rebuildKind: 'delta' } as ReplicaInfo, [], volume)!, /no full rebuild of it stopped midway/);
  assert.match(fullResumeRefusal({ rebuilding: false } as ReplicaInfo, [], volume)!, /no full rebuild of it stopped midway/);
});
