/**
 * The engine link's heartbeat under hung processes, on the simulator's world (simulated clock and
 * network, processes that hang): a hung engine that dies only later is replaced and the next one
 * is not taken for hung; the frontend's own stall is not taken for the engine's.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { EngineLink } from '../../src/frontend/engine-link.ts';
import { DataServer } from '../../src/protocol/server.ts';
import type { ProcessIdentity } from '../../src/os/process-identity.ts';
import { SimWorld, type SimProcess } from '../sim/world.ts';
import { SimNetwork } from '../sim/network.ts';
import { MemoryBackend } from './memory-backend.ts';

const SECRET = Buffer.alloc(32, 5);
const SOCKET = 'engine.sock';
const TIMEOUTS = { heartbeatIntervalMs: 500, hangTimeoutMs: 2000, stallTimeoutMs: 30_000 };

interface Setup {
  world: SimWorld;
  net: SimNetwork;
  frontend: SimProcess;
  startEngine: (pid: number) => { proc: SimProcess; identity: ProcessIdentity };
  /** The frontend's link; every kill it asks for is recorded in `kills` (and `onKill` runs). */
  connect: (onKill?: (pid: number) => void) => Promise<EngineLink>;
  kills: number[];
}

function setUp(): Setup {
  const world = new SimWorld(7);
  const net = new SimNetwork(world, world.random.fork());
  const frontend = world.process('frontend');
  const startEngine = (pid: number): { proc: SimProcess; identity: ProcessIdentity } => {
    const proc = world.process(`engine-${pid}`);
    const identity = { pid, startTime: String(pid) };
    net.listen(SOCKET, proc, new DataServer(new MemoryBackend(1 << 20), { secret: SECRET, identity: { process: identity }, clock: proc.clock }));
    return { proc, identity };
  };
  const kills: number[] = [];
  const connect = (onKill?: (pid: number) => void): Promise<EngineLink> => world.await(EngineLink.connect({
    name: 'v', socketPath: SOCKET, secret: SECRET, ...TIMEOUTS, transport: net.transport(frontend), clock: frontend.clock,
    killEngine: (identity) => {
      kills.push(identity.pid);
      onKill?.(identity.pid);
      return true;
    },
  }), 'connect');
  return { world, net, frontend, startEngine, connect, kills };
}

test('a hung engine whose kill is delayed: the link waits out its backlog, then serves from the next engine and leaves it alone', async () => {
  const { world, net, startEngine, connect, kills } = setUp();
  const first = startEngine(4_000_001);
  // It cannot be killed at once (stuck in the kernel, say): it dies 5 s later.
  const link = await connect((pid) => {
    if (pid === first.identity.pid) world.schedule(5000, () => first.proc.kill());
  });
  // The engine hangs before the first heartbeat made its connection: that connection waits in
  // its backlog until the process dies.
  // (The handshake deadline, 5 s, outlasts the hang timeout: the engine is found hung first.)
  net.freeze(first.proc, 60_000);
  await world.runFor(3600);
  assert.deepEqual(kills, [4_000_001], 'the hung engine was found and killed');
  startEngine(4_000_002); // its supervisor starts the next one (the old one is still there, hung)
  // The link's connections made while the old engine still listened wait in its backlog until it
  // dies; the heartbeat connection made for it does not hold up the next engine's.
  await world.runFor(10_000);
  assert.equal(link.view().state, 'OPEN');
  assert.deepEqual(link.view().engine, { pid: 4_000_002, startTime: '4000002' });
  assert.deepEqual(kills, [4_000_001], 'the next engine answers its heartbeat and is left alone');
  link.close();
});

test('a frontend that stalled while its heartbeat was unanswered reads the answer before it judges the engine', async () => {
  const { world, net, startEngine, connect, kills, frontend } = setUp();
  const engine = startEngine(4_000_001);
  const link = await connect();
  await world.runFor(1200); // the heartbeat connection is made and answers
  // The engine hangs for 1.5 s (a heartbeat goes unanswered meanwhile); 1 s into it the frontend
  // stalls for 3 s. The engine has answered long before the frontend runs again.
  net.freeze(engine.proc, 1500);
  world.schedule(1000, () => net.freeze(frontend, 3000));
  await world.runFor(6000);
  assert.deepEqual(kills, [], 'the engine, which answered, was not killed');
  assert.equal(link.view().state, 'OPEN');
  assert.equal(link.view().hangs, 0);
  link.close();
});
