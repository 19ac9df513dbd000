/**
 * A full rebuild starts the target's missed-write maps afresh. A replica can come to a full
 * rebuild holding maps from an earlier life (it served, held a map for a replica that was out,
 * and lost its data before a flush); the snapshots the rebuild recreates void them, and one left
 * behind would later stand for a replica that never left and deny it a delta rebuild (found by the
 * simulator). Scripted on the simulator's world: a real engine and real replicas on memory disks.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Engine, ReplicaMode } from '../../src/engine/engine.ts';
import { Replica } from '../../src/replica/replica.ts';
import { MemoryDisk } from '../../src/replica/memory-disk.ts';
import { DataServer } from '../../src/protocol/server.ts';
import { SimWorld, type SimProcess } from '../sim/world.ts';
import { SimNetwork } from '../sim/network.ts';

const SECRET = Buffer.alloc(32, 9);
const SIZE = 16 * 1024 * 1024;
const DIR = '/replica';

interface Member {
  key: string;
  address: string;
  disk: MemoryDisk;
  proc: SimProcess | null;
  replica: Replica | null;
}

test('a full rebuild drops the maps its target kept from an earlier life; the replica they named still comes back by a delta', async () => {
  const world = new SimWorld(1);
  const net = new SimNetwork(world, world.random.fork());
  const members: Member[] = ['a', 'b', 'c'].map((key, i) => ({ key, address: `10.0.1.${i + 1}:7000`, disk: new MemoryDisk(), proc: null, replica: null }));
  const [, b, c] = members;
  const entry = (m: Member): string => `${m.key}=${m.address}`;
  const start = async (m: Member): Promise<void> => {
    m.proc = world.process(m.key);
    const exists = await Replica.exists(DIR, m.disk);
    m.replica = exists
      ? await Replica.open(DIR, { disk: m.disk, clock: m.proc.clock })
      : await Replica.create(DIR, { sizeBytes: SIZE, disk: m.disk, clock: m.proc.clock });
    net.listen(m.address, m.proc, new DataServer(m.replica, { secret: SECRET, identity: { name: m.key }, clock: m.proc.clock, transport: net.transport(m.proc) }));
  };
  for (const m of members) await start(m);
  const engineProc = world.process('engine');
  const engine = Engine.create({
    name: 'v', sizeBytes: SIZE, replicas: [entry(members[0]), entry(b)], secret: SECRET, epoch: 1,
    requestTimeoutMs: 4000, pingIntervalMs: 1000, replicaWaitMs: 3000, transport: net.transport(engineProc), clock: engineProc.clock,
  });
  const modes = (): string => engine.replicaStatus().map((s) => `${s.key}:${s.mode}`).join(' ');
  const until = async (what: string, done: () => boolean): Promise<void> => {
    for (let i = 0; i < 2000 && !done(); i++) await world.runFor(10);
    assert.ok(done(), `${what} (replicas: ${modes()})`);
  };
  await world.await(engine.startUp(), 'start-up');
  await world.await(engine.write(0, Buffer.alloc(65536, 1)), 'write');
  await world.await(engine.snapshotCreate('s1'), 'snapshot');
  await world.await(engine.write(65536, Buffer.alloc(65536, 2)), 'write');

  // c is empty, but kept a map for b from an earlier life.
  await c.replica!.missedStart('b');
  assert.ok('b' in c.replica!.intentGet().missed);
  await world.await(engine.addReplica(entry(c)), 'add c');
  await until('c is rebuilt (full: it is empty) and serves', () => engine.replicaStatus().some((s) => s.key === 'c' && s.mode === ReplicaMode.RW));
  const summary = c.replica!.intentGet();
  assert.deepEqual(Object.keys(summary.missed), [], 'no map survives the full rebuild');
  assert.deepEqual(summary.invalidMissed, []);

  // b goes out for a while and comes back: the maps the others started for it bring it back by a delta.
  b.proc!.kill();
  await until('b is out', () => engine.replicaStatus().some((s) => s.key === 'b' && s.mode === ReplicaMode.ERR));
  await world.await(engine.write(131072, Buffer.alloc(65536, 3)), 'write while b is out');
  await start(b);
  await world.await(engine.addReplica(entry(b)), 'add b back');
  await until('b is back', () => engine.replicaStatus().every((s) => s.mode === ReplicaMode.RW));
  const last = (engine.info() as { lastRebuild: { replica: string; delta: boolean; error: string | null } | null }).lastRebuild;
  assert.equal(last?.replica, b.address);
  assert.equal(last?.error, null);
  assert.equal(last?.delta, true, `b came back by a delta rebuild (last rebuild: ${JSON.stringify(last)})`);
  const report = await world.await(engine.verify(), 'verify');
  assert.deepEqual(report.differing, []);
  await world.await(engine.close(), 'close');
});
