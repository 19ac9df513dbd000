/**
 * The web UI's side of the API server: its built files served without a token (and nothing else
 * from the disk), and the live volume feed — token required; a snapshot, then only what changed,
 * at most once a second, deletes by name; a follower that goes away is let go.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import type { AddressInfo } from 'node:net';
import { buildApiServer } from '../../src/api/server.ts';
import { PROJECT_ROOT } from '../../src/os/js-build.ts';
import { FakeManagerService } from './fake-service.ts';

const TOKEN = 'web-ui-token-0123456789abcdef';
const built = fs.existsSync(path.join(PROJECT_ROOT, 'build', 'web', 'app.js'));

async function started(t: { after: (fn: () => Promise<void>) => void }) {
  const service = new FakeManagerService();
  const app = await buildApiServer({ service, token: TOKEN });
  await app.listen({ host: '127.0.0.1', port: 0 });
  t.after(() => app.close());
  return { service, base: `http://127.0.0.1:${(app.server.address() as AddressInfo).port}` };
}

test('the UI\'s files: served without a token with their types; no other file, no path, reachable', { skip: built ? false : 'build/web missing (scripts/build-web.ts)' }, async (t) => {
  const { base } = await started(t);
  const index = await fetch(`${base}/`);
  assert.equal(index.status, 200);
  assert.match(index.headers.get('content-type') ?? '', /^text\/html/);
  assert.match(await index.text(), /<script type="module" src="\/ui\/app.js">/);
  for (const [file, type] of [['app.js', /^text\/javascript/], ['api.js', /^text\/javascript/], ['style.css', /^text\/css/]] as const) {
    const r = await fetch(`${base}/ui/${file}`);
    assert.equal(r.status, 200, file);
    assert.match(r.headers.get('content-type') ?? '', type, file);
  }
  assert.doesNotMatch(await (await fetch(`${base}/ui/app.js`)).text(), /: string\b|interface /, 'no TypeScript left in what the browser gets');
  for (const bad of ['/ui/nothing.js', '/ui/..%2Fpackage.json', '/ui/%2E%2E%2F%2E%2E%2Fetc%2Fpasswd', '/ui/app.ts', '/ui/token']) {
    const r = await fetch(`${base}${bad}`);
    assert.equal(r.status, 404, bad);
    assert.equal(((await r.json()) as { error: { code: string } }).error.code, 'NOT_FOUND', bad);
  }
  // The API itself still wants its token.
  assert.equal((await fetch(`${base}/v1/volumes`)).status, 401);
});

/** Server-sent events read one at a time (what a read brought beyond one event waits for the next call). */
function eventReader(reader: ReadableStreamDefaultReader<string>): (timeoutMs?: number) => Promise<{ event: string; data: any } | null> {
  const queue: { event: string; data: any }[] = [];
  let buffer = '';
  // A read that outlived a call's time is kept for the next call (its chunk must not be lost).
  let pending: ReturnType<typeof reader.read> | null = null;
  return async (timeoutMs = 5000) => {
    const deadline = Date.now() + timeoutMs;
    while (queue.length === 0) {
      const left = deadline - Date.now();
      if (left <= 0) return null;
      pending ??= reader.read();
      const next = await Promise.race([pending, new Promise<null>((resolve) => setTimeout(() => resolve(null), left))]);
      if (next === null) return null;
      pending = null;
      if (next.done) return null;
      buffer += next.value;
      let end: number;
      while ((end = buffer.indexOf('\n\n')) >= 0) {
        const message = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const event = /^event: (.*)$/m.exec(message)?.[1];
        const data = /^data: (.*)$/m.exec(message)?.[1];
        if (event !== undefined && data !== undefined) queue.push({ event, data: JSON.parse(data) });
      }
    }
    return queue.shift()!;
  };
}

