/**
 * An assertion failure is a bug, never an error reply: the server does not answer the request,
 * its process stops, and its supervisor starts it again — which serves.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { ProcessSupervisor } from '../../src/agent/process-supervisor.ts';
import { DataClient } from '../../src/protocol/client.ts';
import { ErrorCode, ZebuError } from '../../src/errors.ts';
import { tempDir } from '../support/tmp.ts';
import { waitFor } from '../support/zebu-up.ts';

const SERVER = path.join(path.dirname(fileURLToPath(import.meta.url)), '../support/asserting-server.ts');

test('a broken invariant stops the server process (no EIO reply) and its supervisor restarts it', async (t) => {
  const dir = tempDir(t);
  const portFile = path.join(dir, 'port');
  const sup = new ProcessSupervisor({
    recordDir: path.join(dir, 'procs'), logDir: path.join(dir, 'logs'), main: SERVER, pollMs: 50, backoffMsMin: 50, backoffMsMax: 400, log: () => {},
  });
  t.after(async () => {
    await sup.stop('s');
    sup.detach();
  });
  sup.ensure('s', [portFile]);
  await waitFor('the server listening', () => fs.existsSync(portFile) && sup.get('s')?.state === 'running', 20_000, 20);
  const firstPid = sup.get('s')!.pid;
  const client = await DataClient.connect({ host: '127.0.0.1', port: Number(fs.readFileSync(portFile, 'utf8')), secret: Buffer.alloc(32, 7) });
  fs.rmSync(portFile);
  const err = await client.write(0, Buffer.alloc(4096, 1)).then(() => null, (e: unknown) => e as ZebuError);
  assert.ok(err !== null, 'the write did not succeed');
  assert.equal(err.code, ErrorCode.DISCONNECTED, `no error reply, the connection ended: ${err.message}`);
  client.close();

  await waitFor('the supervisor to restart it', () => {
    const view = sup.get('s')!;
    return view.restarts >= 1 && view.state === 'running' && view.pid !== firstPid && fs.existsSync(portFile);
  }, 20_000, 20);
  const log = fs.readFileSync(path.join(dir, 'logs', 's.log'), 'utf8');
  assert.match(log, /AssertionFailure|assertion failed: a planted broken invariant/, 'the stack is in the process log');
  // The new process serves.
  const again = await DataClient.connect({ host: '127.0.0.1', port: Number(fs.readFileSync(portFile, 'utf8')), secret: Buffer.alloc(32, 7) });
  await again.ping();
  again.close();
});
