/**
 * Backing images end to end inside one process: the manager's controller and a node's file
 * keeper over one store, real files on real directories, and a local HTTP server that counts its
 * requests. The first file is downloaded once; the second copy is made from it (no request); a
 * file corrupted by hand is failed and replaced from the ready copy (no request); with every disk
 * that held a file gone the image is downloaded again onto a new disk (a second request); a
 * server that breaks makes the fetch fail, fetched again with backoff; a wrong checksum is failed
 * with the reason; a deleted image's files are removed.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import http from 'node:http';
import { spawnSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import type { AddressInfo } from 'node:net';
import { SqliteStore } from '../../src/store/sqlite-store.ts';
import { Kind, Objects, type BackingImageValue } from '../../src/cluster/objects.ts';
import { Settings } from '../../src/cluster/settings.ts';
import { EventRecorder } from '../../src/manager/events.ts';
import { BackingImageController } from '../../src/manager/backing-image-controller.ts';
import { validateBackingImage } from '../../src/manager/backing-images.ts';
import { BackingImageFiles, imageFilePath } from '../../src/agent/backing-image-files.ts';
import { ImageWrites } from '../../src/backing-image/writer.ts';
import { tempDir } from '../support/tmp.ts';

const IMAGE = crypto.randomBytes(2 * 1024 * 1024 + 5);
const SUM = crypto.createHash('sha512').update(IMAGE).digest('hex');

async function imageServer(t: { after: (fn: () => void) => void }, body: Buffer = IMAGE): Promise<{ url: string; requests: () => number; broken: (b: boolean) => void }> {
  let requests = 0;
  let broken = false;
  const s = http.createServer((_req, res) => {
    requests++;
    if (broken) {
      res.writeHead(500).end('broken');
      return;
    }
    res.writeHead(200, { 'content-length': body.length }).end(body);
  });
  await new Promise<void>((resolve) => s.listen(0, '127.0.0.1', resolve));
  t.after(() => s.close());
  return { url: `http://127.0.0.1:${(s.address() as AddressInfo).port}/base.raw`, requests: () => requests, broken: (b) => (broken = b) };
}

async function setup(t: { after: (fn: () => void | Promise<void>) => void }, diskNames: string[]) {
  const root = tempDir(t);
  const store = SqliteStore.open(':memory:');
  const objects = new Objects(store);
  const settings = new Settings(objects);
  await settings.set('backing-image-recovery-wait-seconds', '1');
  const events = new EventRecorder(objects);
  await objects.create(Kind.NodeLease, 'n1', { startedAt: new Date().toISOString() });
  const paths = new Map<string, string>();
  const addDisk = async (name: string): Promise<void> => {
    const dir = path.join(root, name);
    fs.mkdirSync(dir, { recursive: true });
    paths.set(name, dir);
    await objects.create(Kind.Disk, name, {
      spec: { nodeId: 'n1', path: dir, allowScheduling: true, storageReservedBytes: 0 },
      status: { diskUuid: name, storageMaximumBytes: 2 ** 34, storageAvailableBytes: 2 ** 33, ready: true, message: null },
    });
  };
  for (const d of diskNames) await addDisk(d);
  const controller = new BackingImageController({
    objects, settings, events, pollMs: 50, nodeId: 'n1', writes: new ImageWrites(),
    engines: { openEngineData: () => Promise.reject(new Error('no engines here')) },
    backups: { repository: () => Promise.reject(new Error('no backup target here')) },
  });
  const files = new BackingImageFiles({
    objects, nodeId: 'n1', verifyEveryMs: 100, retryDelayMs: 20, log: () => {},
    // The node's usable disks, as the agent knows them.
    diskPaths: () => paths,
  });
  controller.start();
  const timer = setInterval(() => void files.kick(), 50);
  t.after(async () => {
    clearInterval(timer);
    await controller.stop();
    await files.stop();
    store.close();
  });
  const create = async (name: string, input: Record<string, unknown>): Promise<void> => {
    const value: BackingImageValue = {
      spec: validateBackingImage(input),
      status: { checksum: null, sizeBytes: 0, files: {}, refetch: { attempts: 0, notBefore: null, message: null }, message: null },
      createdAt: new Date().toISOString(), deletionRequestedAt: null,
    };
    await objects.create(Kind.BackingImage, name, value);
  };
  return { objects, events, paths, addDisk, create };
}

async function until<T>(what: string, fn: () => Promise<T | undefined | false>, timeoutMs = 15_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await fn();
    if (v !== undefined && v !== false) return v as T;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

const states = async (objects: Objects, name: string): Promise<Record<string, string>> =>
  Object.fromEntries(Object.entries((await objects.must(Kind.BackingImage, name)).value.status.files).map(([d, f]) => [d, f.state]));

test('downloaded once, copied to the second disk; a file corrupted by hand is replaced from the ready copy; every disk gone: downloaded again onto a new disk', async (t) => {
  const server = await imageServer(t);
  const { objects, events, paths, addDisk, create } = await setup(t, ['d1', 'd2']);
  await create('base', { url: server.url, checksum: SUM, minCopies: 2 });
  await until('two ready files', async () => JSON.stringify(await states(objects, 'base')) === JSON.stringify({ d1: 'ready', d2: 'ready' }));
  assert.equal(server.requests(), 1, 'the second copy comes from the first file, not the server');
  const image = await objects.must(Kind.BackingImage, 'base');
  assert.equal(image.value.status.checksum, SUM);
  assert.equal(image.value.status.sizeBytes, IMAGE.length);
  for (const d of ['d1', 'd2']) assert.ok(fs.readFileSync(imageFilePath(paths.get(d)!, 'base')).equals(IMAGE));
  assert.deepEqual(image.value.status.files.d2.from, { disk: 'd1' });

  // A byte changed on disk: failed with the reason, removed, copied again from d1.
  const corrupt = imageFilePath(paths.get('d2')!, 'base');
  const fd = fs.openSync(corrupt, 'r+');
  fs.writeSync(fd, Buffer.from([IMAGE[777] ^ 0xff]), 0, 1, 777);
  fs.closeSync(fd);
  await until('the corrupt file failed', async () => (await events.list()).some((e) => e.reason === 'BackingImageFileFailed' && /d2: the file's SHA-512 .* changed on disk/.test(e.message)));
  await until('d2 ready again', async () => (await states(objects, 'base')).d2 === 'ready' && fs.readFileSync(corrupt).equals(IMAGE));
  assert.equal(server.requests(), 1, 'replaced from the ready copy');

  // Both disks removed (Longhorn #10569): unknown, then lost after the wait; downloaded again onto a new disk.
  for (const d of ['d1', 'd2']) {
    paths.delete(d);
    await objects.remove(Kind.Disk, d);
  }
  await until('files unknown', async () => Object.values(await states(objects, 'base')).every((s) => s === 'unknown'));
  await addDisk('d3');
  await until('a ready file on d3', async () => (await states(objects, 'base')).d3 === 'ready', 20_000);
  assert.equal(server.requests(), 2, 'downloaded again');
  const after = await until('the recovery ended', async () => {
    const v = await objects.must(Kind.BackingImage, 'base');
    return v.value.status.refetch.attempts === 0 ? v : undefined;
  });
  assert.deepEqual(Object.keys(after.value.status.files), ['d3'], 'the lost files are gone from the status');
  const reasons = (await events.list()).map((e) => e.reason);
  for (const r of ['BackingImageFetching', 'BackingImageCopying', 'BackingImageFileUnknown', 'BackingImageLost', 'BackingImageRecovered']) assert.ok(reasons.includes(r), r);

  // Deleted: its files go, then the object.
  await objects.mutate(Kind.BackingImage, 'base', (v) => {
    v.deletionRequestedAt = new Date().toISOString();
  });
  await until('the image gone', async () => (await objects.get(Kind.BackingImage, 'base')) === null);
  assert.ok(!fs.existsSync(path.dirname(imageFilePath(paths.get('d3')!, 'base'))));
});

test('a wrong checksum fails with the reason; a broken server makes fetches fail, tried again with a growing wait', async (t) => {
  const server = await imageServer(t);
  const { objects, create } = await setup(t, ['d1']);
  await create('wrong', { url: server.url, checksum: 'cd'.repeat(64), minCopies: 1 });
  const lost = await until('the wrong image fetched again after failing', async () => {
    const v = (await objects.must(Kind.BackingImage, 'wrong')).value;
    return v.status.refetch.attempts >= 1 ? v : undefined;
  });
  assert.match(lost.status.refetch.message!, /checksum mismatch .* expected SHA-512 cdcd/);

  server.broken(true);
  await create('flaky', { url: server.url, minCopies: 1 });
  const waiting = await until('a second attempt waiting', async () => {
    const v = (await objects.must(Kind.BackingImage, 'flaky')).value;
    return v.status.refetch.attempts >= 2 ? v : undefined;
  }, 30_000);
  assert.match(waiting.status.refetch.message!, /HTTP 500/);
  assert.ok(Date.parse(waiting.status.refetch.notBefore!) > Date.now() + 5000, 'the next attempt waits');
  server.broken(false);
});

test('a qcow2 image is converted to raw: its published checksum checks the download, the raw file fixes the image\'s', async (t) => {
  const dir = tempDir(t);
  const raw = crypto.randomBytes(3 * 1024 * 1024);
  fs.writeFileSync(path.join(dir, 'src.raw'), raw);
  const converted = spawnSync('qemu-img', ['convert', '-q', '-f', 'raw', '-O', 'qcow2', path.join(dir, 'src.raw'), path.join(dir, 'src.qcow2')]);
  assert.equal(converted.status, 0, converted.stderr?.toString());
  const qcow2 = fs.readFileSync(path.join(dir, 'src.qcow2'));
  const server = await imageServer(t, qcow2);
  const { objects, paths, create } = await setup(t, ['d1', 'd2']);
  await create('q', { url: server.url, checksum: crypto.createHash('sha512').update(qcow2).digest('hex'), minCopies: 2 });
  const ready = await until('two ready raw copies', async () => {
    const v = (await objects.must(Kind.BackingImage, 'q')).value;
    return Object.values(v.status.files).filter((f) => f.state === 'ready').length === 2 ? v : undefined;
  });
  assert.equal(ready.status.checksum, crypto.createHash('sha512').update(raw).digest('hex'), 'the image\'s checksum is the raw file\'s');
  assert.equal(ready.status.sizeBytes, raw.length);
  for (const d of ['d1', 'd2']) assert.ok(fs.readFileSync(imageFilePath(paths.get(d)!, 'q')).equals(raw), d);
  assert.equal(server.requests(), 1);
  assert.deepEqual(fs.readdirSync(path.dirname(imageFilePath(paths.get('d1')!, 'q'))), ['image.raw'], 'no download or part file left');
});
