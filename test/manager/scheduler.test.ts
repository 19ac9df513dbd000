import { test } from 'node:test';
import assert from 'node:assert/strict';
import { scheduleReplicas, type SchedulerDisk, type SchedulerNode, type SchedulerPolicy } from '../../src/manager/scheduler.ts';

const GiB = 1024 ** 3;
const policy: SchedulerPolicy = { softAntiAffinity: true, overProvisioningPercentage: 100, minimalAvailablePercentage: 10 };

function node(name: string, extra: Partial<SchedulerNode> = {}): SchedulerNode {
  return { name, ready: true, allowScheduling: true, ...extra };
}
function disk(name: string, nodeId: string, extra: Partial<SchedulerDisk> = {}): SchedulerDisk {
  return {
    name, nodeId, ready: true, allowScheduling: true, storageMaximumBytes: 100 * GiB, storageAvailableBytes: 90 * GiB,
    storageReservedBytes: 0, storageScheduledBytes: 0, ...extra,
  };
}

test('replicas go to distinct nodes first', () => {
  const r = scheduleReplicas(3, {
    sizeBytes: GiB, existing: [], policy,
    nodes: [node('a'), node('b'), node('c')],
    disks: [disk('a1', 'a'), disk('a2', 'a'), disk('b1', 'b'), disk('c1', 'c')],
  });
  assert.deepEqual(r.reasons, []);
  assert.deepEqual(new Set(r.placements.map((p) => p.nodeId)), new Set(['a', 'b', 'c']));
});

test('soft anti-affinity: one node holds every replica on different disks', () => {
  const r = scheduleReplicas(3, {
    sizeBytes: GiB, existing: [], policy,
    nodes: [node('a')],
    disks: [disk('a1', 'a'), disk('a2', 'a'), disk('a3', 'a')],
  });
  assert.equal(r.placements.length, 3);
  assert.equal(new Set(r.placements.map((p) => p.diskId)).size, 3);
});

test('never two replicas on one disk; hard anti-affinity refuses a second on the node', () => {
  const one = scheduleReplicas(4, {
    sizeBytes: GiB, existing: [], policy,
    nodes: [node('a')], disks: [disk('a1', 'a'), disk('a2', 'a'), disk('a3', 'a')],
  });
  assert.equal(one.placements.length, 3);
  assert.match(one.reasons.join(), /already holds a replica/);
  const hard = scheduleReplicas(2, {
    sizeBytes: GiB, existing: [], policy: { ...policy, softAntiAffinity: false },
    nodes: [node('a')], disks: [disk('a1', 'a'), disk('a2', 'a')],
  });
  assert.equal(hard.placements.length, 1);
  assert.match(hard.reasons.join(), /soft-anti-affinity is off/);
});

test('existing replicas count: a replacement avoids their disks and nodes', () => {
  const r = scheduleReplicas(1, {
    sizeBytes: GiB, existing: [{ nodeId: 'a', diskId: 'a1' }, { nodeId: 'b', diskId: 'b1' }], policy,
    nodes: [node('a'), node('b'), node('c')],
    disks: [disk('a1', 'a'), disk('a2', 'a'), disk('b1', 'b'), disk('c1', 'c')],
  });
  assert.deepEqual(r.placements, [{ nodeId: 'c', diskId: 'c1' }]);
});

test('space: over-provisioning limit, reserved bytes and minimal available space', () => {
  const base = { existing: [], nodes: [node('a')] };
  // 100 GiB disk, 95 GiB already placed: a 10 GiB replica is over 100%.
  assert.equal(scheduleReplicas(1, { ...base, sizeBytes: 10 * GiB, policy, disks: [disk('a1', 'a', { storageScheduledBytes: 95 * GiB })] }).placements.length, 0);
  // ... but fits at 200%.
  assert.equal(scheduleReplicas(1, { ...base, sizeBytes: 10 * GiB, policy: { ...policy, overProvisioningPercentage: 200 }, disks: [disk('a1', 'a', { storageScheduledBytes: 95 * GiB })] }).placements.length, 1);
  // Reserved space shrinks the usable size.
  const reserved = scheduleReplicas(1, { ...base, sizeBytes: 10 * GiB, policy, disks: [disk('a1', 'a', { storageReservedBytes: 95 * GiB })] });
  assert.equal(reserved.placements.length, 0);
  assert.match(reserved.reasons.join(), /usable/);
  // A nearly full disk takes nothing new.
  const full = scheduleReplicas(1, { ...base, sizeBytes: GiB, policy, disks: [disk('a1', 'a', { storageAvailableBytes: 5 * GiB })] });
  assert.equal(full.placements.length, 0);
  assert.match(full.reasons.join(), /free/);
});

test('down nodes, unschedulable nodes and disks, unready disks are skipped with reasons', () => {
  const r = scheduleReplicas(1, {
    sizeBytes: GiB, existing: [], policy,
    nodes: [node('a', { ready: false }), node('b', { allowScheduling: false }), node('c')],
    disks: [disk('a1', 'a'), disk('b1', 'b'), disk('c1', 'c', { allowScheduling: false }), disk('c2', 'c', { ready: false })],
  });
  assert.equal(r.placements.length, 0);
  const text = r.reasons.join('\n');
  assert.match(text, /node a is down/);
  assert.match(text, /scheduling is off on node b/);
  assert.match(text, /disk c1: scheduling is off/);
  assert.match(text, /disk c2 is not ready/);
});

test('the disk with the most room wins, so volumes spread', () => {
  const disks = [disk('a1', 'a', { storageScheduledBytes: 50 * GiB }), disk('a2', 'a', { storageScheduledBytes: 10 * GiB })];
  const r = scheduleReplicas(1, { sizeBytes: GiB, existing: [], policy, nodes: [node('a')], disks });
  assert.deepEqual(r.placements, [{ nodeId: 'a', diskId: 'a2' }]);
  // Placements within one call count against the disk.
  const many = scheduleReplicas(2, { sizeBytes: GiB, existing: [], policy, nodes: [node('a'), node('b')], disks: [disk('a1', 'a'), disk('b1', 'b')] });
  assert.equal(many.placements.length, 2);
});

test('no disks at all', () => {
  const r = scheduleReplicas(1, { sizeBytes: GiB, existing: [], policy, nodes: [], disks: [] });
  assert.equal(r.placements.length, 0);
  assert.match(r.reasons.join(), /no disks/);
});

test('a volume on a backing image: disks its selectors refuse are skipped, disks with a ready file come first', () => {
  const image = {
    refusal: (d: string) => (d === 'c1' ? `disk ${d} is not in backing image base's disk selector` : null),
    preferred: new Set(['b1']),
  };
  const one = scheduleReplicas(1, { sizeBytes: GiB, existing: [], policy, nodes: [node('a'), node('b'), node('c')], disks: [disk('a1', 'a', { storageAvailableBytes: 99 * GiB }), disk('b1', 'b'), disk('c1', 'c')], image });
  assert.deepEqual(one.placements, [{ nodeId: 'b', diskId: 'b1' }], 'the disk with the file, though another has more room');
  const three = scheduleReplicas(3, { sizeBytes: GiB, existing: [], policy, nodes: [node('a'), node('b'), node('c')], disks: [disk('a1', 'a'), disk('b1', 'b'), disk('c1', 'c')], image });
  assert.equal(three.placements.length, 2);
  assert.ok(three.reasons.some((r) => /c1 is not in backing image base's disk selector/.test(r)), three.reasons.join('; '));
});
