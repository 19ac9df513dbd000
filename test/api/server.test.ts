/**
 * The REST API over an in-memory ManagerService (fake-service.ts): tokens, validation errors that
 * name the field, status mapping, the volume lifecycle through HTTP, /metrics and the OpenAPI
 * document (which must list exactly the routes the server answers).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import type { FastifyInstance } from 'fastify';
import { buildApiServer } from '../../src/api/server.ts';
import { ErrorCode, ZebuError } from '../../src/errors.ts';
import { FakeManagerService } from './fake-service.ts';

const TOKEN = 'test-token-0123456789abcdef';
const GiB = 2 ** 30;

type Method = 'GET' | 'POST' | 'PUT' | 'PATCH' | 'DELETE' | 'HEAD';

interface Answer {
  status: number;
  body: any;
  text: string;
  contentType: string;
}

async function call(app: FastifyInstance, method: Method, url: string, options: { body?: unknown; raw?: string; token?: string | null; headers?: Record<string, string> } = {}): Promise<Answer> {
  const headers: Record<string, string> = { ...options.headers };
  const token = options.token === undefined ? TOKEN : options.token;
  if (token !== null) headers.authorization = `Bearer ${token}`;
  let payload: string | undefined;
  if (options.raw !== undefined) payload = options.raw;
  else if (options.body !== undefined) payload = JSON.stringify(options.body);
  if (payload !== undefined) headers['content-type'] ??= 'application/json';
  const r = await app.inject({ method, url, headers, payload });
  let body: unknown;
  try {
    body = JSON.parse(r.body);
  } catch {
    body = undefined;
  }
  return { status: r.statusCode, body, text: r.body, contentType: String(r.headers['content-type'] ?? '') };
}

async function server(t: { after: (fn: () => Promise<void>) => void }): Promise<{ app: FastifyInstance; service: FakeManagerService }> {
  const service = new FakeManagerService();
  const app = await buildApiServer({ service, token: TOKEN });
  t.after(() => app.close());
  return { app, service };
}

function assertError(answer: Answer, status: number, code: string, field?: string): void {
  assert.equal(answer.status, status, `status of ${answer.text}`);
  assert.equal(answer.body?.error?.code, code, answer.text);
  assert.equal(typeof answer.body.error.message, 'string');
  assert.ok(answer.body.error.message.length > 0);
  assert.equal(answer.body.error.field, field, `field of ${answer.text}`);
  assert.match(answer.contentType, /^application\/json/);
}

/** Polls GET /v1/volumes/NAME until `done`; the fake completes transitions after a few reads. */
async function pollVolume(app: FastifyInstance, name: string, done: (a: Answer) => boolean): Promise<Answer> {
  for (let i = 0; i < 50; i++) {
    const a = await call(app, 'GET', `/v1/volumes/${name}`);
    if (done(a)) return a;
  }
  throw new Error(`volume ${name} never reached the expected state`);
}

/** Every route the API must serve (the brief's list), as "METHOD path" in OpenAPI syntax. */
const ROUTES = [
  'GET /healthz', 'GET /metrics', 'GET /v1/openapi.json', 'GET /v1/access', 'GET /v1/stream/{kind}',
  'GET /v1/volumes', 'POST /v1/volumes', 'GET /v1/volumes/{name}', 'DELETE /v1/volumes/{name}', 'PATCH /v1/volumes/{name}',
  'POST /v1/volumes/{name}/activate',
  'POST /v1/volumes/{name}/attach', 'POST /v1/volumes/{name}/detach', 'POST /v1/volumes/{name}/expand',
  'POST /v1/volumes/{name}/salvage', 'POST /v1/volumes/{name}/verify',
  'GET /v1/volumes/{name}/snapshots', 'POST /v1/volumes/{name}/snapshots', 'DELETE /v1/volumes/{name}/snapshots/{snapshot}',
  'POST /v1/volumes/{name}/snapshots/{snapshot}/revert',
  'GET /v1/replicas', 'GET /v1/replicas/{name}', 'POST /v1/replicas/{name}/move',
  'GET /v1/nodes', 'GET /v1/nodes/{name}', 'PATCH /v1/nodes/{name}',
  'GET /v1/disks', 'GET /v1/disks/{name}', 'PATCH /v1/disks/{name}',
  'GET /v1/settings', 'GET /v1/settings/{name}', 'PUT /v1/settings/{name}',
  'GET /v1/events',
];

test('tokens: /healthz is open, everything else needs the right bearer token', async (t) => {
  const { app, service } = await server(t);
  const health = await call(app, 'GET', '/healthz', { token: null });
  assert.equal(health.status, 200);
  assert.deepEqual(health.body, { ok: true });

  for (const route of ROUTES.filter((r) => r !== 'GET /healthz')) {
    const [method, path] = route.split(' ');
    const url = path.replace('{name}', 'v1').replace('{snapshot}', 's1');
    assertError(await call(app, method as Method, url, { token: null }), 401, 'UNAUTHORIZED');
    assertError(await call(app, method as Method, url, { token: 'wrong' }), 401, 'UNAUTHORIZED');
  }
  const missing = await call(app, 'GET', '/v1/volumes', { token: null });
  assert.match(missing.body.error.message, /token/);
  assert.match((await call(app, 'GET', '/v1/volumes', { token: 'wrong' })).body.error.message, /invalid API token/);
  // Same length, one byte off; another scheme; the token alone.
  assertError(await call(app, 'GET', '/v1/volumes', { token: `${TOKEN.slice(0, -1)}x` }), 401, 'UNAUTHORIZED');
  assertError(await call(app, 'GET', '/v1/volumes', { token: null, headers: { authorization: `Basic ${TOKEN}` } }), 401, 'UNAUTHORIZED');
  assertError(await call(app, 'GET', '/v1/volumes', { token: null, headers: { authorization: TOKEN } }), 401, 'UNAUTHORIZED');
  // A rejected request never reaches the service: no volume was created, nothing was listed.
  assertError(await call(app, 'POST', '/v1/volumes', { token: 'wrong', body: { name: 'v1', sizeBytes: GiB } }), 401, 'UNAUTHORIZED');
  assert.equal(service.calls.size, 0);
  assert.equal(service.volumes.size, 0);

  const ok = await call(app, 'GET', '/v1/volumes');
  assert.equal(ok.status, 200);
  assert.deepEqual(ok.body, []);
  // The scheme is case-insensitive.
  assert.equal((await call(app, 'GET', '/v1/volumes', { token: null, headers: { authorization: `bearer ${TOKEN}` } })).status, 200);

  await assert.rejects(buildApiServer({ service, token: '' }), /token/);
});

