/**
 * Where the manager attaches a detached volume for a while: replica moves on a node with a
 * healthy replica; a recurring job where a workload last attached the volume when that node is up.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { SqliteStore } from '../../src/store/sqlite-store.ts';
import { Kind, Objects, type ReplicaValue } from '../../src/cluster/objects.ts';
import { nodeForJob, nodeWithHealthyReplica } from '../../src/manager/attach-node.ts';

async function cluster(t: { after: (fn: () => unknown) => void }) {
  const store = SqliteStore.open(':memory:');
  t.after(() => store.close());
  const objects = new Objects(store);
  const up = async (node: string): Promise<void> => {
    const lease = await store.grantLease(60_000);
    await objects.create(Kind.NodeLease, node, { startedAt: new Date().toISOString() }, { leaseId: lease.id });
  };
  const replica = async (name: string, node: string, healthy: boolean, failed = false): Promise<void> => {
    const value = {
      spec: {
        volumeName: 'v', nodeId: node, diskId: `${node}-d0`, dataPath: `/disks/${node}/${name}`, sizeBytes: 1 << 30, desireState: 'running',
        healthyAt: healthy ? new Date().toISOString() : null, failedAt: failed ? new Date().toISOString() : null,
      },
      status: { state: 'running', address: null, pid: null, restarts: 0, message: null },
      createdAt: new Date().toISOString(), deletionRequestedAt: null,
    } as unknown as ReplicaValue;
    await objects.create(Kind.Replica, name, value);
  };
  return { objects, up, replica };
}

test('replica moves: a node that is up with a healthy replica, the preferred one first', async (t) => {
  const { objects, up, replica } = await cluster(t);
  await up('n1');
  await up('n2');
  await replica('r1', 'n1', true);
  await replica('r2', 'n2', true);
  await replica('r3', 'n3', true); // n3 is down
  assert.equal(await nodeWithHealthyReplica(objects, 'v', 'n2'), 'n2');
  assert.equal(await nodeWithHealthyReplica(objects, 'v', 'n3'), 'n1', 'not a node that is down');
  assert.equal(await nodeWithHealthyReplica(objects, 'v', null), 'n1');
});

test('a recurring job: where a workload last attached the volume when that node is up (even without a replica); else a node with a healthy replica; never with none', async (t) => {
  const { objects, up, replica } = await cluster(t);
  await up('n1');
  await up('n2');
  await up('n3');
  // No healthy replica on a node that is up: nowhere, wherever the workload was.
  await replica('r0', 'n2', false);
  await replica('rf', 'n1', true, true);
  assert.equal(await nodeForJob(objects, 'v', 'n3', 'n1'), null);
  await replica('r1', 'n1', true);
  await replica('r2', 'n2', true);
  assert.equal(await nodeForJob(objects, 'v', 'n3', 'n1'), 'n3', 'the workload\'s node, which holds no replica');
  assert.equal(await nodeForJob(objects, 'v', 'n2', 'n1'), 'n2');
  assert.equal(await nodeForJob(objects, 'v', null, 'n2'), 'n2', 'never attached by a workload: the preferred node with a replica');
  assert.equal(await nodeForJob(objects, 'v', 'n4', 'n2'), 'n2', 'the workload\'s node is down (no lease): a node with a replica');
  assert.equal(await nodeForJob(objects, 'v', 'n4', null), 'n1');
});
