/**
 * Backing images through `zebu up` and the real CLI, downloaded from a local HTTP server that
 * counts its requests: the image is downloaded once and copied to a second disk (no second
 * request); both disks that hold it stop being usable (their identity gone, as when a disk is
 * removed or replaced): the files are unknown, then lost, and the image is downloaded again onto
 * the disk left; a wrong checksum, a 404 and an unreachable host are failures with the reason;
 * bad input is refused with the field named; delete removes the files.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { startZebuUp, stopZebuUp, zebu, mustZebu, mustZebuJson, zebuDataDir, waitFor } from '../support/zebu-up.ts';

const IMAGE = crypto.randomBytes(8 * 1024 * 1024 + 512);
const SUM = crypto.createHash('sha512').update(IMAGE).digest('hex');

/** An HTTP server for the image file: one line per request on stdout. */
const SERVER = `
const http = require('node:http');
const fs = require('node:fs');
const s = http.createServer((req, res) => {
  process.stdout.write('req ' + req.url + '\\n');
  if (req.url !== '/base.raw') { res.writeHead(404).end('not here'); return; }
  const size = fs.statSync(process.env.IMAGE_FILE).size;
  res.writeHead(200, { 'content-length': size });
  fs.createReadStream(process.env.IMAGE_FILE).pipe(res);
});
s.listen(0, '127.0.0.1', () => process.stdout.write('port ' + s.address().port + '\\n'));
`;

