/**
 * The real `zebu` CLI (a child process) against the real API server over an in-memory
 * ManagerService (test/api/fake-service.ts): outputs, --json shapes (exactly what the API
 * returns), waiting commands, one-line errors with exit status 1, token and API resolution.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import type { FastifyInstance } from 'fastify';
import { buildApiServer } from '../../src/api/server.ts';
import { FakeManagerService } from '../api/fake-service.ts';
import { ZEBU_MAIN, startTestReplica } from '../support/replica-process.ts';
import { watchChildStart } from '../support/child-ready.ts';
import { controlRequest } from '../../src/protocol/control-channel.ts';
import { tempDir } from '../support/tmp.ts';

const TOKEN = 'cli-test-token-0123456789';
const GiB = 2 ** 30;
const MiB = 2 ** 20;

interface Result {
  stdout: string;
  stderr: string;
  status: number | null;
}

interface Api {
  url: string;
  app: FastifyInstance;
  service: FakeManagerService;
}

async function startApi(t: { after: (fn: () => Promise<void>) => void }): Promise<Api> {
  const service = new FakeManagerService();
  const app = await buildApiServer({ service, token: TOKEN });
  await app.listen({ host: '127.0.0.1', port: 0 });
  t.after(() => app.close());
  const address = app.server.address() as net.AddressInfo;
  return { url: `http://127.0.0.1:${address.port}`, app, service };
}

/** The environment without any ZEBU_* the caller's shell may have set. */
function cleanEnv(extra: Record<string, string>): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) if (!k.startsWith('ZEBU_')) env[k] = v;
  return { ...env, ...extra };
}

/** Runs the CLI asynchronously (the API server lives in this process and must keep answering). */
function zebu(api: { url: string } | null, args: string[], options: { env?: Record<string, string>; cwd?: string; token?: string | null } = {}): Promise<Result> {
  const env: Record<string, string> = {};
  if (api !== null) env.ZEBU_API = api.url;
  const token = options.token === undefined ? TOKEN : options.token;
  if (token !== null) env.ZEBU_TOKEN = token;
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [ZEBU_MAIN, ...args], { env: cleanEnv({ ...env, ...options.env }), cwd: options.cwd, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const timer = setTimeout(() => child.kill('SIGKILL'), 120_000);
    child.once('error', reject);
    child.once('close', (status) => {
      clearTimeout(timer);
      resolve({ stdout, stderr, status });
    });
  });
}

async function ok(api: Api | { url: string }, args: string[], options: Parameters<typeof zebu>[2] = {}): Promise<string> {
  const r = await zebu(api, args, options);
  assert.equal(r.status, 0, `zebu ${args.join(' ')} exited ${r.status}: ${r.stdout}${r.stderr}`);
  assert.equal(r.stderr, '', `nothing on stderr when it is not a terminal: ${r.stderr}`);
  return r.stdout;
}

async function okJson(api: Api, args: string[]): Promise<any> {
  return JSON.parse(await ok(api, [...args, '--json']));
}

/** A failure: exit 1 and exactly one line `zebu: ...` on stderr, nothing on stdout. */
async function fails(api: { url: string } | null, args: string[], pattern: RegExp, options: Parameters<typeof zebu>[2] = {}): Promise<string> {
  const r = await zebu(api, args, options);
  const label = `zebu ${args.join(' ')}: ${JSON.stringify(r)}`;
  assert.equal(r.status, 1, label);
  assert.equal(r.stdout, '', label);
  const lines = r.stderr.split('\n');
  assert.equal(lines.length, 2, `one line: ${label}`);
  assert.equal(lines[1], '');
  assert.match(lines[0], /^zebu: \S/, label);
  assert.match(lines[0], pattern, label);
  return lines[0];
}

/** What the API itself answers, for comparing --json output. */
async function apiGet(api: Api, pathName: string): Promise<any> {
  const r = await fetch(`${api.url}${pathName}`, { headers: { authorization: `Bearer ${TOKEN}` } });
  assert.equal(r.status, 200, pathName);
  return r.json();
}

async function closedPort(): Promise<number> {
  const server = net.createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as net.AddressInfo).port;
  await new Promise<void>((resolve) => server.close(() => resolve()));
  return port;
}

