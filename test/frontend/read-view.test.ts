/**
 * Reads the frontend serves from the replicas itself (src/frontend/read-view.ts): the READ_VIEW
 * exchange on the data protocol, the checks a direct read passes (server instance, epoch, a
 * withdrawn replica), and a real volume whose replica dies under a read load. The simulator
 * (test/sim) checks every read against the acknowledged writes across crashes and faults with
 * direct reads on; taking the withdrawal at a replica's failure out of the engine makes it fail.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { DataServer } from '../../src/protocol/server.ts';
import { DataClient } from '../../src/protocol/client.ts';
import { Op } from '../../src/protocol/frames.ts';
import { ErrorCode, ZebuError } from '../../src/errors.ts';
import { systemClock } from '../../src/os/clock.ts';
import { DirectReads, parseReadView } from '../../src/frontend/read-view.ts';
import type { ReadView } from '../../src/protocol/backend.ts';
import { MemoryBackend } from './memory-backend.ts';
import { tempDir } from '../support/tmp.ts';
import { startVolume, replicaDigest, run } from '../support/volume-cluster.ts';
import { controlRequest } from '../../src/protocol/control-channel.ts';

const SECRET = Buffer.from('read-view-test-secret-0123456789');

/** A backend whose read view the test changes; the change is announced inside a write, before it completes. */
class ViewBackend extends MemoryBackend {
  view: ReadView = { generation: 1, epoch: 0, timeoutMs: 1000, replicas: [] };
  private watchers: ((view: ReadView) => void)[] = [];
  reported = { reads: 0, bytes: 0, micros: 0 };

  watchReadView(known: number, holdMs: number, answer: (view: ReadView) => void): () => void {
    if (known !== this.view.generation) {
      answer(this.view);
      return () => {};
    }
    const watcher = (view: ReadView): void => {
      clearTimeout(timer);
      answer(view);
    };
    const timer = setTimeout(() => {
      this.watchers = this.watchers.filter((w) => w !== watcher);
      answer(this.view);
    }, holdMs);
    this.watchers.push(watcher);
    return () => {
      clearTimeout(timer);
      this.watchers = this.watchers.filter((w) => w !== watcher);
    };
  }

  failedReads: string[] = [];

  readFailed(replica: { host: string; port: number; instance: string }, error: string): void {
    this.failedReads.push(`${replica.host}:${replica.port}/${replica.instance}: ${error}`);
  }

  reportReads(reads: number, bytes: number, micros: number): void {
    this.reported = { reads: this.reported.reads + reads, bytes: this.reported.bytes + bytes, micros: this.reported.micros + micros };
  }

  override async write(offset: number, data: Buffer): Promise<void> {
    await super.write(offset, data);
    // As the engine does when a replica fails a write: the view changes before the write is answered.
    this.view = { ...this.view, generation: this.view.generation + 1 };
    const watchers = this.watchers;
    this.watchers = [];
    for (const w of watchers) w(this.view);
  }
}

async function serveTcp(backend: MemoryBackend): Promise<{ server: DataServer; port: number }> {
  const server = new DataServer(backend, { secret: SECRET });
  const address = await server.listen('127.0.0.1', 0);
  return { server, port: address.port };
}

function send(client: DataClient, op: number, offset: number, length: number, payload = Buffer.alloc(0)): Promise<Buffer> {
  return new Promise((resolve, reject) => client.send(op, 0, offset, length, payload, (err, data) => (err === null ? resolve(data) : reject(err))));
}

