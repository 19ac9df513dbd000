/**
 * The listening socket a supervisor keeps across frontend restarts (src/frontend/kept-listener.ts):
 * a client that connects while no process accepts waits in the backlog and is served by the next
 * process; an address in use is refused at once, clearly.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import net from 'node:net';
import path from 'node:path';
import { keepTcpListener, keepUnixListener, type KeptListener } from '../../src/frontend/kept-listener.ts';
import { ZebuError, ErrorCode } from '../../src/errors.ts';
import { tempDir } from '../support/tmp.ts';

/** A child that accepts on fd 3 and answers each connection with its own name. */
function acceptor(listener: KeptListener, name: string): Promise<ChildProcess> {
  const child = spawn(process.execPath, ['-e', `
    const net = require('node:net');
    const server = net.createServer((c) => c.end(${JSON.stringify(name)}));
    server.listen({ fd: 3 }, () => console.log('listening'));
  `], { stdio: ['ignore', 'pipe', 'inherit', listener.fd] });
  return new Promise((resolve, reject) => {
    child.stdout!.once('data', () => resolve(child));
    child.once('exit', (code) => reject(new Error(`acceptor exited ${code}`)));
  });
}

function ask(connect: () => net.Socket): Promise<string> {
  return new Promise((resolve, reject) => {
    const socket = connect();
    let text = '';
    socket.on('data', (d) => (text += d.toString()));
    socket.once('end', () => resolve(text));
    socket.once('error', reject);
  });
}

async function stopped(child: ChildProcess): Promise<void> {
  const exited = new Promise((r) => child.once('exit', r));
  child.kill('SIGKILL');
  await exited;
}

for (const kind of ['tcp', 'unix'] as const) {
  test(`${kind}: a connection made while no process accepts waits and is served by the next one`, async (t) => {
    const dir = tempDir(t);
    const socketPath = path.join(dir, 'nbd.sock');
    const listener = kind === 'tcp' ? keepTcpListener('127.0.0.1', 0) : keepUnixListener(socketPath);
    t.after(() => listener.close());
    const connect = (): net.Socket => (kind === 'tcp' ? net.connect(Number(listener.address.split(':')[1]), '127.0.0.1') : net.connect(socketPath));
    const first = await acceptor(listener, 'first');
    assert.equal(await ask(connect), 'first');
    await stopped(first);
    // Nobody accepts now: the connection waits instead of being refused.
    const waiting = ask(connect);
    await new Promise((r) => setTimeout(r, 300));
    const second = await acceptor(listener, 'second');
    t.after(() => second.kill('SIGKILL'));
    assert.equal(await waiting, 'second');
  });
}

test('an address in use is refused at once with EADDRINUSE, nothing half-bound', async (t) => {
  const taken = net.createServer();
  await new Promise<void>((resolve) => taken.listen(0, '127.0.0.1', resolve));
  t.after(() => taken.close());
  const port = (taken.address() as net.AddressInfo).port;
  assert.throws(() => keepTcpListener('127.0.0.1', port), (err: unknown) => err instanceof ZebuError && err.code === ErrorCode.BUSY && /EADDRINUSE/.test(err.message));
  assert.throws(() => keepTcpListener('not-an-ip', 0), /must be an IP address/);
  // Bound on a free port, it reports the port it got.
  const free = keepTcpListener('127.0.0.1', 0);
  t.after(() => free.close());
  assert.match(free.address, /^127\.0\.0\.1:[1-9]\d*$/);
});