test('volume create, list, get, attach, detach, expand, delete through the CLI', async (t) => {
  const api = await startApi(t);
  const created = await ok(api, ['volume', 'create', 'v1', '--size', '1GiB', '--replicas', '3']);
  assert.match(created, /^volume v1 created: 1 GiB, 3 replica\(s\), detached\n$/);
  const v2 = await okJson(api, ['volume', 'create', 'v2', '--size', '512MiB']);
  assert.equal(v2.sizeBytes, 512 * MiB);
  assert.equal(v2.numberOfReplicas, 3);
  await ok(api, ['volume', 'create', 'v3', '--size', '1073741824', '--replicas', '1']);
  assert.equal(api.service.volumes.get('v3')!.view.sizeBytes, GiB, 'plain bytes');

  // --json: exactly what the API returns.
  assert.deepEqual(await okJson(api, ['volume', 'list']), await apiGet(api, '/v1/volumes'));
  assert.deepEqual(await okJson(api, ['volume', 'get', 'v1']), await apiGet(api, '/v1/volumes/v1'));
  const list = await okJson(api, ['volume', 'list']);
  assert.ok(Array.isArray(list));
  assert.deepEqual(list.map((v: { name: string }) => v.name), ['v1', 'v2', 'v3']);

  // Readable table: a header, one line per volume, columns aligned.
  const table = (await ok(api, ['volume', 'list'])).trimEnd().split('\n');
  assert.equal(table.length, 4);
  assert.match(table[0], /^NAME\s+SIZE\s+REPLICAS\s+STATE\s+ROBUSTNESS\s+NODE\s+ENDPOINT\s+LAST BACKUP\s+RECOVERY POINT AGE$/);
  assert.match(table[1], /^v1\s+1 GiB\s+3\s+detached\s+unknown\s+-\s+-\s+-\s+-$/);
  assert.equal(table[1].indexOf('detached'), table[0].indexOf('STATE'));
  const details = await ok(api, ['volume', 'get', 'v1']);
  assert.match(details, /^name:\s+v1$/m);
  assert.match(details, /^size:\s+1 GiB \(1073741824 bytes\)$/m);
  assert.match(details, /^REPLICA\s+NODE\s+DISK/m);

  // attach waits and prints the NBD URI alone.
  const uri = await ok(api, ['volume', 'attach', 'v1']);
  assert.equal(uri, 'nbd://127.0.0.1:10809/v1\n');
  assert.equal(api.service.volumes.get('v1')!.view.state, 'attached');
  assert.equal(await ok(api, ['volume', 'attach', 'v1']), 'nbd://127.0.0.1:10809/v1\n', 'attaching an attached volume prints its URI again');
  const attached = await okJson(api, ['volume', 'get', 'v1']);
  assert.equal(attached.epoch, 1);
  assert.deepEqual(attached.replicas.map((r: { mode: string }) => r.mode), ['RW', 'RW', 'RW']);
  assert.match(await ok(api, ['volume', 'list']), /^v1\s+1 GiB\s+3\/3\s+attached\s+healthy\s+node-1\s+nbd:\/\/127\.0\.0\.1:10809\/v1\s+-\s+-$/m);

  // --no-wait returns at once with the state; volume wait waits.
  assert.equal(await ok(api, ['volume', 'attach', 'v2', '--no-wait']), 'attaching\n');
  assert.equal(await ok(api, ['volume', 'wait', 'v2', '--state', 'attached', '--robustness', 'healthy']), 'volume v2: attached, healthy\n');
  assert.equal((await okJson(api, ['volume', 'wait', 'v2', '--state', 'attached'])).endpoint, 'nbd://127.0.0.1:10809/v2');

  // Maintenance: no export; prints the state.
  assert.match(await ok(api, ['volume', 'attach', 'v3', '--maintenance']), /^attached \(maintenance mode: no NBD export\)\n$/);
  assert.equal(api.service.volumes.get('v3')!.view.endpoint, null);

  // detach waits until detached; delete until gone.
  assert.equal(await ok(api, ['volume', 'detach', 'v2']), 'volume v2 detached\n');
  assert.equal(api.service.volumes.get('v2')!.view.state, 'detached');
  assert.equal(await ok(api, ['volume', 'delete', 'v2']), 'volume v2 deleted\n');
  assert.equal(api.service.volumes.has('v2'), false);
  await fails(api, ['volume', 'get', 'v2'], /^zebu: volume v2 not found$/);

  // expand: detached -> applied at the next attach; attached -> online.
  await ok(api, ['volume', 'detach', 'v3']);
  assert.match(await ok(api, ['volume', 'expand', 'v3', '--size', '2GiB']), /2 GiB \(2147483648 bytes\) \(applied at the next attach\)/);
  assert.match(await ok(api, ['volume', 'expand', 'v1', '--size', '3GiB']), /^volume v1: 3 GiB \(3221225472 bytes\)\n$/);
  assert.equal(api.service.volumes.get('v1')!.view.sizeBytes, 3 * GiB);
  assert.equal((await okJson(api, ['volume', 'expand', 'v1', '--size', '3GiB'])).sizeBytes, 3 * GiB);

  // delete --no-wait: the request only.
  assert.equal(await ok(api, ['volume', 'delete', 'v3', '--no-wait']), 'volume v3 deleting\n');
  assert.equal(await ok(api, ['volume', 'wait', 'v3', '--state', 'deleted']), 'volume v3 deleted\n');
});