test('READ_VIEW: answered at once for another generation, held until a change — and that answer comes before the reply of the write that changed it', async (t) => {
  const backend = new ViewBackend(1 << 20);
  const { server, port } = await serveTcp(backend);
  t.after(() => server.close());
  const client = await DataClient.connect({ host: '127.0.0.1', port, secret: SECRET });
  t.after(() => client.close());
  const first = parseReadView(await send(client, Op.READ_VIEW, 0, 10_000));
  assert.equal(first.generation, 1);
  const order: string[] = [];
  const changed = send(client, Op.READ_VIEW, 1, 10_000).then((data) => order.push(`view ${parseReadView(data).generation}`));
  await new Promise((r) => setTimeout(r, 50));
  assert.equal(order.length, 0, 'held while the generation is the one known');
  const written = send(client, Op.WRITE, 0, 4096, Buffer.alloc(4096, 1)).then(() => order.push('write'));
  await Promise.all([changed, written]);
  assert.deepEqual(order, ['view 2', 'write']);
  // A second READ_VIEW on the same connection answers the first BUSY; a hold ends by itself.
  const a = send(client, Op.READ_VIEW, 2, 10_000).then(() => 'answered', (err: ZebuError) => err.code);
  const b = send(client, Op.READ_VIEW, 2, 30);
  assert.equal(await a, ErrorCode.BUSY);
  assert.equal(parseReadView(await b).generation, 2, 'the hold ended with the same view');
  // READ_REPORT reaches the backend; a malformed one is refused, the connection stays.
  const report = Buffer.alloc(24);
  report.writeUInt32BE(3, 4);
  report.writeUInt32BE(12288, 12);
  report.writeUInt32BE(900, 20);
  await send(client, Op.READ_REPORT, 0, 0, report);
  assert.deepEqual(backend.reported, { reads: 3, bytes: 12288, micros: 900 });
  await assert.rejects(send(client, Op.READ_REPORT, 0, 0, Buffer.alloc(5)), (err: ZebuError) => err.code === ErrorCode.EINVAL);
  // READ_FAILED: a well-formed one reaches the backend; malformed ones are refused, nothing else happens.
  await send(client, Op.READ_FAILED, 0, 0, Buffer.from(JSON.stringify({ host: '10.0.0.9', port: 7000, instance: 'abc', error: 'EIO' })));
  for (const bad of ['not json', '[]', '{"host":"h","port":"7000","instance":"i","error":"e"}', '{"host":"h","port":7000,"instance":1,"error":"e"}']) {
    await assert.rejects(send(client, Op.READ_FAILED, 0, 0, Buffer.from(bad)), (err: ZebuError) => err.code === ErrorCode.EINVAL, bad);
  }
  assert.deepEqual(backend.failedReads, ['10.0.0.9:7000/abc: EIO']);
});

test('READ_VIEW to a server without views (a replica) is UNSUPPORTED; malformed views are refused', async (t) => {
  const { server, port } = await serveTcp(new MemoryBackend(1 << 20));
  t.after(() => server.close());
  const client = await DataClient.connect({ host: '127.0.0.1', port, secret: SECRET });
  t.after(() => client.close());
  await assert.rejects(send(client, Op.READ_VIEW, 0, 1000), (err: ZebuError) => err.code === ErrorCode.UNSUPPORTED);
  const info = (await client.info()) as unknown as { instance: string };
  assert.match(info.instance, /^[0-9a-f]{16}$/, 'INFO names the server instance');
  for (const bad of ['nope', '{}', '{"generation":1,"epoch":0,"timeoutMs":5,"replicas":[{"host":"h","port":99999,"instance":"x","local":true}]}', '{"generation":-1,"epoch":0,"timeoutMs":5,"replicas":[]}']) {
    assert.throws(() => parseReadView(Buffer.from(bad)), (err: ZebuError) => err.code === ErrorCode.PROTOCOL, bad);
  }
});

function readVia(direct: DirectReads, offset: number, length: number): Promise<{ via: 'replica' | 'engine'; data?: Buffer } | 'not sent'> {
  return new Promise((resolve) => {
    const sent = direct.read(offset, length, (data) => resolve({ via: 'replica', data }), () => resolve({ via: 'engine' }));
    if (!sent) resolve('not sent');
  });
}

async function until(what: string, check: () => boolean): Promise<void> {
  for (let i = 0; i < 200 && !check(); i++) await new Promise((r) => setTimeout(r, 10));
  assert.ok(check(), what);
}