test('the live volume feed: token required; a snapshot, then one put per changed volume (nothing for unchanged ones), deletes by name', async (t) => {
  const { service, base } = await started(t);
  assert.equal((await fetch(`${base}/v1/stream/volumes`)).status, 401);
  assert.equal((await fetch(`${base}/v1/stream/volumes`, { headers: { authorization: 'Bearer wrong' } })).status, 401);
  await service.createVolume({ name: 'a', sizeBytes: 2 ** 30, numberOfReplicas: 1 });
  await service.createVolume({ name: 'b', sizeBytes: 2 ** 30, numberOfReplicas: 1 });
  const controller = new AbortController();
  t.after(() => controller.abort());
  const answer = await fetch(`${base}/v1/stream/volumes`, { headers: { authorization: `Bearer ${TOKEN}` }, signal: controller.signal });
  assert.equal(answer.status, 200);
  assert.match(answer.headers.get('content-type') ?? '', /^text\/event-stream/);
  const next = eventReader(answer.body!.pipeThrough(new TextDecoderStream()).getReader());
  const snapshot = (await next())!;
  assert.equal(snapshot.event, 'snapshot');
  assert.deepEqual(snapshot.data.map((v: { name: string }) => v.name).sort(), ['a', 'b']);

  // One volume changes (attaching, then attached a few readings later): only it is sent, at most
  // once per reading.
  const attachedAt = Date.now();
  await service.attachVolume('a', { nodeId: 'node-1' });
  const changed: { event: string; data: any }[] = [];
  while (changed.at(-1)?.data.state !== 'attached') {
    const e = await next();
    assert.ok(e !== null, `a's changes: ${JSON.stringify(changed.map((x) => x.data.state))}`);
    changed.push(e);
  }
  assert.deepEqual(new Set(changed.map((e) => `${e.event} ${e.data.name}`)), new Set(['put a']));
  assert.ok(Date.now() - attachedAt >= (changed.length - 1) * 900, 'at most one put a second');
  // Nothing changes: nothing is sent.
  assert.equal(await next(2500), null);
  await service.createVolume({ name: 'c', sizeBytes: 2 ** 30, numberOfReplicas: 1 });
  await service.deleteVolume('b');
  const more: string[] = [];
  while (!more.includes('delete b') || !more.includes('put c')) {
    const e = await next();
    assert.ok(e !== null, `after c and b: ${more.join(', ')}`);
    more.push(`${e.event} ${e.data.name}`);
  }
  assert.ok(more.every((e) => e === 'put c' || e === 'put b' || e === 'delete b'), more.join(', '));
  controller.abort();
});

test('the other feeds: nodes, disks and the newest events (a new event arrives as a put); an unknown kind is a 404 naming the kinds', async (t) => {
  const { service, base } = await started(t);
  const headers = { authorization: `Bearer ${TOKEN}` };
  const unknown = await fetch(`${base}/v1/stream/bogus`, { headers });
  assert.equal(unknown.status, 404);
  assert.match(((await unknown.json()) as { error: { message: string } }).error.message, /no stream of bogus: one of volumes, nodes, disks, events/);
  const controller = new AbortController();
  t.after(() => controller.abort());
  for (const kind of ['nodes', 'disks']) {
    const answer = await fetch(`${base}/v1/stream/${kind}`, { headers, signal: controller.signal });
    const first = (await eventReader(answer.body!.pipeThrough(new TextDecoderStream()).getReader())())!;
    assert.equal(first.event, 'snapshot', kind);
    assert.deepEqual(first.data.map((x: { name: string }) => x.name).sort(), (kind === 'nodes' ? await service.listNodes() : await service.listDisks()).map((x) => x.name).sort(), kind);
  }
  await service.createVolume({ name: 'first', sizeBytes: 2 ** 30, numberOfReplicas: 1 });
  const answer = await fetch(`${base}/v1/stream/events`, { headers, signal: controller.signal });
  const next = eventReader(answer.body!.pipeThrough(new TextDecoderStream()).getReader());
  const snapshot = (await next())!;
  assert.equal(snapshot.event, 'snapshot');
  assert.ok(snapshot.data.some((e: { object: string }) => e.object === 'first'), JSON.stringify(snapshot.data));
  await service.createVolume({ name: 'second', sizeBytes: 2 ** 30, numberOfReplicas: 1 });
  const put = (await next())!;
  assert.equal(put.event, 'put');
  assert.equal(put.data.object, 'second');
  controller.abort();
});