test('snapshots, replicas, nodes, disks, settings and events: tables and --json', async (t) => {
  const api = await startApi(t);
  await ok(api, ['volume', 'create', 'v1', '--size', '64MiB', '--replicas', '2']);
  await fails(api, ['snapshot', 'create', 'v1', 's1'], /^zebu: a snapshot needs volume v1 attached \(it is detached\)$/);
  await ok(api, ['volume', 'attach', 'v1']);
  assert.equal(await ok(api, ['snapshot', 'create', 'v1', 'before']), 'snapshot before of volume v1 created\n');
  const generated = await okJson(api, ['snapshot', 'create', 'v1']);
  assert.equal(typeof generated.name, 'string');
  assert.deepEqual(await okJson(api, ['snapshot', 'list', 'v1']), await apiGet(api, '/v1/volumes/v1/snapshots'));
  assert.deepEqual((await okJson(api, ['snapshot', 'list', 'v1'])).map((s: { name: string }) => s.name), ['before', generated.name]);
  assert.match(await ok(api, ['snapshot', 'list', 'v1']), /^NAME\s+CREATED\s+PARENT\s+USED\s+IN CHAIN\nbefore\s+\S+\s+-\s+4 KiB\s+yes\n/);
  assert.equal(await ok(api, ['snapshot', 'delete', 'v1', generated.name]), `snapshot ${generated.name} of volume v1 deleted\n`);
  await fails(api, ['snapshot', 'revert', 'v1', 'before'], /maintenance/);
  await ok(api, ['volume', 'detach', 'v1']);
  await ok(api, ['volume', 'attach', 'v1', '--maintenance']);
  assert.equal(await ok(api, ['snapshot', 'revert', 'v1', 'before']), 'volume v1 reverted to snapshot before\n');
  await fails(api, ['snapshot', 'delete', 'v1', 'nope'], /^zebu: snapshot nope of volume v1 not found$/);

  const replicas = await okJson(api, ['replica', 'list', '--volume', 'v1']);
  assert.deepEqual(replicas, await apiGet(api, '/v1/replicas?volume=v1'));
  assert.equal(replicas.length, 2);
  assert.equal(typeof replicas[0].dataPath, 'string');
  assert.deepEqual(await okJson(api, ['replica', 'list']), await apiGet(api, '/v1/replicas'));
  assert.deepEqual(await okJson(api, ['replica', 'get', replicas[0].name]), await apiGet(api, `/v1/replicas/${replicas[0].name}`));
  assert.match(await ok(api, ['replica', 'list']), /^NAME\s+VOLUME\s+NODE\s+DISK\s+STATE\s+MODE\s+ADDRESS\s+PID\s+RESTARTS\s+REBUILD\s+LEAVING\nv1-r-0\s+v1\s+node-1\s+disk-0\s+running\s+RW\s+127\.0\.0\.1:20000/);
  assert.match(await ok(api, ['replica', 'move', 'v1-r-0', '--disk', 'disk-2']), /^replica v1-r-0 moves from disk disk-0 to disk disk-2: a new replica is rebuilt while it serves, then it is removed/);
  assert.equal((await okJson(api, ['replica', 'move', 'v1-r-0', '--disk', 'disk-2'])).leaving.diskId, 'disk-2');
  await fails(api, ['replica', 'move', 'v1-r-0', '--disk', 'nope'], /^zebu: disk nope not found$/);
  await fails(api, ['replica', 'move', 'v1-r-0', '--disk', 'disk-2', '--node', 'node-1'], /give --disk or --node, not both/);
  await fails(api, ['replica', 'move', 'nope'], /^zebu: replica nope not found$/);
  assert.match(await ok(api, ['replica', 'get', 'v1-r-1']), /^path:\s+\/data\/disks\/disk-1\/replicas\/v1-r-1$/m);
  await fails(api, ['replica', 'get', 'nope'], /^zebu: replica nope not found$/);
  await fails(api, ['replica', 'list', '--volume', 'nope'], /^zebu: volume nope not found$/);

  assert.deepEqual(await okJson(api, ['node', 'list']), await apiGet(api, '/v1/nodes'));
  assert.match(await ok(api, ['node', 'list']), /^NAME\s+ADDRESS\s+READY\s+LEADER\s+SCHEDULING\s+REPLICAS\s+EVICTION\s+NBD\s+DISKS\s+TAGS\s+HEARTBEAT\nnode-1\s+127\.0\.0\.1\s+yes\s+yes\s+on\s+0\s+-\s+127\.0\.0\.1:10809\s+disk-0,disk-1,disk-2\s+-\s/);
  assert.deepEqual(await okJson(api, ['disk', 'list']), await apiGet(api, '/v1/disks'));
  assert.match(await ok(api, ['disk', 'list']), /^disk-0\s+node-1\s+yes\s+on\s+0\s+-\s+100 GiB\s+90 GiB\s+0 B\s+0 B\s+-\s+\/data\/disks\/disk-0$/m);
  // Eviction: on, shown as done once the disk holds nothing, and off again.
  assert.equal((await ok(api, ['disk', 'update', 'disk-2', '--evict'])).trim(), 'disk disk-2: scheduling on, reserved 0 B, tags -, being evicted (0 replica(s) left)');
  assert.match(await ok(api, ['disk', 'list']), /^disk-2\s+node-1\s+yes\s+on\s+0\s+done \(empty\)\s/m);
  assert.equal((await okJson(api, ['disk', 'update', 'disk-2', '--no-evict'])).evict, false);
  assert.equal((await okJson(api, ['node', 'update', 'node-1', '--evict'])).evict, true);
  assert.equal((await ok(api, ['node', 'update', 'node-1', '--no-evict'])).trim(), 'node node-1: scheduling on, tags -');
  // Scheduling switches and reserved space.
  assert.equal((await ok(api, ['node', 'update', 'node-1', '--scheduling', 'off'])).trim(), 'node node-1: scheduling off, tags -');
  assert.equal((await apiGet(api, '/v1/nodes/node-1')).allowScheduling, false);
  assert.equal((await okJson(api, ['node', 'update', 'node-1', '--scheduling', 'on'])).allowScheduling, true);
  assert.equal((await ok(api, ['disk', 'update', 'disk-1', '--scheduling', 'off', '--reserved', '10GiB'])).trim(), 'disk disk-1: scheduling off, reserved 10 GiB, tags -');
  // Tags: replaced by --tag (repeated), sorted and without repeats; --clear-tags removes them.
  assert.equal((await ok(api, ['node', 'update', 'node-1', '--tag', 'ssd', '--tag', 'rack-a', '--tag', 'ssd'])).trim(), 'node node-1: scheduling on, tags rack-a,ssd');
  assert.deepEqual((await apiGet(api, '/v1/nodes/node-1')).tags, ['rack-a', 'ssd']);
  assert.deepEqual((await okJson(api, ['disk', 'update', 'disk-0', '--tag', 'nvme'])).tags, ['nvme']);
  assert.match(await ok(api, ['disk', 'list']), /^disk-0\s.*\snvme\s+\/data\/disks\/disk-0$/m);
  await fails(api, ['disk', 'update', 'disk-0', '--tag', 'bad tag'], /tags\.0 must be a tag/);
  await fails(api, ['node', 'update', 'node-1', '--tag', 'x', '--clear-tags'], /--clear-tags and --tag do not go together/);
  assert.deepEqual((await okJson(api, ['node', 'update', 'node-1', '--clear-tags'])).tags, []);
  assert.deepEqual((await okJson(api, ['disk', 'update', 'disk-0', '--clear-tags'])).tags, []);
  const disk1 = await apiGet(api, '/v1/disks/disk-1');
  assert.equal(disk1.allowScheduling, false);
  assert.equal(disk1.storageReservedBytes, 10 * 1024 ** 3);
  await fails(api, ['disk', 'update', 'disk-1', '--scheduling', 'maybe'], /--scheduling must be on or off/);
  await fails(api, ['disk', 'update', 'disk-1'], /say what to change/);
  await fails(api, ['disk', 'update', 'disk-1', '--reserved', '1TiB'], /exceeds the disk's size/);
  await fails(api, ['node', 'update', 'nope', '--scheduling', 'on'], /node nope not found/);

  assert.deepEqual(await okJson(api, ['setting', 'list']), await apiGet(api, '/v1/settings'));
  assert.match(await ok(api, ['setting', 'list']), /^default-replica-count\s+3\s+3\s+int\s+Replicas/m);
  assert.deepEqual(await okJson(api, ['setting', 'get', 'default-replica-count']), await apiGet(api, '/v1/settings/default-replica-count'));
  assert.match(await ok(api, ['setting', 'get', 'default-replica-count']), /^value:\s+3$/m);
  assert.equal(await ok(api, ['setting', 'set', 'default-replica-count', '2']), 'default-replica-count = 2\n');
  assert.equal((await okJson(api, ['setting', 'get', 'default-replica-count'])).value, '2');
  await fails(api, ['setting', 'set', 'default-replica-count', '0'], /between 1 and 20/);
  await fails(api, ['setting', 'set', 'no-such-setting', '1'], /not found/);

  const events = await okJson(api, ['events', '--volume', 'v1']);
  assert.deepEqual(events, await apiGet(api, '/v1/events?volume=v1'));
  assert.ok(events.map((e: { reason: string }) => e.reason).includes('SnapshotCreated'));
  assert.equal((await okJson(api, ['events', '--limit', '2'])).length, 2);
  assert.match(await ok(api, ['events', '--limit', '1']), /^TIME\s+TYPE\s+REASON\s+OBJECT\s+MESSAGE\n\S+\s+Normal\s+\w+\s+Volume\/v1\s+\S/);
  await fails(api, ['events', '--limit', 'lots'], /--limit must be a whole number/);
  await fails(api, ['events', '--limit', '0'], /limit must be between 1 and 1000/);
});

test('errors: one line on stderr, exit 1, the server\'s message; usage errors too', async (t) => {
  const api = await startApi(t);
  await ok(api, ['volume', 'create', 'ok', '--size', '64MiB', '--replicas', '2']);
  await fails(api, ['volume', 'get', 'nope'], /^zebu: volume nope not found$/);
  await fails(api, ['volume', 'attach', 'nope'], /not found/);
  await fails(api, ['volume', 'create', 'v2', '--size', '1000000'], /multiple of 4096/);
  await fails(api, ['volume', 'create', 'v2', '--size', '0'], /sizeBytes/);
  await fails(api, ['volume', 'create', 'v2', '--size', '17TiB'], /sizeBytes must be .* between 4096 and 17592186044416/);
  await fails(api, ['volume', 'create', 'v2', '--size', 'abc'], /^zebu: not a size: "abc"/);
  await fails(api, ['volume', 'create', 'v2', '--size', '1GiB', '--replicas', '0'], /numberOfReplicas/);
  await fails(api, ['volume', 'create', 'v2', '--size', '1GiB', '--replicas', 'two'], /--replicas must be a whole number/);
  await fails(api, ['volume', 'create', 'v2', '--size', '1GiB', '--replicas', '4'], /only 3 of 4 replicas can be placed/);
  await fails(api, ['volume', 'create', 'ok', '--size', '1GiB'], /^zebu: volume ok already exists$/);
  await fails(api, ['volume', 'create', 'Bad_Name', '--size', '1GiB'], /name/);
  await fails(api, ['volume', 'expand', 'ok', '--size', '32MiB'], /shrink/);
  await fails(api, ['volume', 'delete', 'nope'], /not found/);
  await fails(api, ['volume', 'wait', 'ok'], /--state/);
  await fails(api, ['volume', 'wait', 'ok', '--state', 'happy'], /--state must be one of/);
  await fails(api, ['volume', 'attach', 'ok', '--timeout', 'soon'], /--timeout must be a number of seconds/);
  // Usage errors in the same one-line form.
  await fails(api, ['volume', 'create', 'v2'], /^zebu: --size is required \(or --from-backup BACKUP, or --backing-image IMAGE\)$/);
  await fails(api, ['volume', 'create', 'v2', '--size', '1GiB', '--bogus'], /unknown option '--bogus'/);
  await fails(api, ['volume', 'get'], /missing required argument 'NAME'/);
  // Nothing changed.
  assert.deepEqual([...api.service.volumes.keys()], ['ok']);
  assert.equal(api.service.volumes.get('ok')!.view.sizeBytes, 64 * MiB);
});

test('waiting: a timeout says what was waited for; a progress bar only on a terminal', async (t) => {
  const api = await startApi(t);
  await ok(api, ['volume', 'create', 'slow', '--size', '64MiB', '--replicas', '1']);
  api.service.readsPerTransition = 1_000_000;
  const attach = await fails(api, ['volume', 'attach', 'slow', '--timeout', '1'], /^zebu: timed out after 1 s waiting for volume slow to be attached \(it is attaching, unknown\)$/);
  assert.ok(attach);
  await fails(api, ['volume', 'wait', 'slow', '--state', 'attached', '--timeout', '0.5'], /timed out after 0.5 s waiting for volume slow to be attached/);
  await fails(api, ['volume', 'wait', 'slow', '--robustness', 'healthy', '--timeout', '1'], /waiting for volume slow to be healthy/);

  // On a terminal (script(1) gives stderr a pty), stdout still carries the URI alone.
  api.service.readsPerTransition = 8;
  await ok(api, ['volume', 'create', 'tty', '--size', '64MiB', '--replicas', '1']);
  const dir = tempDir(t);
  const outFile = path.join(dir, 'stdout');
  const command = `${process.execPath} ${ZEBU_MAIN} volume attach tty > ${outFile}`;
  // Asynchronously: the API server runs in this process.
  const terminal = await new Promise<{ status: number | null; output: string }>((resolve, reject) => {
    const child = spawn('script', ['-qec', command, '/dev/null'], { env: cleanEnv({ ZEBU_API: api.url, ZEBU_TOKEN: TOKEN, TERM: 'xterm' }), stdio: ['ignore', 'pipe', 'pipe'] });
    let output = '';
    child.stdout.on('data', (d: Buffer) => (output += d.toString()));
    child.stderr.on('data', (d: Buffer) => (output += d.toString()));
    const timer = setTimeout(() => child.kill('SIGKILL'), 120_000);
    child.once('error', reject);
    child.once('close', (status) => {
      clearTimeout(timer);
      resolve({ status, output });
    });
  });
  assert.equal(terminal.status, 0, terminal.output);
  assert.equal(fs.readFileSync(outFile, 'utf8'), 'nbd://127.0.0.1:10809/tty\n');
  assert.match(terminal.output, /waiting for volume tty to be attached/, 'the bar went to the terminal');
});

test('API and token resolution: --api/--token override the environment, ./zebu-data/token, no token, unreachable API', async (t) => {
  const api = await startApi(t);
  const dir = tempDir(t);
  // No token anywhere: the message says how to give one.
  await fails(api, ['volume', 'list'], /^zebu: no API token: pass --token TOKEN or set ZEBU_TOKEN/, { cwd: dir, token: null });
  // Wrong token: the server's refusal.
  await fails(api, ['volume', 'list'], /invalid API token/, { token: 'wrong' });
  // ./zebu-data/token in the working directory.
  fs.mkdirSync(path.join(dir, 'zebu-data'));
  fs.writeFileSync(path.join(dir, 'zebu-data', 'token'), `${TOKEN}\n`, { mode: 0o600 });
  assert.equal(await ok(api, ['volume', 'list', '--json'], { cwd: dir, token: null }), '[]\n');
  // --token wins over ZEBU_TOKEN; --token-file works; --api wins over ZEBU_API and takes HOST:PORT.
  assert.equal(await ok(api, ['volume', 'list', '--json', '--token', TOKEN], { token: 'wrong' }), '[]\n');
  assert.equal(await ok(api, ['volume', 'list', '--json', '--token-file', path.join(dir, 'zebu-data', 'token')], { token: null, cwd: dir }), '[]\n');
  const port = await closedPort();
  const hostPort = api.url.replace('http://', '');
  assert.equal(await ok({ url: `http://127.0.0.1:${port}` }, ['volume', 'list', '--json', '--api', hostPort]), '[]\n');
  await fails(api, ['volume', 'list', '--token-file', path.join(dir, 'missing')], /cannot read the API token file .*missing/);

  // Unreachable: which URL, and what to do.
  const down = `http://127.0.0.1:${port}`;
  const line = await fails({ url: down }, ['volume', 'list'], /cannot reach the Zebu API at http:\/\/127\.0\.0\.1:\d+ /);
  assert.match(line, /ECONNREFUSED/);
  assert.match(line, /zebu up/);
  await fails({ url: 'ftp://x' }, ['volume', 'list'], /must be http/);
  // The default address when nothing is set (nothing listens there in tests, or something that
  // is not us: either way the URL is named).
  const r = await zebu(null, ['node', 'list'], { token: 'x' });
  if (r.status !== 0) assert.match(r.stderr, /127\.0\.0\.1:9500/);
});

test('the data-path commands are still there', async () => {
  for (const args of [['volume', 'serve', '--help'], ['replica', 'serve', '--help'], ['engine', 'serve', '--help']]) {
    const r = spawnSync(process.execPath, [ZEBU_MAIN, ...args], { timeout: 60_000 });
    assert.equal(r.status, 0, args.join(' '));
    assert.match(r.stdout.toString(), /--secret-file/);
  }
  const help = spawnSync(process.execPath, [ZEBU_MAIN, 'volume', '--help'], { timeout: 60_000 }).stdout.toString();
  for (const sub of ['serve', 'create', 'list', 'get', 'attach', 'detach', 'delete', 'expand', 'wait']) assert.match(help, new RegExp(`^  ${sub} `, 'm'), sub);
});

test('volume serve --max-active-regions: checked as the engine checks it, and given to the engine', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'zebu-test-'));
  let served: { child: ChildProcess; exited: Promise<unknown> } | null = null;
  t.after(async () => {
    // SIGTERM: the supervisor stops its frontend and engine before it exits; then the directory goes.
    if (served !== null) {
      if (served.child.exitCode === null && served.child.signalCode === null) served.child.kill('SIGTERM');
      await served.exited;
    }
    fs.rmSync(dir, { recursive: true, force: true });
  });
  const secret = 'zebu-test-secret-0123456789abcdef';
  const secretFile = path.join(dir, 'secret');
  fs.writeFileSync(secretFile, secret + '\n', { mode: 0o600 });
  const args = (replica: string, max: string): string[] => [
    ZEBU_MAIN, 'volume', 'serve', '--name', 'mv', '--size', '64MiB', '--replica', replica, '--nbd-socket', path.join(dir, 'nbd.sock'),
    '--secret-file', secretFile, '--epoch', '1', '--run-dir', path.join(dir, 'run'), '--max-active-regions', max,
  ];
  for (const [max, message] of [['0', /^zebu: --max-active-regions must be at least 1, got "0" \(ZEBU_ERR_EINVAL\)$/], ['lots', /^zebu: --max-active-regions must be a whole number, got "lots" \(ZEBU_ERR_EINVAL\)$/]] as const) {
    const r = spawnSync(process.execPath, args('127.0.0.1:1', max), { timeout: 60_000 });
    assert.equal(r.status, 1, max);
    assert.match(r.stderr.toString().trim(), message);
  }
  assert.match(spawnSync(process.execPath, [ZEBU_MAIN, 'volume', 'serve', '--help'], { timeout: 60_000 }).stdout.toString(), /--max-active-regions <N>/);

  const replica = await startTestReplica(t, { sizeBytes: 64 * MiB, secret: Buffer.from(secret) });
  const child = spawn(process.execPath, args(`127.0.0.1:${replica.port}`, '7'), { stdio: ['ignore', 'pipe', 'pipe'] });
  const start = watchChildStart(child, 'volume serve', 30_000);
  served = { child, exited: start.exited };
  const ready = await start.ready;
  const info = (await controlRequest(ready.controlSocket as string, 'GET', '/v1/info')) as { maxActiveRegions: number; activeRegions: number };
  assert.equal(info.maxActiveRegions, 7);
  assert.equal(info.activeRegions, 0);
});