test('a volume through HTTP: create, list, get, attach, snapshots, detach, expand, delete', async (t) => {
  const { app } = await server(t);
  const created = await call(app, 'POST', '/v1/volumes', { body: { name: 'v1', sizeBytes: GiB, numberOfReplicas: 2 } });
  assert.equal(created.status, 201);
  assert.equal(created.body.name, 'v1');
  assert.equal(created.body.sizeBytes, GiB);
  assert.equal(created.body.replicas.length, 2);
  assert.equal((await call(app, 'POST', '/v1/volumes', { body: { name: 'v2', sizeBytes: 4096 } })).body.numberOfReplicas, 3, 'default replica count');

  const list = await call(app, 'GET', '/v1/volumes');
  assert.deepEqual(list.body.map((v: { name: string }) => v.name), ['v1', 'v2']);
  const got = await call(app, 'GET', '/v1/volumes/v1');
  assert.equal(got.status, 200);
  assert.equal(got.body.state, 'detached');

  // Attach with no body at all, and with an empty one.
  const attaching = await call(app, 'POST', '/v1/volumes/v1/attach');
  assert.equal(attaching.status, 200);
  assert.equal(attaching.body.state, 'attaching');
  assert.equal((await call(app, 'POST', '/v1/volumes/v1/attach', { body: {} })).status, 200, 'attach is idempotent');
  const attached = await pollVolume(app, 'v1', (a) => a.body.state === 'attached');
  assert.equal(attached.body.endpoint, 'nbd://127.0.0.1:10809/v1');

  const snap = await call(app, 'POST', '/v1/volumes/v1/snapshots', { body: { name: 's1' } });
  assert.equal(snap.status, 201);
  assert.equal(snap.body.name, 's1');
  const generated = await call(app, 'POST', '/v1/volumes/v1/snapshots');
  assert.equal(generated.status, 201);
  assert.deepEqual((await call(app, 'GET', '/v1/volumes/v1/snapshots')).body.map((s: { name: string }) => s.name), ['s1', generated.body.name]);
  assertError(await call(app, 'POST', '/v1/volumes/v1/snapshots', { body: { name: 's1' } }), 409, 'EXISTS');
  const deleted = await call(app, 'DELETE', `/v1/volumes/v1/snapshots/${generated.body.name}`);
  assert.equal(deleted.status, 204);
  assert.equal(deleted.text, '');
  assertError(await call(app, 'DELETE', '/v1/volumes/v1/snapshots/nope'), 404, 'NOT_FOUND');
  assertError(await call(app, 'POST', '/v1/volumes/v1/snapshots/s1/revert'), 409, 'BUSY');
  assertError(await call(app, 'DELETE', '/v1/volumes/v1'), 409, 'BUSY');

  const replicas = await call(app, 'GET', '/v1/replicas?volume=v1');
  assert.equal(replicas.body.length, 2);
  assert.equal((await call(app, 'GET', `/v1/replicas/${replicas.body[0].name}`)).body.volumeName, 'v1');
  assert.equal((await call(app, 'GET', '/v1/replicas')).body.length, 5);
  assertError(await call(app, 'GET', '/v1/replicas?volume=nope'), 404, 'NOT_FOUND');

  assert.equal((await call(app, 'POST', '/v1/volumes/v1/detach')).status, 200);
  await pollVolume(app, 'v1', (a) => a.body.state === 'detached');
  // Maintenance attach, then revert works.
  await call(app, 'POST', '/v1/volumes/v1/attach', { body: { maintenance: true } });
  const maintenance = await pollVolume(app, 'v1', (a) => a.body.state === 'attached');
  assert.equal(maintenance.body.endpoint, null);
  assert.equal((await call(app, 'POST', '/v1/volumes/v1/snapshots/s1/revert')).status, 204);
  await call(app, 'POST', '/v1/volumes/v1/detach');
  await pollVolume(app, 'v1', (a) => a.body.state === 'detached');

  const expanded = await call(app, 'POST', '/v1/volumes/v1/expand', { body: { sizeBytes: 2 * GiB } });
  assert.equal(expanded.status, 200);
  assert.equal(expanded.body.sizeBytes, 2 * GiB);
  assertError(await call(app, 'POST', '/v1/volumes/v1/expand', { body: { sizeBytes: GiB } }), 400, 'EINVAL', 'sizeBytes');

  const deleting = await call(app, 'DELETE', '/v1/volumes/v1');
  assert.equal(deleting.status, 200);
  assert.equal(deleting.body.state, 'deleting');
  await pollVolume(app, 'v1', (a) => a.status === 404);
  assertError(await call(app, 'GET', '/v1/volumes/v1'), 404, 'NOT_FOUND');
  assert.deepEqual((await call(app, 'GET', '/v1/volumes')).body.map((v: { name: string }) => v.name), ['v2']);

  const events = await call(app, 'GET', '/v1/events?volume=v1&limit=3');
  assert.equal(events.status, 200);
  assert.equal(events.body.length, 3);
  assert.equal(events.body[0].reason, 'Deleted', 'newest first');
});