test('direct reads: only from the server instance named; a withdrawn replica\'s read in flight goes through the engine; a fenced one too', async (t) => {
  const replica = new MemoryBackend(1 << 20);
  const { server, port } = await serveTcp(replica);
  t.after(() => server.close());
  await (async () => {
    const c = await DataClient.connect({ host: '127.0.0.1', port, secret: SECRET });
    await send(c, Op.WRITE, 8192, 4096, Buffer.alloc(4096, 0x5a));
    c.close();
  })();
  const reported: string[] = [];
  const direct = new DirectReads({ name: 'v', secret: SECRET, transport: undefined, clock: systemClock, log: () => {}, replicaFailed: (r, err) => reported.push(`${r.instance} ${err.code}`) });
  t.after(() => direct.close());
  const view = (generation: number, instance: string): ReadView => ({ generation, epoch: 0, timeoutMs: 2000, replicas: [{ host: '127.0.0.1', port, instance, local: true }] });

  // Another process at the address (restarted: another instance): never read from.
  direct.adopt(view(1, 'a-restarted-one'));
  assert.equal(await readVia(direct, 8192, 4096), 'not sent');
  await new Promise((r) => setTimeout(r, 200));
  assert.equal(await readVia(direct, 8192, 4096), 'not sent', 'connected, and refused: another instance');

  // The instance named: read from it.
  direct.adopt(view(2, server.instance));
  assert.equal(await readVia(direct, 8192, 4096), 'not sent', 'connected at the first read, which goes through the engine');
  await until('connected', () => direct.connected === 1);
  const got = await readVia(direct, 8192, 4096);
  assert.ok(got !== 'not sent' && got.via === 'replica');
  assert.deepEqual(got.data, Buffer.alloc(4096, 0x5a));
  assert.ok(direct.counts.reads >= 1 && direct.counts.bytes >= 4096);

  // Withdrawn while a read is in flight there: that read goes through the engine.
  replica.hold();
  const inFlight = readVia(direct, 0, 4096);
  await until('the read is at the replica', () => replica.held === 1);
  direct.adopt({ generation: 3, epoch: 0, timeoutMs: 2000, replicas: [] });
  assert.deepEqual(await inFlight, { via: 'engine' });
  assert.equal(await readVia(direct, 0, 4096), 'not sent', 'nothing left to read from');
  replica.release();

  // A replica that refuses (FENCED: a newer engine opened it) hands the read to the engine.
  direct.adopt(view(4, server.instance));
  assert.equal(await readVia(direct, 0, 4096), 'not sent');
  await until('connected again', () => direct.connected === 1);
  replica.fence();
  assert.deepEqual(await readVia(direct, 0, 4096), { via: 'engine' });
  assert.deepEqual(reported, [], 'a fenced or withdrawn read is not the replica\'s fault');

  // A replica whose disk fails the read: reported (the engine takes it out), then the engine serves it.
  const failing = new FailingBackend(1 << 20);
  const second = await serveTcp(failing);
  t.after(() => second.server.close());
  direct.adopt({ generation: 5, epoch: 0, timeoutMs: 2000, replicas: [{ host: '127.0.0.1', port: second.port, instance: second.server.instance, local: true }] });
  assert.equal(await readVia(direct, 0, 4096), 'not sent');
  await until('connected to the failing one', () => direct.connected === 1);
  assert.deepEqual(await readVia(direct, 0, 4096), { via: 'engine' });
  assert.deepEqual(reported, [`${second.server.instance} ${ErrorCode.EIO}`]);
});

class FailingBackend extends MemoryBackend {
  override async read(): Promise<void> {
    throw new ZebuError(ErrorCode.EIO, 'read error on the data file');
  }
}