test('backing image: downloaded once and copied; every disk holding it lost: downloaded again; failures and bad input are clear; delete removes the files', async (t) => {
  // The server runs in a process of its own: the CLI runs synchronously here (spawnSync) and
  // would block a server in this process.
  const dataDir = zebuDataDir(t);
  const imageFile = path.join(path.dirname(dataDir), 'base.raw');
  fs.writeFileSync(imageFile, IMAGE);
  const server = spawn(process.execPath, ['-e', SERVER], { stdio: ['ignore', 'pipe', 'inherit'], env: { ...process.env, IMAGE_FILE: imageFile } });
  t.after(() => server.kill());
  let output = '';
  server.stdout.on('data', (d) => (output += d));
  const port = await waitFor('the image server', () => /^port (\d+)$/m.exec(output)?.[1], 10_000, 20);
  const base = `http://127.0.0.1:${port}`;
  // After a turn of the event loop: the CLI calls (spawnSync) hold back the server's output.
  const requestsFor = async (p: string): Promise<number> => {
    await new Promise((r) => setTimeout(r, 100));
    return output.split('\n').filter((l) => l === `req ${p}`).length;
  };

  const up = await startZebuUp({ dataDir, disks: 3 });
  t.after(() => stopZebuUp(up));
  mustZebu(up, ['setting', 'set', 'backing-image-recovery-wait-seconds', '2']);

  // Bad input: the field named, nothing created.
  for (const [args, why] of [
    [['--url', 'not a url'], /url "not a url" is not a URL/],
    [['--url', 'ftp://x/y'], /only http:\/\/ and https:\/\//],
    [['--url', `${base}/base.raw`, '--checksum', 'abc'], /checksum must be a SHA-512/],
    [['--url', `${base}/base.raw`, '--min-copies', '0'], /minCopies must be a whole number from 1 to 10/],
  ] as const) {
    const r = zebu(up, ['backing-image', 'create', 'bad', ...args]);
    assert.equal(r.status, 1, r.stdout);
    assert.match(r.stderr, why);
  }
  assert.match(zebu(up, ['backing-image', 'create', 'Bad_Name', '--url', `${base}/base.raw`]).stderr, /name/);
  assert.match(zebu(up, ['backing-image', 'get', 'nope']).stderr, /backing image nope not found/);
  assert.match(zebu(up, ['backing-image', 'delete', 'nope']).stderr, /backing image nope not found/);
  assert.deepEqual(mustZebuJson(up, ['backing-image', 'list']), []);

  // Downloaded once, verified, then copied from the ready file.
  const created = mustZebu(up, ['backing-image', 'create', 'base', '--url', `${base}/base.raw`, '--checksum', SUM, '--min-copies', '2']);
  assert.match(created, /state:\s+ready/);
  assert.match(zebu(up, ['backing-image', 'create', 'base', '--url', `${base}/base.raw`]).stderr, /already exists/);
  const two = await waitFor('two ready copies', () => {
    const i = mustZebuJson(up, ['backing-image', 'get', 'base']);
    return i.readyCopies === 2 ? i : undefined;
  });
  assert.equal(await requestsFor('/base.raw'), 1, 'the second copy is made from the first file');
  assert.equal(two.checksum, SUM);
  assert.equal(two.sizeBytes, IMAGE.length);
  const disks = mustZebuJson<{ name: string; path: string }[]>(up, ['disk', 'list']);
  const holding: { name: string; path: string }[] = two.files.map((f: { disk: string }) => disks.find((d) => d.name === f.disk)!);
  for (const d of holding) assert.ok(fs.readFileSync(path.join(d.path, 'backing-images', 'base', 'image.raw')).equals(IMAGE), d.name);
  assert.match(mustZebu(up, ['backing-image', 'list']), /^base\s+ready\s+8 MiB\s+2\/2\s+http/m);

  // Both disks that hold it stop being usable: unknown, lost after the wait, downloaded again onto the third.
  for (const d of holding) fs.rmSync(path.join(d.path, 'zebu-disk.json'));
  const again = await waitFor('a ready file on the disk left', () => {
    const i = mustZebuJson(up, ['backing-image', 'get', 'base']);
    return i.readyCopies >= 1 && i.files.some((f: { disk: string; state: string }) => f.state === 'ready' && !holding.some((h) => h.name === f.disk)) ? i : undefined;
  }, 90_000);
  assert.equal(await requestsFor('/base.raw'), 2, 'downloaded again once every file was lost');
  const events = mustZebuJson<{ reason: string; message: string }[]>(up, ['events']).map((e) => e.reason);
  for (const r of ['BackingImageFileUnknown', 'BackingImageLost']) assert.ok(events.includes(r), r);
  assert.equal(again.checksum, SUM);

  // Failures say why.
  mustZebu(up, ['backing-image', 'create', 'wrong', '--url', `${base}/base.raw`, '--checksum', 'cd'.repeat(64), '--no-wait']);
  mustZebu(up, ['backing-image', 'create', 'missing', '--url', `${base}/missing.raw`, '--no-wait']);
  mustZebu(up, ['backing-image', 'create', 'unreachable', '--url', 'http://127.0.0.1:1/x.raw', '--no-wait', '--min-copies', '1']);
  for (const [name, why] of [['wrong', /checksum mismatch/], ['missing', /HTTP 404/], ['unreachable', /cannot reach/]] as const) {
    await waitFor(`${name} to say why`, () => {
      const text = mustZebu(up, ['backing-image', 'get', name]);
      return why.test(text) ? text : undefined;
    }, 90_000);
    mustZebu(up, ['backing-image', 'delete', name]);
  }
  const timedOut = zebu(up, ['backing-image', 'create', 'late', '--url', `${base}/missing.raw`, '--timeout', '3']);
  assert.equal(timedOut.status, 1);
  assert.match(timedOut.stderr, /timed out after 3 s waiting for backing image late to be ready/);

  // Delete: files removed, then the image.
  const left: { name: string; path: string }[] = again.files.map((f: { disk: string }) => disks.find((d) => d.name === f.disk)!).filter((d: { name: string }) => !holding.some((h) => h.name === d.name));
  assert.match(mustZebu(up, ['backing-image', 'delete', 'base']), /backing image base deleted/);
  for (const d of left) assert.ok(!fs.existsSync(path.join(d.path, 'backing-images', 'base')), d.name);
  assert.match(zebu(up, ['backing-image', 'get', 'base']).stderr, /not found/);
});
