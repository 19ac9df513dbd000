/**
 * The layer limit is a refused request, not a failure: a snapshot past the replicas' maximum of
 * layers is refused with a clear error, nothing is paused for long or changed, every replica stays
 * in the write set and I/O goes on; after a snapshot is deleted the next one is taken. (Found by
 * bench:scale: the 250th snapshot used to set every replica ERR and fault the volume.) Scripted on
 * the simulator's world: a real engine and real replicas on memory disks.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Engine, ReplicaMode } from '../../src/engine/engine.ts';
import { Replica } from '../../src/replica/replica.ts';
import { MemoryDisk } from '../../src/replica/memory-disk.ts';
import { DataServer } from '../../src/protocol/server.ts';
import { ErrorCode, ZebuError } from '../../src/errors.ts';
import { SimWorld } from '../sim/world.ts';
import { SimNetwork } from '../sim/network.ts';

const SECRET = Buffer.alloc(32, 9);
const SIZE = 16 * 1024 * 1024;

test('a snapshot past the layer limit is refused (EINVAL), no replica is taken out, I/O goes on; a delete makes room', async () => {
  const world = new SimWorld(1);
  const net = new SimNetwork(world, world.random.fork());
  const replicas: Replica[] = [];
  const entries: string[] = [];
  for (const key of ['a', 'b']) {
    const proc = world.process(key);
    const replica = await Replica.create('/r', { sizeBytes: SIZE, disk: new MemoryDisk(), clock: proc.clock, maxLayers: 4 });
    const address = `10.0.2.${replicas.length + 1}:7000`;
    net.listen(address, proc, new DataServer(replica, { secret: SECRET, identity: { name: key }, clock: proc.clock, transport: net.transport(proc) }));
    replicas.push(replica);
    entries.push(`${key}=${address}`);
  }
  const engineProc = world.process('engine');
  const engine = Engine.create({
    name: 'v', sizeBytes: SIZE, replicas: entries, secret: SECRET, epoch: 1,
    requestTimeoutMs: 4000, pingIntervalMs: 1000, replicaWaitMs: 3000, transport: net.transport(engineProc), clock: engineProc.clock,
  });
  await world.await(engine.startUp(), 'start-up');
  for (const name of ['s1', 's2', 's3']) {
    await world.await(engine.write(0, Buffer.alloc(4096, name.charCodeAt(1))), 'write');
    await world.await(engine.snapshotCreate(name), name);
  }
  const refused = await world.await(engine.snapshotCreate('s4').then(() => null, (err: unknown) => err), 's4');
  assert.ok(refused instanceof ZebuError, String(refused));
  assert.equal(refused.code, ErrorCode.EINVAL);
  assert.match(refused.message, /the maximum is 4; delete snapshots first/);
  assert.deepEqual(engine.replicaStatus().map((s) => s.mode), [ReplicaMode.RW, ReplicaMode.RW]);
  await world.await(engine.write(8192, Buffer.alloc(4096, 7)), 'write after the refusal');
  const back = Buffer.alloc(4096);
  await world.await(engine.read(8192, 4096, back, 0), 'read after the refusal');
  assert.ok(back.every((x) => x === 7));
  assert.deepEqual((await world.await(engine.snapshotList(), 'list')).map((s) => s.name).filter((n) => n !== null).sort(), ['s1', 's2', 's3']);

  // A replica asked directly (a race past the engine's check) refuses the same way.
  await assert.rejects(replicas[0].snapshotCreate('direct'), (err) => err instanceof ZebuError && err.code === ErrorCode.EINVAL);

  await world.await(engine.snapshotDelete('s1'), 'delete s1');
  await world.await(engine.snapshotCreate('s4'), 's4 after the delete');
  assert.deepEqual(engine.replicaStatus().map((s) => s.mode), [ReplicaMode.RW, ReplicaMode.RW]);
  const report = await world.await(engine.verify(), 'verify');
  assert.deepEqual(report.differing, []);
});