test('a replica SIGKILLed under a read load on a real volume: every read right, no client error, reads served by the replicas and counted by the engine', async (t) => {
  const SIZE = 64 * 1024 * 1024;
  const vol = await startVolume(t, { dir: tempDir(t), replicas: 3, sizeBytes: SIZE });
  const w = run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x6b 0 32M', vol.nbd], { timeoutMs: 60_000 });
  assert.equal(w.status, 0, w.stderr);
  // Many reads with a pattern check each, while the first replica (the one read first) dies.
  const commands: string[] = [];
  for (let i = 0; i < 4000; i++) commands.push('-c', `read -P 0x6b ${((i * 7919) % 8192) * 4096} 4k`);
  const reader = spawn('qemu-io', ['-f', 'raw', ...commands, vol.nbd], { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  reader.stdout.on('data', (d: Buffer) => (out += d.toString()));
  reader.stderr.on('data', (d: Buffer) => (out += d.toString()));
  const exited = new Promise<number | null>((resolve) => reader.once('exit', (code) => resolve(code)));
  t.after(() => reader.kill('SIGKILL'));
  await new Promise((r) => setTimeout(r, 300));
  assert.equal(reader.exitCode, null, 'the reads are still going on');
  vol.replicas[0].child.kill('SIGKILL');
  assert.equal(await exited, 0, out);
  assert.doesNotMatch(out, /error|verification failed|Pattern verification/i);
  assert.equal(out.match(/read 4096\/4096/g)?.length, 4000);
  // After the kill, reads go on at the survivors; both the link and the engine count them.
  const after = run('qemu-io', ['-f', 'raw', '-c', 'read -P 0x6b 0 32M', vol.nbd], { timeoutMs: 60_000 });
  assert.equal(after.status, 0, after.stderr);
  await new Promise((r) => setTimeout(r, 400));
  const [exported] = (await controlRequest(vol.frontendControlSocket, 'GET', '/v1/exports')) as { link: { directReads: number } }[];
  assert.ok(exported.link.directReads > 3000, `most reads went to the replicas directly: ${exported.link.directReads} of 4001`);
  const stats = (await controlRequest(vol.controlSocket, 'GET', '/v1/stats')) as { reads: number; readBytes: number };
  assert.ok(stats.reads >= exported.link.directReads, `engine counts ${stats.reads} reads`);
  assert.ok(stats.readBytes >= 32 * 1024 * 1024, 'and their bytes');
  const replicas = (await controlRequest(vol.controlSocket, 'GET', '/v1/replicas')) as { mode: string }[];
  assert.deepEqual(replicas.map((r) => r.mode), ['ERR', 'RW', 'RW']);
  const digests = await Promise.all([1, 2].map((i) => replicaDigest(vol.replicas[i].port, vol.secret, vol.epoch, SIZE)));
  assert.equal(digests[0], digests[1]);
  await vol.stop();
});

test('a replica whose disk fails direct reads is taken out by the engine; the client sees every read right', async (t) => {
  const SIZE = 32 * 1024 * 1024;
  const vol = await startVolume(t, { dir: tempDir(t), replicas: 3, sizeBytes: SIZE, replicaArgs: () => ['--fault-injection'] });
  // Written and read once: the frontend connects to the replicas at its first read.
  const w = run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x3c 0 8M', '-c', 'read -P 0x3c 0 8M', '-c', 'read -P 0x3c 0 8M', vol.nbd], { timeoutMs: 60_000 });
  assert.equal(w.status, 0, w.stderr);
  const client = await DataClient.connect({ host: '127.0.0.1', port: vol.replicas[0].port, secret: vol.secret, epoch: vol.epoch });
  t.after(() => client.close());
  await client.injectFaults({ rules: [{ op: 'read', errno: 'EIO', pathIncludes: '.data', count: 1_000_000 }] });
  const commands: string[] = [];
  for (let i = 0; i < 200; i++) commands.push('-c', `read -P 0x3c ${(i * 37 % 2048) * 4096} 4k`);
  const r = run('qemu-io', ['-f', 'raw', ...commands, vol.nbd], { timeoutMs: 60_000 });
  assert.equal(r.status, 0, r.stderr);
  assert.doesNotMatch(r.stdout + r.stderr, /error|verification failed/i);
  const replicas = (await controlRequest(vol.controlSocket, 'GET', '/v1/replicas')) as { mode: string; reason: string | null }[];
  assert.equal(replicas[0].mode, 'ERR', JSON.stringify(replicas));
  assert.match(replicas[0].reason ?? '', /directly failed/);
  assert.deepEqual(replicas.slice(1).map((x) => x.mode), ['RW', 'RW']);
  await vol.stop();
});