test('nodes, disks and settings', async (t) => {
  const { app } = await server(t);
  assert.deepEqual((await call(app, 'GET', '/v1/nodes')).body.map((n: { name: string }) => n.name), ['node-1']);
  assert.equal((await call(app, 'GET', '/v1/nodes/node-1')).body.ready, true);
  assertError(await call(app, 'GET', '/v1/nodes/node-9'), 404, 'NOT_FOUND');
  assert.equal((await call(app, 'PATCH', '/v1/nodes/node-1', { body: { allowScheduling: false } })).body.allowScheduling, false);
  assert.equal((await call(app, 'GET', '/v1/nodes/node-1')).body.allowScheduling, false);

  assert.equal((await call(app, 'GET', '/v1/disks')).body.length, 3);
  const disk = await call(app, 'PATCH', '/v1/disks/disk-1', { body: { storageReservedBytes: GiB, allowScheduling: false } });
  assert.equal(disk.status, 200);
  assert.equal(disk.body.storageReservedBytes, GiB);
  assert.equal((await call(app, 'GET', '/v1/disks/disk-1')).body.allowScheduling, false);
  assertError(await call(app, 'GET', '/v1/disks/disk-9'), 404, 'NOT_FOUND');

  assert.equal((await call(app, 'GET', '/v1/settings')).body.length, 2);
  const set = await call(app, 'PUT', '/v1/settings/default-replica-count', { body: { value: '2' } });
  assert.equal(set.status, 200);
  assert.equal(set.body.value, '2');
  assert.equal((await call(app, 'GET', '/v1/settings/default-replica-count')).body.value, '2');
  assertError(await call(app, 'GET', '/v1/settings/nope'), 404, 'NOT_FOUND');
});

test('bad input: 400 naming the field, from the schema and from the service; nothing changes', async (t) => {
  const { app, service } = await server(t);
  await call(app, 'POST', '/v1/volumes', { body: { name: 'ok', sizeBytes: GiB } });
  const cases: [Method, string, unknown, string | undefined, RegExp][] = [
    // POST /v1/volumes
    ['POST', '/v1/volumes', { name: 'v3', sizeBytes: 4095 }, 'sizeBytes', /multiple of 4096/],
    ['POST', '/v1/volumes', { name: 'v3', sizeBytes: 1_000_000 }, 'sizeBytes', /multiple of 4096/],
    ['POST', '/v1/volumes', { name: 'v3', sizeBytes: 0 }, 'sizeBytes', /between 4096 and/],
    ['POST', '/v1/volumes', { name: 'v3', sizeBytes: 17 * 2 ** 40 }, 'sizeBytes', /between 4096 and 17592186044416/],
    ['POST', '/v1/volumes', { name: 'v3', sizeBytes: '4096' }, 'sizeBytes', /whole number/],
    ['POST', '/v1/volumes', { name: 'v3', sizeBytes: 4096.5 }, 'sizeBytes', /whole number/],
    ['POST', '/v1/volumes', { name: 'v3' }, 'sizeBytes', /sizeBytes is required/],
    ['POST', '/v1/volumes', { sizeBytes: 4096 }, 'name', /name is required/],
    ['POST', '/v1/volumes', { name: 'Bad_Name', sizeBytes: 4096 }, 'name', /1-63 characters/],
    ['POST', '/v1/volumes', { name: 'x'.repeat(64), sizeBytes: 4096 }, 'name', /1-63 characters/],
    ['POST', '/v1/volumes', { name: 'v3', sizeBytes: 4096, numberOfReplicas: 0 }, 'numberOfReplicas', /between 1 and 20/],
    ['POST', '/v1/volumes', { name: 'v3', sizeBytes: 4096, numberOfReplicas: 21 }, 'numberOfReplicas', /between 1 and 20/],
    ['POST', '/v1/volumes', { name: 'v3', sizeBytes: 4096, numberOfReplicas: 4 }, 'numberOfReplicas', /only 3 of 4 replicas/], // the service
    ['POST', '/v1/volumes', { name: 'v3', sizeBytes: 4096, size: 1 }, 'size', /unknown field size/],
    ['POST', '/v1/volumes', { name: 'v3', sizeBytes: 4096, dataLocality: 'strict' }, 'dataLocality', /must be one of "disabled", "best-effort", got "strict"/],
    ['PATCH', '/v1/volumes/ok', {}, undefined, /^nothing to change: the request body names none of dataLocality, nodeSelector, diskSelector$/],
    ['PATCH', '/v1/volumes/ok', { nodeSelector: ['ssd', 'bad tag'] }, 'nodeSelector.1', /nodeSelector\.1 must be a tag: 1-63 characters/],
    ['PATCH', '/v1/nodes/node-1', { tags: 'ssd' }, 'tags', /tags must be an array/],
    ['PATCH', '/v1/disks/disk-0', { tags: ['-x'] }, 'tags.0', /tags\.0 must be a tag/],
    ['PATCH', '/v1/volumes/ok', { dataLocality: 'local' }, 'dataLocality', /^dataLocality must be one of "disabled", "best-effort", got "local"$/],
    ['PATCH', '/v1/volumes/ok', { dataLocality: 'best-effort', size: 3 }, 'size', /unknown field size/],
    ['POST', '/v1/volumes', [1, 2], undefined, /request body must be a JSON object/],
    ['POST', '/v1/volumes', 'v3', undefined, /request body must be a JSON object/],
    ['POST', '/v1/volumes', null, undefined, /request body must be a JSON object/],
    // attach, expand, snapshots
    ['POST', '/v1/volumes/ok/attach', { maintenance: 'yes' }, 'maintenance', /true or false/],
    ['POST', '/v1/volumes/ok/attach', { nodeId: '' }, 'nodeId', /characters/],
    ['POST', '/v1/volumes/ok/attach', { nodeId: 'node-9' }, 'nodeId', /node node-9 not found/], // the service
    ['POST', '/v1/volumes/ok/attach', { node: 'node-1' }, 'node', /unknown field/],
    ['POST', '/v1/volumes/ok/expand', {}, 'sizeBytes', /required/],
    ['POST', '/v1/volumes/ok/expand', { sizeBytes: GiB + 1 }, 'sizeBytes', /multiple of 4096/],
    ['POST', '/v1/volumes/ok/expand', { sizeBytes: GiB / 2 }, 'sizeBytes', /shrink/], // the service
    ['POST', '/v1/volumes/ok/snapshots', { name: 'bad name' }, 'name', /characters/],
    ['POST', '/v1/volumes/ok/snapshots', { name: 7 }, 'name', /string/],
    // nodes, disks, settings
    ['PATCH', '/v1/nodes/node-1', { allowScheduling: 'false' }, 'allowScheduling', /true or false/],
    ['PATCH', '/v1/nodes/node-1', { ready: true }, 'ready', /unknown field ready/],
    ['PATCH', '/v1/disks/disk-0', { storageReservedBytes: -1 }, 'storageReservedBytes', />= 0|between 0/],
    ['PATCH', '/v1/disks/disk-0', { storageReservedBytes: 1e15 }, 'storageReservedBytes', /exceeds/], // the service
    ['PUT', '/v1/settings/default-replica-count', {}, 'value', /value is required/],
    ['PUT', '/v1/settings/default-replica-count', { value: 3 }, 'value', /string/],
    ['PUT', '/v1/settings/default-replica-count', { value: '0' }, 'value', /between 1 and 20/], // the service
    // path and query
    ['GET', '/v1/volumes/Bad_Name', undefined, 'name', /1-63 characters/],
    ['POST', '/v1/volumes/ok/snapshots/..%2Fx/revert', undefined, 'snapshot', /characters/],
    ['DELETE', '/v1/volumes/ok/snapshots/bad%20name', undefined, 'snapshot', /characters/],
    ['GET', '/v1/events?limit=abc', undefined, 'limit', /whole number/],
    ['GET', '/v1/events?limit=0', undefined, 'limit', /between 1 and 1000/], // the service
    ['GET', '/v1/events?limit=5000', undefined, 'limit', /between 1 and 1000/], // the service
    ['GET', '/v1/events?color=red', undefined, 'color', /unknown field color in the query string/],
    ['GET', '/v1/replicas?volume=Bad_Name', undefined, 'volume', /1-63 characters/],
  ];
  for (const [method, url, body, field, pattern] of cases) {
    const options = body === undefined ? {} : body === null ? { raw: 'null' } : { body };
    const a = await call(app, method, url, options);
    const label = `${method} ${url} ${JSON.stringify(body)}: ${a.text}`;
    assertError(a, 400, 'EINVAL', field);
    assert.match(a.body.error.message, pattern, label);
  }
  // Only the service's own refusals reached it; nothing changed.
  assert.deepEqual((await call(app, 'GET', '/v1/volumes')).body.map((v: { name: string; sizeBytes: number }) => [v.name, v.sizeBytes]), [['ok', GiB]]);
  assert.equal(service.disks[0].storageReservedBytes, 0);
  assert.equal(service.nodes[0].allowScheduling, true);
  assert.equal(service.settings[0].value, '3');
  assert.equal(service.calls.get('createVolume'), 2, 'the first create and the one only the service could refuse');
});

