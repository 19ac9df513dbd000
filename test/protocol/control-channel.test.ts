/**
 * The bounded control channel (src/protocol/control-channel.ts) against an in-process HTTP server
 * on a UNIX socket, and the one error table (src/error-status.ts).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { controlRequest, MAX_REPLY_BYTES } from '../../src/protocol/control-channel.ts';
import { ErrorCode, ZebuError } from '../../src/errors.ts';
import { errnoFor, httpStatusFor, Errno } from '../../src/error-status.ts';

async function serve(t: { after: (fn: () => unknown) => void }, handler: http.RequestListener): Promise<string> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'zc-'));
  const socket = path.join(dir, 'control.sock');
  const server = http.createServer(handler);
  await new Promise<void>((resolve) => server.listen(socket, resolve));
  t.after(() => {
    server.closeAllConnections();
    server.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });
  return socket;
}

async function rejectsWith(p: Promise<unknown>, code: ErrorCode, message: RegExp): Promise<void> {
  await assert.rejects(p, (err: unknown) => err instanceof ZebuError && err.code === code && message.test(err.message));
}

test('control channel: a reply, an error reply with our code, and a code we do not know (EIO)', async (t) => {
  const socket = await serve(t, (req, res) => {
    let body = '';
    req.on('data', (c) => (body += c));
    req.on('end', () => {
      if (req.url === '/ok') return res.end(JSON.stringify({ echo: JSON.parse(body || 'null') }));
      res.statusCode = req.url === '/busy' ? 409 : 500;
      res.end(JSON.stringify(req.url === '/busy' ? { error: 'a rebuild runs', code: ErrorCode.BUSY } : { error: 'odd', code: 'ZEBU_ERR_MADE_UP' }));
    });
  });
  assert.deepEqual(await controlRequest(socket, 'POST', '/ok', { a: 1 }), { echo: { a: 1 } });
  await rejectsWith(controlRequest(socket, 'GET', '/busy'), ErrorCode.BUSY, /a rebuild runs/);
  await rejectsWith(controlRequest(socket, 'GET', '/odd'), ErrorCode.EIO, /odd/);
});

test('control channel: bounded — a peer that never answers (TIMEOUT), a reply too large or not JSON (PROTOCOL), no peer (DISCONNECTED)', async (t) => {
  const socket = await serve(t, (req, res) => {
    if (req.url === '/hang') return;
    if (req.url === '/huge') {
      res.write('"');
      const chunk = Buffer.alloc(1024 * 1024, 0x61);
      for (let i = 0; i <= MAX_REPLY_BYTES / chunk.length; i++) res.write(chunk);
      return res.end('"');
    }
    res.end('<html>not json');
  });
  await rejectsWith(controlRequest(socket, 'GET', '/hang', undefined, { timeoutMs: 200, peer: 'engine control socket' }), ErrorCode.TIMEOUT, /engine control socket .*GET \/hang got no answer in 200 ms/);
  await rejectsWith(controlRequest(socket, 'GET', '/huge'), ErrorCode.PROTOCOL, /over 16777216 bytes/);
  await rejectsWith(controlRequest(socket, 'GET', '/html'), ErrorCode.PROTOCOL, /not JSON/);
  await rejectsWith(controlRequest(path.join(path.dirname(socket), 'absent.sock'), 'GET', '/'), ErrorCode.DISCONNECTED, /cannot reach control socket/);
});

test('one table maps every error code to an HTTP status and an errno', () => {
  for (const code of Object.values(ErrorCode)) {
    const status = httpStatusFor(code);
    assert.ok(status >= 400 && status <= 599, `${code}: ${status}`);
    assert.ok((Object.values(Errno) as number[]).includes(errnoFor(code)), code);
  }
  assert.equal(httpStatusFor(ErrorCode.EINVAL), 400);
  assert.equal(httpStatusFor(ErrorCode.UNSUPPORTED), 501);
  assert.equal(httpStatusFor(ErrorCode.TIMEOUT), 503, 'unavailable for now: worth a retry');
  assert.equal(errnoFor(ErrorCode.ENOSPC), Errno.ENOSPC);
  assert.equal(errnoFor(ErrorCode.CLOSED), Errno.ESHUTDOWN);
  assert.equal(errnoFor(ErrorCode.FENCED), Errno.EIO);
});
