/**
 * `zebu recurring-job …` and `zebu volume update --recurring-job…`: the real CLI (a child
 * process) against the real API server and recurring-job service over an in-memory store —
 * outputs, --json (what the API returns), and one-line errors for bad input with nothing changed.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import net from 'node:net';
import { buildApiServer } from '../../src/api/server.ts';
import { SqliteStore } from '../../src/store/sqlite-store.ts';
import { Kind, Objects } from '../../src/cluster/objects.ts';
import { EventRecorder } from '../../src/manager/events.ts';
import { RecurringJobServiceImpl, type RecurringJobView } from '../../src/manager/recurring-job-service.ts';
import { FakeManagerService } from '../api/fake-service.ts';
import { ZEBU_MAIN } from '../support/replica-process.ts';

const TOKEN = 'recurring-test-token-0123456789';

async function startApi(t: { after: (fn: () => Promise<void> | void) => void }) {
  const store = SqliteStore.open(':memory:');
  const objects = new Objects(store);
  const recurringJobs = new RecurringJobServiceImpl({ objects, events: new EventRecorder(objects) });
  for (const name of ['db', 'web']) {
    await objects.create(Kind.Volume, name, {
      spec: { sizeBytes: 1 << 30, numberOfReplicas: 1, nodeId: null, maintenance: false },
      status: { state: 'detached', robustness: 'healthy', epoch: 0, currentNodeId: null, attachStartedAt: null, endpoint: null, message: null, snapshots: [] },
      createdAt: new Date().toISOString(), deletionRequestedAt: null,
    });
  }
  const app = await buildApiServer({ service: new FakeManagerService(), recurringJobs, token: TOKEN });
  await app.listen({ host: '127.0.0.1', port: 0 });
  t.after(async () => {
    await app.close();
    store.close();
  });
  return { url: `http://127.0.0.1:${(app.server.address() as net.AddressInfo).port}`, objects };
}

function zebu(url: string, args: string[]): Promise<{ stdout: string; stderr: string; status: number | null }> {
  const env: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) if (!k.startsWith('ZEBU_')) env[k] = v;
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [ZEBU_MAIN, ...args], { env: { ...env, ZEBU_API: url, ZEBU_TOKEN: TOKEN }, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    child.once('error', reject);
    child.once('close', (status) => resolve({ stdout, stderr, status }));
  });
}

async function ok(url: string, args: string[]): Promise<string> {
  const r = await zebu(url, args);
  assert.equal(r.status, 0, `zebu ${args.join(' ')}: ${r.stderr}`);
  return r.stdout;
}

async function fails(url: string, args: string[], pattern: RegExp): Promise<void> {
  const r = await zebu(url, args);
  assert.equal(r.status, 1, `zebu ${args.join(' ')} should fail: ${r.stdout}`);
  assert.match(r.stderr, pattern);
  assert.equal(r.stderr.trim().split('\n').length, 1, 'one line');
  assert.equal(r.stdout, '');
}

test('recurring-job CLI: create, list, get, update, volume update, delete; bad input refused in one line with nothing changed', async (t) => {
  const { url, objects } = await startApi(t);

  const created = await ok(url, ['recurring-job', 'create', 'nightly', '--task', 'backup', '--cron', '0 0 2 * * *', '--timezone', 'Europe/Berlin', '--retain', '7', '--retain-max-age', '30d', '--group', 'default', '--label', 'team=db']);
  assert.match(created, /schedule:\s+0 0 2 \* \* \* \(Europe\/Berlin\)/);
  assert.match(created, /retain:\s+7, none older than 2592000 s/);
  assert.match(created, /volumes:\s+db, web/);
  assert.match(created, /next run:\s+\d{4}-\d\d-\d\dT0[01]:00:00.000Z/);

  await fails(url, ['recurring-job', 'create', 'bad', '--task', 'backup', '--cron', '0 61 * * *'], /^zebu: cron "0 61 \* \* \*": .*hour: 61/);
  await fails(url, ['recurring-job', 'create', 'bad', '--task', 'defrag', '--cron', '* * * * *'], /^zebu: .*task/);
  await fails(url, ['recurring-job', 'create', 'bad', '--task', 'backup', '--cron', '* * * * *', '--timezone', 'Mars/Olympus'], /^zebu: timezone "Mars\/Olympus" is not an IANA time zone/);
  await fails(url, ['recurring-job', 'create', 'bad', '--task', 'backup', '--cron', '* * * * *', '--retain', '0'], /^zebu: retain must be a whole number from 1 to 250/);
  await fails(url, ['recurring-job', 'create', 'bad', '--task', 'backup', '--cron', '* * * * *', '--retain', '100000'], /^zebu: retain must be a whole number from 1 to 250/);
  await fails(url, ['recurring-job', 'create', 'nightly', '--task', 'snapshot', '--cron', '* * * * *'], /^zebu: recurring job nightly already exists/);
  await fails(url, ['recurring-job', 'get', 'nope'], /^zebu: recurring job nope not found/);

  const list = JSON.parse(await ok(url, ['recurring-job', 'list', '--json'])) as RecurringJobView[];
  assert.deepEqual(list.map((j) => j.name), ['nightly'], 'refused creates left nothing');
  assert.deepEqual(list[0].labels, { team: 'db' });
  assert.match(await ok(url, ['recurring-job', 'list']), /^NAME\s+TASK\s+SCHEDULE.*\nnightly\s+backup\s+0 0 2 \* \* \* \(Europe\/Berlin\)\s+7\s+default\s+2\s/);

  const updated = JSON.parse(await ok(url, ['recurring-job', 'update', 'nightly', '--retain', '3', '--json'])) as RecurringJobView;
  assert.equal(updated.retain, 3);
  assert.equal(updated.cron, '0 0 2 * * *');
  await fails(url, ['recurring-job', 'update', 'nightly'], /^zebu: nothing to change/);
  await fails(url, ['recurring-job', 'update', 'nightly', '--cron', 'often'], /^zebu: cron "often"/);

  await ok(url, ['recurring-job', 'create', 'weekly', '--task', 'backup-force-create', '--cron', '0 3 * * 0', '--group', 'db-tier']);
  assert.match(await ok(url, ['volume', 'update', 'db', '--recurring-job-group', 'db-tier']), /covered by:\s+weekly/);
  await fails(url, ['volume', 'update', 'web', '--recurring-job-group', 'db-teir'], /^zebu: no recurring job is in group db-teir/);
  await fails(url, ['volume', 'update', 'web', '--recurring-job', 'montly'], /^zebu: recurring job montly not found/);
  await fails(url, ['volume', 'update', 'nope', '--recurring-job', 'weekly'], /^zebu: volume nope not found/);
  assert.equal((await objects.get(Kind.Volume, 'web'))!.value.spec.recurringJobGroups, undefined, 'refused updates changed nothing');
  assert.deepEqual((JSON.parse(await ok(url, ['recurring-job', 'get', 'nightly', '--json'])) as RecurringJobView).members, ['web']);
  assert.match(await ok(url, ['volume', 'update', 'db', '--clear-recurring-jobs']), /groups:\s+default \(none named\)\ncovered by:\s+nightly/);

  assert.match(await ok(url, ['recurring-job', 'delete', 'weekly']), /recurring job weekly deleted/);
  await fails(url, ['recurring-job', 'delete', 'weekly'], /^zebu: recurring job weekly not found/);
});

test('recurring-job API: unknown fields and wrong types are 400 naming the field; no token is 401', async (t) => {
  const { url } = await startApi(t);
  const call = (method: string, path: string, body?: unknown, token: string | null = TOKEN) => fetch(`${url}${path}`, {
    method,
    headers: { ...(token !== null ? { authorization: `Bearer ${token}` } : {}), ...(body !== undefined ? { 'content-type': 'application/json' } : {}) },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  let r = await call('POST', '/v1/recurringjobs', { name: 'x', task: 'backup', cron: '* * * * *', retian: 3 });
  assert.equal(r.status, 400);
  assert.match(await r.text(), /retian/);
  r = await call('POST', '/v1/recurringjobs', { name: 'x', task: 'backup', cron: '* * * * *', retain: 'three' });
  assert.equal(r.status, 400);
  assert.match(await r.text(), /retain/);
  r = await call('POST', '/v1/recurringjobs', { name: 'x', cron: '* * * * *' });
  assert.equal(r.status, 400);
  assert.match(await r.text(), /task/);
  r = await call('GET', '/v1/recurringjobs', undefined, null);
  assert.equal(r.status, 401);
  r = await call('POST', '/v1/recurringjobs', { name: 'ok-job', task: 'snapshot', cron: '*/10 * * * * *', concurrency: 2 });
  assert.equal(r.status, 201);
  assert.equal(((await r.json()) as RecurringJobView).concurrency, 2);
  r = await call('PUT', '/v1/volumes/db/recurringjobs', { recurringJobs: ['ok-job'], extra: 1 });
  assert.equal(r.status, 400);
  r = await call('PUT', '/v1/volumes/db/recurringjobs', { recurringJobs: ['ok-job'] });
  assert.equal(r.status, 200);
  assert.deepEqual(((await r.json()) as { jobs: string[] }).jobs, ['ok-job']);
});
