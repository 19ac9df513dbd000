import { test } from 'node:test';
import assert from 'node:assert/strict';
import { balanceMove, scheduleReplicas, type SchedulerDisk, type SchedulerNode, type SchedulerPolicy } from '../../src/manager/scheduler.ts';

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

test('placement for a move: only the disk or node asked for; an evicted disk or node takes nothing', () => {
  const nodes = [node('a'), node('b', { evicting: true })];
  const disks = [disk('a1', 'a'), disk('a2', 'a', { evicting: true }), disk('a3', 'a'), disk('b1', 'b')];
  const onDisk = scheduleReplicas(1, { sizeBytes: GiB, existing: [], policy, nodes, disks, only: { diskId: 'a3', nodeId: null } });
  assert.deepEqual(onDisk.placements, [{ nodeId: 'a', diskId: 'a3' }]);
  const evictedDisk = scheduleReplicas(1, { sizeBytes: GiB, existing: [], policy, nodes, disks, only: { diskId: 'a2', nodeId: null } });
  assert.deepEqual(evictedDisk.placements, []);
  assert.match(evictedDisk.reasons.join(';'), /disk a2 is being evicted/);
  const evictedNode = scheduleReplicas(1, { sizeBytes: GiB, existing: [], policy, nodes, disks, only: { diskId: null, nodeId: 'b' } });
  assert.match(evictedNode.reasons.join(';'), /node b is being evicted/);
  const unknown = scheduleReplicas(1, { sizeBytes: GiB, existing: [], policy, nodes, disks, only: { diskId: 'zz', nodeId: null } });
  assert.match(unknown.reasons.join(';'), /disk zz is not registered/);
});

test('auto-balance: least-effort separates replicas sharing a node; best-effort evens out nodes, then disks of a node; disabled does nothing', () => {
  const nodes = [node('a'), node('b')];
  const disks = [disk('a1', 'a'), disk('a2', 'a'), disk('b1', 'b'), disk('b2', 'b')];
  const sharing = [{ name: 'r1', nodeId: 'a', diskId: 'a1' }, { name: 'r2', nodeId: 'a', diskId: 'a2' }];
  const counts = new Map([['a1', 1], ['a2', 1]]);
  assert.equal(balanceMove('disabled', { sizeBytes: GiB, replicas: sharing, nodes, disks, policy, counts }), null);
  const least = balanceMove('least-effort', { sizeBytes: GiB, replicas: sharing, nodes, disks, policy, counts });
  assert.deepEqual({ replica: least!.replica, diskId: least!.diskId }, { replica: 'r1', diskId: 'b1' });
  assert.match(least!.why, /share node a/);
  // No other node can take it: nothing to do.
  assert.equal(balanceMove('least-effort', { sizeBytes: GiB, replicas: sharing, nodes: [node('a'), node('b', { allowScheduling: false })], disks, policy, counts }), null);

  // One replica on a crowded node (4 replicas of other volumes there, none on b): best-effort moves it, least-effort does not.
  const alone = [{ name: 'r1', nodeId: 'a', diskId: 'a1' }];
  const crowded = new Map([['a1', 3], ['a2', 2]]);
  assert.equal(balanceMove('least-effort', { sizeBytes: GiB, replicas: alone, nodes, disks, policy, counts: crowded }), null);
  const best = balanceMove('best-effort', { sizeBytes: GiB, replicas: alone, nodes, disks, policy, counts: crowded });
  assert.deepEqual({ replica: best!.replica, diskId: best!.diskId }, { replica: 'r1', diskId: 'b1' });
  // Balanced within one: stays.
  assert.equal(balanceMove('best-effort', { sizeBytes: GiB, replicas: alone, nodes, disks, policy, counts: new Map([['a1', 1], ['b1', 1]]) }), null);
  // One node: disks of the node are evened out.
  const oneNode = balanceMove('best-effort', { sizeBytes: GiB, replicas: alone, nodes: [node('a')], disks: [disk('a1', 'a'), disk('a2', 'a')], policy, counts: new Map([['a1', 3]]) });
  assert.deepEqual({ replica: oneNode!.replica, diskId: oneNode!.diskId }, { replica: 'r1', diskId: 'a2' });
  // Repeating the moves ends: each lowers the spread.
  let at = 'a1';
  const load = new Map([['a1', 6], ['a2', 0]]);
  for (let i = 0; i < 10; i++) {
    const m = balanceMove('best-effort', { sizeBytes: GiB, replicas: [{ name: 'r', nodeId: 'a', diskId: at }], nodes: [node('a')], disks: [disk('a1', 'a'), disk('a2', 'a')], policy, counts: load });
    if (m === null) break;
    load.set(at, load.get(at)! - 1);
    load.set(m.diskId, (load.get(m.diskId) ?? 0) + 1);
    at = m.diskId;
    assert.ok(i < 5, 'balancing ends');
  }
});