test('status mapping, malformed requests, unknown routes; the server survives all of them', async (t) => {
  const { app, service } = await server(t);
  await call(app, 'POST', '/v1/volumes', { body: { name: 'ok', sizeBytes: GiB } });
  assertError(await call(app, 'POST', '/v1/volumes', { body: { name: 'ok', sizeBytes: GiB } }), 409, 'EXISTS');
  assert.match((await call(app, 'POST', '/v1/volumes', { body: { name: 'ok', sizeBytes: GiB } })).body.error.message, /already exists/);
  assertError(await call(app, 'GET', '/v1/volumes/nope'), 404, 'NOT_FOUND');
  assert.match((await call(app, 'GET', '/v1/volumes/nope')).body.error.message, /volume nope not found/);
  assertError(await call(app, 'POST', '/v1/volumes/ok/snapshots', { body: {} }), 409, 'BUSY');

  // Whatever the service throws maps onto a status.
  const mapping: [ZebuError | Error, number, string][] = [
    [new ZebuError(ErrorCode.CONFLICT, 'changed meanwhile'), 409, 'CONFLICT'],
    [new ZebuError(ErrorCode.BUSY, 'busy'), 409, 'BUSY'],
    [new ZebuError(ErrorCode.ENOSPC, 'disk full'), 507, 'ENOSPC'],
    [new ZebuError(ErrorCode.UNAUTHORIZED, 'no'), 401, 'UNAUTHORIZED'],
    [new ZebuError(ErrorCode.TIMEOUT, 'engine did not answer'), 503, 'TIMEOUT'],
    [new Error('kaboom'), 500, 'EIO'],
    [new TypeError("Cannot read properties of undefined (reading 'x')"), 500, 'EIO'],
  ];
  for (const [err, status, code] of mapping) {
    service.explode = err;
    const a = await call(app, 'GET', '/v1/nodes');
    assertError(a, status, code);
    assert.match(a.body.error.message, new RegExp(err.message.replace(/[()'.]/g, '.')));
  }
  service.explode = null;
  assert.equal((await call(app, 'GET', '/v1/nodes')).status, 200, 'still serving');

  assertError(await call(app, 'POST', '/v1/volumes', { raw: '{"name": "v2", ' }), 400, 'EINVAL');
  assertError(await call(app, 'POST', '/v1/volumes', { raw: '' }), 400, 'EINVAL');
  const tooBig = await call(app, 'POST', '/v1/volumes', { body: { name: 'v2', sizeBytes: 4096, pad: 'x'.repeat(100_000) } });
  assertError(tooBig, 413, 'EINVAL');
  assertError(await call(app, 'POST', '/v1/volumes', { raw: '<xml/>', headers: { 'content-type': 'application/xml' } }), 415, 'EINVAL');
  // Prototype-poisoning attempts are refused, not merged.
  const proto = await call(app, 'POST', '/v1/volumes', { raw: '{"name":"v3","sizeBytes":4096,"__proto__":{"x":1}}' });
  assert.equal(proto.status, 400, proto.text);
  assert.equal(({} as Record<string, unknown>).x, undefined);

  const unknown = await call(app, 'GET', '/v1/nope');
  assertError(unknown, 404, 'NOT_FOUND');
  assert.match(unknown.body.error.message, /GET \/v1\/nope/);
  assertError(await call(app, 'PUT', '/v1/volumes'), 404, 'NOT_FOUND');
  assertError(await call(app, 'GET', '/v2/volumes'), 404, 'NOT_FOUND');
  assertError(await call(app, 'GET', '/v1/nope', { token: null }), 401, 'UNAUTHORIZED');
  assert.equal((await call(app, 'GET', '/healthz', { token: null })).status, 200, 'still serving');
});

test('/metrics: Prometheus text with volume state, robustness, replica modes and I/O counters', async (t) => {
  const { app, service } = await server(t);
  await call(app, 'POST', '/v1/volumes', { body: { name: 'v1', sizeBytes: GiB, numberOfReplicas: 2 } });
  await call(app, 'POST', '/v1/volumes', { body: { name: 'v2', sizeBytes: 4096, numberOfReplicas: 1 } });
  await call(app, 'POST', '/v1/volumes/v1/attach');
  await pollVolume(app, 'v1', (a) => a.body.state === 'attached');
  service.setIo('v1', { reads: 42, writes: 7, readBytes: 42 * 4096, writeBytes: 7 * 65536, readLatencySecondsTotal: 0.125, writeLatencySecondsTotal: 0.5, errors: 1 });

  const m = await call(app, 'GET', '/metrics');
  assert.equal(m.status, 200);
  assert.match(m.contentType, /^text\/plain; version=0\.0\.4/);
  const expected = [
    'zebu_volumes 2',
    'zebu_volume_state{volume="v1",state="attached"} 1',
    'zebu_volume_state{volume="v1",state="detached"} 0',
    'zebu_volume_state{volume="v2",state="detached"} 1',
    'zebu_volume_robustness{volume="v1",robustness="healthy"} 1',
    'zebu_volume_robustness{volume="v1",robustness="degraded"} 0',
    'zebu_volume_robustness{volume="v2",robustness="unknown"} 1',
    `zebu_volume_size_bytes{volume="v1"} ${GiB}`,
    'zebu_replica_mode{volume="v1",replica="v1-r-0",mode="RW"} 1',
    'zebu_replica_mode{volume="v1",replica="v1-r-1",mode="ERR"} 0',
    'zebu_replica_mode{volume="v2",replica="v2-r-0",mode="RW"} 0',
    'zebu_volume_reads_total{volume="v1"} 42',
    'zebu_volume_writes_total{volume="v1"} 7',
    `zebu_volume_read_bytes_total{volume="v1"} ${42 * 4096}`,
    `zebu_volume_write_bytes_total{volume="v1"} ${7 * 65536}`,
    'zebu_volume_read_latency_seconds_total{volume="v1"} 0.125',
    'zebu_volume_write_latency_seconds_total{volume="v1"} 0.5',
    'zebu_volume_io_errors_total{volume="v1"} 1',
    '# TYPE zebu_volume_reads_total counter',
    '# TYPE zebu_volume_state gauge',
  ];
  const lines = new Set(m.text.split('\n'));
  for (const line of expected) assert.ok(lines.has(line), `missing ${line} in:\n${m.text}`);
  // A detached volume has no I/O series.
  assert.doesNotMatch(m.text, /zebu_volume_reads_total\{volume="v2"\}/);

  // Collected at every scrape: new figures show, a deleted volume's series are gone.
  service.setIo('v1', { reads: 50 });
  await call(app, 'DELETE', '/v1/volumes/v2');
  await pollVolume(app, 'v2', (a) => a.status === 404);
  const again = await call(app, 'GET', '/metrics');
  assert.ok(again.text.split('\n').includes('zebu_volume_reads_total{volume="v1"} 50'), again.text);
  assert.doesNotMatch(again.text, /volume="v2"/);
  assert.ok(again.text.split('\n').includes('zebu_volumes 1'));

  // Each server has its own registry.
  const other = await buildApiServer({ service: new FakeManagerService(), token: TOKEN });
  t.after(() => other.close());
  const empty = await call(other, 'GET', '/metrics');
  assert.ok(empty.text.split('\n').includes('zebu_volumes 0'), empty.text);
  assert.doesNotMatch(empty.text, /volume="v1"/);
  // A failing service gives an error answer, and the next scrape works.
  service.explode = new Error('store down');
  assertError(await call(app, 'GET', '/metrics'), 500, 'EIO');
  service.explode = null;
  assert.equal((await call(app, 'GET', '/metrics')).status, 200);
});

test('/metrics: crash consistency: write-intent log, fencing, last recovery and last verify per volume', async (t) => {
  const { app, service } = await server(t);
  await call(app, 'POST', '/v1/volumes', { body: { name: 'v1', sizeBytes: GiB, numberOfReplicas: 2 } });
  await call(app, 'POST', '/v1/volumes', { body: { name: 'v2', sizeBytes: GiB, numberOfReplicas: 1 } });
  await call(app, 'POST', '/v1/volumes/v1/attach');
  await pollVolume(app, 'v1', (a) => a.body.state === 'attached');
  // Before any recovery or verify, and while detached (v2): none of those series.
  const before = await call(app, 'GET', '/metrics');
  assert.doesNotMatch(before.text, /zebu_volume_last_(recovery|verify)_\w+\{/);
  assert.doesNotMatch(before.text, /zebu_volume_(active_regions|active_regions_max|superseded)\{volume="v2"\}/, 'a detached volume has no engine series');
  assert.ok(before.text.split('\n').includes('zebu_volume_superseded{volume="v1"} 0'), before.text);

  service.setEngine('v1', { activeRegions: 17, maxActiveRegions: 256 });
  service.setLastRecovery('v1', {
    at: '2024-01-01T00:00:00.000Z', clean: false, source: 'v1-r-0', checkedRegions: 5, regions: 3, bytes: 3 * 4 * 2 ** 20, durationMs: 1250, deltaReplicas: [], erredReplicas: [],
  });
  service.setDiffering('v1', [2, 5]);
  const report = await call(app, 'POST', '/v1/volumes/v1/verify', { body: {} });
  assert.equal(report.status, 200, report.text);
  const verifiedAt = Date.parse(report.body.at) / 1000;

  const m = await call(app, 'GET', '/metrics');
  const expected = [
    'zebu_volume_active_regions{volume="v1"} 17',
    'zebu_volume_active_regions_max{volume="v1"} 256',
    'zebu_volume_superseded{volume="v1"} 0',
    `zebu_volume_last_recovery_bytes{volume="v1"} ${3 * 4 * 2 ** 20}`,
    'zebu_volume_last_recovery_regions{volume="v1"} 3',
    'zebu_volume_last_recovery_duration_seconds{volume="v1"} 1.25',
    'zebu_volume_last_verify_differing_regions{volume="v1"} 2',
    `zebu_volume_last_verify_timestamp_seconds{volume="v1"} ${verifiedAt}`,
    '# TYPE zebu_volume_active_regions gauge',
    '# TYPE zebu_volume_superseded gauge',
    '# TYPE zebu_volume_last_verify_differing_regions gauge',
    '# HELP zebu_volume_last_recovery_duration_seconds Duration of the engine\'s last start-up recovery.',
  ];
  const lines = new Set(m.text.split('\n'));
  for (const line of expected) assert.ok(lines.has(line), `missing ${line} in:\n${m.text}`);
  assert.doesNotMatch(m.text, /zebu_volume_(active_regions|active_regions_max|superseded|last_recovery_\w+|last_verify_\w+)\{volume="v2"\}/);

  // Fenced by a newer epoch: 1. After a detach, the engine series go; recovery and verify stay.
  service.setEngine('v1', { superseded: true });
  assert.ok((await call(app, 'GET', '/metrics')).text.split('\n').includes('zebu_volume_superseded{volume="v1"} 1'));
  await call(app, 'POST', '/v1/volumes/v1/detach');
  await pollVolume(app, 'v1', (a) => a.body.state === 'detached');
  const detached = (await call(app, 'GET', '/metrics')).text;
  assert.doesNotMatch(detached, /zebu_volume_(active_regions|active_regions_max|superseded)\{/);
  assert.ok(detached.split('\n').includes('zebu_volume_last_recovery_regions{volume="v1"} 3'), detached);
  assert.ok(detached.split('\n').includes('zebu_volume_last_verify_differing_regions{volume="v1"} 2'), detached);
});

test('/v1/openapi.json: an OpenAPI 3.1 document of exactly the routes served, with resolvable schemas', async (t) => {
  const { app, service } = await server(t);
  const a = await call(app, 'GET', '/v1/openapi.json');
  assert.equal(a.status, 200);
  const doc = a.body;
  assert.equal(doc.openapi, '3.1.0');
  assert.equal(typeof doc.info.title, 'string');
  const listed = Object.entries(doc.paths as Record<string, Record<string, unknown>>).flatMap(([path, ops]) => Object.keys(ops).map((m) => `${m.toUpperCase()} ${path}`));
  assert.deepEqual([...listed].sort(), [...ROUTES].sort());

  // Every documented route is served (401 without a token proves it is routed, not 404).
  for (const route of ROUTES) {
    const [method, path] = route.split(' ');
    const url = path.replace('{name}', 'x').replace('{snapshot}', 'y');
    const r = await call(app, method as Method, url, { token: null });
    assert.equal(r.status, route === 'GET /healthz' ? 200 : 401, route);
    const op = doc.paths[path][method.toLowerCase()];
    assert.equal(typeof op.operationId, 'string');
    assert.deepEqual(op.security, route === 'GET /healthz' ? [] : undefined, route);
  }
  assert.deepEqual(doc.security, [{ bearer: [] }]);
  assert.equal(doc.components.securitySchemes.bearer.scheme, 'bearer');

  // The request schemas are the ones the server validates with.
  const create = doc.paths['/v1/volumes'].post;
  const sizeSchema = create.requestBody.content['application/json'].schema.properties.sizeBytes;
  assert.equal(sizeSchema.multipleOf, 4096);
  assert.equal(create.requestBody.required, true);
  assert.ok(create.responses['201']);
  assert.ok(create.responses['400']);
  assert.equal(doc.paths['/v1/volumes/{name}/attach'].post.requestBody.required, false);
  const params = doc.paths['/v1/volumes/{name}/snapshots/{snapshot}'].delete.parameters;
  assert.deepEqual(params.map((p: { name: string; in: string }) => `${p.in}:${p.name}`), ['path:name', 'path:snapshot']);
  const events = doc.paths['/v1/events'].get.parameters;
  assert.deepEqual(events.map((p: { name: string; in: string; required: boolean }) => `${p.in}:${p.name}:${p.required}`), ['query:volume:false', 'query:limit:false']);

  // Every $ref resolves.
  const refs: string[] = [];
  const walk = (node: unknown): void => {
    if (Array.isArray(node)) node.forEach(walk);
    else if (node !== null && typeof node === 'object') {
      for (const [k, v] of Object.entries(node)) {
        if (k === '$ref') refs.push(String(v));
        else walk(v);
      }
    }
  };
  walk(doc);
  assert.ok(refs.length > 10);
  for (const ref of refs) {
    const m = /^#\/components\/schemas\/(\w+)$/.exec(ref);
    assert.ok(m !== null && doc.components.schemas[m[1]] !== undefined, `unresolved ${ref}`);
  }

  // The view schemas list exactly the fields the views have (the fake is typed by types.ts).
  await call(app, 'POST', '/v1/volumes', { body: { name: 'v1', sizeBytes: GiB } });
  await call(app, 'POST', '/v1/volumes/v1/attach');
  await pollVolume(app, 'v1', (x) => x.body.state === 'attached');
  await call(app, 'POST', '/v1/volumes/v1/snapshots', { body: {} });
  const samples: [string, unknown][] = [
    ['Volume', (await call(app, 'GET', '/v1/volumes/v1')).body],
    ['VolumeReplicaSummary', (await call(app, 'GET', '/v1/volumes/v1')).body.replicas[0]],
    ['Snapshot', (await call(app, 'GET', '/v1/volumes/v1/snapshots')).body[0]],
    ['Verify', (await call(app, 'POST', '/v1/volumes/v1/verify')).body],
    ['VerifyDifference', (service.setDiffering('v1', [3]), (await call(app, 'POST', '/v1/volumes/v1/verify')).body.differing[0])],
    ['Replica', (await call(app, 'GET', '/v1/replicas')).body[0]],
    ['Node', (await call(app, 'GET', '/v1/nodes')).body[0]],
    ['Disk', (await call(app, 'GET', '/v1/disks')).body[0]],
    ['Setting', (await call(app, 'GET', '/v1/settings')).body[0]],
    ['Event', (await call(app, 'GET', '/v1/events')).body[0]],
    ['Error', (await call(app, 'GET', '/v1/volumes/nope')).body],
    ['Health', (await call(app, 'GET', '/healthz')).body],
  ];
  for (const [name, sample] of samples) {
    const schema = doc.components.schemas[name];
    assert.deepEqual(Object.keys(sample as object).sort(), Object.keys(schema.properties).sort(), name);
  }
  assert.ok(service.calls.get('getVolume')! > 0);
});

test('salvage and verify: validation, 404, 409 when not faulted / not attached, the reports', async (t) => {
  const { app, service } = await server(t);
  await call(app, 'POST', '/v1/volumes', { body: { name: 'v1', sizeBytes: GiB, numberOfReplicas: 3 } });
  // Validation first (400 naming the field), then existence (404), then state (409).
  const bad: [string, unknown, string, RegExp][] = [
    ['/v1/volumes/v1/salvage', { replicas: [] }, 'replicas', /replicas must/],
    ['/v1/volumes/v1/salvage', { replicas: 'v1-r-0' }, 'replicas', /must be an array/],
    ['/v1/volumes/v1/salvage', { replicas: [7] }, 'replicas.0', /must be a string/],
    ['/v1/volumes/v1/salvage', { replica: ['v1-r-0'] }, 'replica', /unknown field replica/],
    ['/v1/volumes/v1/verify', { repair: 'yes' }, 'repair', /true or false/],
    ['/v1/volumes/v1/verify', { fix: true }, 'fix', /unknown field fix/],
  ];
  for (const [url, body, field, pattern] of bad) {
    const a = await call(app, 'POST', url, { body });
    assertError(a, 400, 'EINVAL', field);
    assert.match(a.body.error.message, pattern, a.text);
  }
  assertError(await call(app, 'POST', '/v1/volumes/nope/salvage'), 404, 'NOT_FOUND');
  assertError(await call(app, 'POST', '/v1/volumes/nope/verify'), 404, 'NOT_FOUND');
  assertError(await call(app, 'POST', '/v1/volumes/v1/verify'), 409, 'BUSY');
  assertError(await call(app, 'POST', '/v1/volumes/v1/salvage'), 409, 'BUSY');
  await call(app, 'POST', '/v1/volumes/v1/attach');
  await pollVolume(app, 'v1', (a) => a.body.state === 'attached');
  assertError(await call(app, 'POST', '/v1/volumes/v1/salvage', { body: {} }), 409, 'BUSY', undefined);
  assert.match((await call(app, 'POST', '/v1/volumes/v1/salvage')).body.error.message, /not faulted/);

  // Verify: no difference, then differences without and with repair.
  const clean = await call(app, 'POST', '/v1/volumes/v1/verify');
  assert.equal(clean.status, 200);
  assert.deepEqual([clean.body.regions, clean.body.differing.length, clean.body.repaired, clean.body.repair], [256, 0, 0, false]);
  service.setDiffering('v1', [5, 9]);
  const found = await call(app, 'POST', '/v1/volumes/v1/verify', { body: { repair: false } });
  assert.deepEqual(found.body.differing.map((d: { region: number }) => d.region), [5, 9]);
  assert.equal(found.body.differing[0].offset, 5 * 4 * 2 ** 20);
  assert.deepEqual(Object.keys(found.body.differing[0].hashes).sort(), ['v1-r-0', 'v1-r-1', 'v1-r-2']);
  const repaired = await call(app, 'POST', '/v1/volumes/v1/verify', { body: { repair: true } });
  assert.equal(repaired.body.repaired, 2);
  assert.equal((await call(app, 'GET', '/v1/volumes/v1')).body.lastVerify.repaired, 2, 'the volume keeps its last verify');

  // Salvage of a faulted volume: unknown replica names are refused, then it starts.
  service.fault('v1');
  const unknown = await call(app, 'POST', '/v1/volumes/v1/salvage', { body: { replicas: ['v1-r-0', 'other-r-9'] } });
  assertError(unknown, 400, 'EINVAL', 'replicas');
  assert.match(unknown.body.error.message, /other-r-9/);
  const started = await call(app, 'POST', '/v1/volumes/v1/salvage', { body: { replicas: ['v1-r-0', 'v1-r-1'] } });
  assert.equal(started.status, 200);
  assert.equal(started.body.state, 'attaching');
  assert.equal(started.body.replicas.find((r: { name: string }) => r.name === 'v1-r-2').failedAt !== null, true);
  const back = await pollVolume(app, 'v1', (a) => a.body.state === 'attached');
  assert.equal(back.body.robustness, 'healthy');
  assert.equal(service.calls.get('salvageVolume'), 6, 'only what the schema lets through reaches the service: 404, three 409s, the unknown names, the salvage');
});

test('the engine link (OPEN / CLOSE / REOPENING and its counters) in GET /v1/volumes/NAME and /metrics', async (t) => {
  const { app, service } = await server(t);
  await call(app, 'POST', '/v1/volumes', { body: { name: 'v1', sizeBytes: GiB, numberOfReplicas: 2 } });
  await call(app, 'POST', '/v1/volumes/v1/attach');
  await pollVolume(app, 'v1', (a) => a.body.state === 'attached');
  assert.equal((await call(app, 'GET', '/v1/volumes/v1')).body.engineLink, null);
  assert.doesNotMatch((await call(app, 'GET', '/metrics')).text, /zebu_volume_engine_link_\w+\{/);
  const link = {
    state: 'CLOSE' as const, stateSince: '2024-01-01T00:00:05.000Z', reopens: 3, reissued: 41, hangs: 1, longestHoldMs: 2500, held: 7,
    lastClose: { at: '2024-01-01T00:00:05.000Z', kind: 'engine-hung' as const, cause: 'engine hung (no answer to a heartbeat in 10012 ms)', outstanding: 7 },
  };
  service.setEngineLink('v1', link);
  const got = await call(app, 'GET', '/v1/volumes/v1');
  assert.equal(got.status, 200, got.text);
  assert.deepEqual(got.body.engineLink, link);
  const m = await call(app, 'GET', '/metrics');
  const lines = new Set(m.text.split('\n'));
  for (const line of [
    'zebu_volume_engine_link_state{volume="v1",state="OPEN"} 0',
    'zebu_volume_engine_link_state{volume="v1",state="CLOSE"} 1',
    'zebu_volume_engine_link_state{volume="v1",state="REOPENING"} 0',
    'zebu_volume_engine_link_reopens_total{volume="v1"} 3',
    'zebu_volume_engine_link_reissued_requests_total{volume="v1"} 41',
    'zebu_volume_engine_link_hangs_total{volume="v1"} 1',
    'zebu_volume_engine_link_held_requests{volume="v1"} 7',
    'zebu_volume_engine_link_longest_hold_seconds{volume="v1"} 2.5',
  ]) assert.ok(lines.has(line), `missing ${line} in:\n${m.text}`);
});

test('replica move and eviction over the API: bad bodies get 400 with the field, unknown names 404; a good one answers the replica leaving', async (t) => {
  const { app } = await server(t);
  await call(app, 'POST', '/v1/volumes', { body: { name: 'mv', sizeBytes: GiB, numberOfReplicas: 2 } });
  const replica = (await call(app, 'GET', '/v1/replicas?volume=mv')).body[0].name as string;
  assertError(await call(app, 'POST', `/v1/replicas/${replica}/move`, { body: { diskId: 5 } }), 400, 'EINVAL', 'diskId');
  assertError(await call(app, 'POST', `/v1/replicas/${replica}/move`, { body: { disk: 'disk-1' } }), 400, 'EINVAL', 'disk');
  assertError(await call(app, 'POST', `/v1/replicas/${replica}/move`, { body: { diskId: 'nope' } }), 404, 'NOT_FOUND');
  assertError(await call(app, 'POST', '/v1/replicas/no-such/move', { body: {} }), 404, 'NOT_FOUND');
  const moved = await call(app, 'POST', `/v1/replicas/${replica}/move`, { body: { diskId: 'disk-2' } });
  assert.equal(moved.status, 200, JSON.stringify(moved.body));
  assert.equal(moved.body.leaving.diskId, 'disk-2');
  assertError(await call(app, 'PATCH', '/v1/disks/disk-0', { body: { evict: 'yes' } }), 400, 'EINVAL', 'evict');
  assertError(await call(app, 'PATCH', '/v1/nodes/node-1', { body: { evict: 1 } }), 400, 'EINVAL', 'evict');
});

test('the read-only token: it may look (every GET, /metrics, the stream) but changes nothing (403 FORBIDDEN, in words); /v1/access tells which token it is', async (t) => {
  const service = new FakeManagerService();
  const READ_ONLY = 'read-only-token-0123456789abcdef';
  await assert.rejects(buildApiServer({ service, token: TOKEN, readOnlyToken: TOKEN }), /read-only token/);
  await assert.rejects(buildApiServer({ service, token: TOKEN, readOnlyToken: ' ' }), /read-only token/);
  const app = await buildApiServer({ service, token: TOKEN, readOnlyToken: READ_ONLY });
  t.after(() => app.close());
  assert.equal((await call(app, 'POST', '/v1/volumes', { body: { name: 'v', sizeBytes: GiB, numberOfReplicas: 1 } })).status, 201);
  for (const url of ['/v1/volumes', '/v1/volumes/v', '/v1/nodes', '/v1/settings', '/metrics', '/v1/events']) {
    assert.equal((await call(app, 'GET', url, { token: READ_ONLY })).status, 200, url);
  }
  assert.deepEqual((await call(app, 'GET', '/v1/access', { token: READ_ONLY })).body, { access: 'read-only' });
  assert.deepEqual((await call(app, 'GET', '/v1/access')).body, { access: 'read-write' });
  for (const [method, url, body] of [['POST', '/v1/volumes/v/attach', {}], ['DELETE', '/v1/volumes/v', undefined], ['PUT', '/v1/settings/default-replica-count', { value: '2' }], ['PATCH', '/v1/nodes/node-1', { allowScheduling: false }]] as const) {
    const r = await call(app, method, url, { token: READ_ONLY, body });
    assertError(r, 403, 'FORBIDDEN');
    assert.match(r.body.error.message, /read-only/, url);
  }
  assert.equal((await service.getVolume('v')).state, 'detached', 'nothing changed');
  assertError(await call(app, 'GET', '/v1/volumes', { token: 'neither' }), 401, 'UNAUTHORIZED');
});