test('volume verify (table, --json, exit 1 when regions differ) and volume salvage', async (t) => {
  const api = await startApi(t);
  await ok(api, ['volume', 'create', 'v1', '--size', '64MiB', '--replicas', '2']);
  await fails(api, ['volume', 'verify', 'v1'], /^zebu: verify needs volume v1 attached \(it is detached\)$/);
  await ok(api, ['volume', 'attach', 'v1']);
  const clean = await ok(api, ['volume', 'verify', 'v1']);
  assert.match(clean, /^REGIONS\s+REPLICAS\s+DIFFERING\s+REPAIRED\s+DURATION\n16\s+v1-r-0,v1-r-1\s+0\s+0\s+12 ms\n$/);
  api.service.setDiffering('v1', [2]);
  const differ = await zebu(api, ['volume', 'verify', 'v1']);
  assert.equal(differ.status, 1);
  assert.match(differ.stdout, /^16\s+v1-r-0,v1-r-1\s+1\s+0\s+12 ms$/m);
  assert.match(differ.stdout, /^REGION\s+OFFSET\s+LENGTH\s+V1-R-0\s+V1-R-1\n2\s+8388608\s+4 MiB\s+a{12}\s+b{12}$/m);
  assert.equal(differ.stderr, 'zebu: 1 region(s) of volume v1 differ between replicas (zebu volume verify --repair copies them from the source replica)\n');
  const json = await zebu(api, ['volume', 'verify', 'v1', '--json']);
  assert.equal(json.status, 1);
  assert.deepEqual(JSON.parse(json.stdout).differing.map((d: { region: number }) => d.region), [2]);
  const repaired = JSON.parse(await ok(api, ['volume', 'verify', 'v1', '--repair', '--json']));
  assert.equal(repaired.repaired, 1);
  assert.match(await ok(api, ['volume', 'get', 'v1']), /^last verify:\s+\S+, 16 region\(s\) of 2 replica\(s\), 1 differ, 1 repaired, 12 ms$/m);

  await fails(api, ['volume', 'salvage', 'v1'], /^zebu: volume v1 is not faulted/);
  api.service.fault('v1');
  await fails(api, ['volume', 'salvage', 'v1', '--replica', 'nope'], /not replicas of volume v1: nope/);
  const started = await ok(api, ['volume', 'salvage', 'v1', '--replica', 'v1-r-0', '--replica', 'v1-r-1']);
  assert.match(started, /^volume v1: salvage started from v1-r-0, v1-r-1 \(attaching\)/);
  assert.equal(api.service.calls.get('salvageVolume'), 3);
  const help = spawnSync(process.execPath, [ZEBU_MAIN, 'volume', '--help'], { timeout: 60_000 }).stdout.toString();
  for (const sub of ['salvage', 'verify']) assert.match(help, new RegExp(`^  ${sub} `, 'm'), sub);
});
