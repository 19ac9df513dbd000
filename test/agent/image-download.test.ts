/**
 * Downloading a backing image from a local HTTP server that misbehaves on purpose: a transfer cut
 * midway resumes with Range (or starts again when the server ignores Range), wrong bytes fail the
 * checksum and leave no file, a 404 is final, 503 is retried, a file larger than the room is
 * refused, an abort stops it; the file appears only whole and verified.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import http from 'node:http';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import type { AddressInfo } from 'node:net';
import { downloadImage } from '../../src/agent/image-download.ts';
import { ZebuError, ErrorCode } from '../../src/errors.ts';
import { tempDir } from '../support/tmp.ts';

const IMAGE = crypto.randomBytes(3 * 1024 * 1024 + 123);
const SUM = crypto.createHash('sha512').update(IMAGE).digest('hex');

interface ServerMode {
  /** Cut the connection after this many bytes, for the first N requests. */
  cutAfter?: number;
  cuts?: number;
  ranges?: boolean;
  status?: number;
  /** Answer this status for the first N requests, then serve. */
  failFirst?: { status: number; count: number };
  body?: Buffer;
}

async function server(t: { after: (fn: () => void) => void }, mode: ServerMode): Promise<{ url: string; requests: { range: string | undefined }[] }> {
  const requests: { range: string | undefined }[] = [];
  let cuts = mode.cuts ?? 0;
  let failures = mode.failFirst?.count ?? 0;
  const body = mode.body ?? IMAGE;
  const s = http.createServer((req, res) => {
    requests.push({ range: req.headers.range });
    if (mode.status !== undefined) {
      res.writeHead(mode.status).end('no');
      return;
    }
    if (failures > 0) {
      failures--;
      res.writeHead(mode.failFirst!.status).end('busy');
      return;
    }
    let start = 0;
    const m = /^bytes=(\d+)-$/.exec(req.headers.range ?? '');
    if (mode.ranges !== false && m !== null) {
      start = Number(m[1]);
      res.writeHead(206, { 'content-length': body.length - start, 'content-range': `bytes ${start}-${body.length - 1}/${body.length}` });
    } else {
      res.writeHead(200, { 'content-length': body.length });
    }
    const rest = body.subarray(start);
    if (cuts > 0 && mode.cutAfter !== undefined) {
      cuts--;
      res.write(rest.subarray(0, mode.cutAfter), () => setTimeout(() => res.destroy(), 20));
      return;
    }
    res.end(rest);
  });
  await new Promise<void>((resolve) => s.listen(0, '127.0.0.1', resolve));
  t.after(() => s.close());
  return { url: `http://127.0.0.1:${(s.address() as AddressInfo).port}/image.raw`, requests };
}

test('a whole download: verified, renamed into place, progress reported', async (t) => {
  const dir = tempDir(t);
  const { url } = await server(t, {});
  const target = path.join(dir, 'image.raw');
  let last = 0;
  const r = await downloadImage({ url, path: target, expectedChecksum: SUM.toUpperCase(), onProgress: (done, total) => { last = done; assert.equal(total, IMAGE.length); } });
  assert.deepEqual(r, { sizeBytes: IMAGE.length, checksum: SUM, attempts: 1, resumed: 0, restarted: 0 });
  assert.equal(last, IMAGE.length);
  assert.ok(fs.readFileSync(target).equals(IMAGE));
  assert.ok(!fs.existsSync(`${target}.part`));
});

test('cut midway: resumed with Range; without Range support: started again; the bytes are right either way', async (t) => {
  const dir = tempDir(t);
  const withRanges = await server(t, { cutAfter: 1024 * 1024, cuts: 2 });
  const r1 = await downloadImage({ url: withRanges.url, path: path.join(dir, 'a'), expectedChecksum: SUM, retryDelayMs: 10 });
  assert.equal(r1.resumed, 2);
  assert.equal(r1.restarted, 0);
  // Each resume starts where the bytes on disk end: at most the 1 MiB the server sent before the
  // cut (a chunk still in the client's stream when the connection broke is fetched again).
  const ranges = withRanges.requests.map((q) => q.range);
  assert.equal(ranges.length, 3);
  assert.equal(ranges[0], undefined);
  let previous = 0;
  for (const range of ranges.slice(1)) {
    const m = /^bytes=(\d+)-$/.exec(range ?? '');
    assert.ok(m !== null, `a resume asks for a byte range: ${range}`);
    const start = Number(m[1]);
    assert.ok(start >= previous && start <= previous + 1024 * 1024, `resume at ${start} after ${previous}`);
    previous = start;
  }
  assert.ok(fs.readFileSync(path.join(dir, 'a')).equals(IMAGE));

  const noRanges = await server(t, { cutAfter: 1024 * 1024, cuts: 1, ranges: false });
  const r2 = await downloadImage({ url: noRanges.url, path: path.join(dir, 'b'), expectedChecksum: SUM, retryDelayMs: 10 });
  assert.equal(r2.restarted, 1);
  assert.ok(fs.readFileSync(path.join(dir, 'b')).equals(IMAGE));
});

test('wrong bytes, 404, a server that keeps failing, too large, aborted: clear errors and no file left', async (t) => {
  const dir = tempDir(t);
  const target = path.join(dir, 'image.raw');
  const gone = () => !fs.existsSync(target) && !fs.existsSync(`${target}.part`);

  const wrong = await server(t, { body: Buffer.concat([IMAGE.subarray(0, 1000), Buffer.from('x'), IMAGE.subarray(1001)]) });
  await assert.rejects(downloadImage({ url: wrong.url, path: target, expectedChecksum: SUM }), (err) => err instanceof ZebuError && err.code === ErrorCode.EINVAL && /checksum mismatch/.test(err.message));
  assert.ok(gone());

  const missing = await server(t, { status: 404 });
  await assert.rejects(downloadImage({ url: missing.url, path: target, expectedChecksum: null, retryDelayMs: 10 }), (err) => err instanceof ZebuError && err.code === ErrorCode.NOT_FOUND && /HTTP 404/.test(err.message));
  assert.equal(missing.requests.length, 1, 'a 404 is not retried');
  assert.ok(gone());

  const busy = await server(t, { failFirst: { status: 503, count: 2 } });
  const r = await downloadImage({ url: busy.url, path: target, expectedChecksum: SUM, retryDelayMs: 10 });
  assert.equal(r.attempts, 3, '503 is retried');
  fs.rmSync(target);

  const down = await server(t, { status: 503 });
  await assert.rejects(downloadImage({ url: down.url, path: target, expectedChecksum: null, retryDelayMs: 5, maxAttempts: 3 }), /HTTP 503.*gave up after 3 attempts/);
  assert.ok(gone());

  const big = await server(t, {});
  await assert.rejects(downloadImage({ url: big.url, path: target, expectedChecksum: null, maxBytes: 1024 * 1024 }), (err) => err instanceof ZebuError && err.code === ErrorCode.ENOSPC);
  assert.ok(gone());

  await assert.rejects(downloadImage({ url: 'http://127.0.0.1:1/none', path: target, expectedChecksum: null, retryDelayMs: 5, maxAttempts: 2 }), /cannot reach .*gave up after 2 attempts/);
  assert.ok(gone());

  const slow = await server(t, { cutAfter: 1024, cuts: 100 });
  const abort = new AbortController();
  setTimeout(() => abort.abort(new Error('stopped by the test')), 100);
  await assert.rejects(downloadImage({ url: slow.url, path: target, expectedChecksum: null, retryDelayMs: 1000, signal: abort.signal }), /stopped by the test/);
  assert.ok(gone());
});
