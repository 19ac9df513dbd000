/**
 * An S3-compatible server for tests (s3rver) on 127.0.0.1, in this process, with one bucket.
 * `stop()` takes it away (connections refused) and `start()` brings it back on the same port and
 * data; `failNext(n, status)` answers the next n requests with that HTTP status.
 */
import http from 'node:http';
import net from 'node:net';
import fs from 'node:fs';
import path from 'node:path';
import S3rver from 's3rver';

export interface TestS3 {
  endpoint: string;
  bucket: string;
  credentials: { accessKeyId: string; secretAccessKey: string };
  /** Objects stored, for looking at the bucket from the outside (key -> file). */
  dir: string;
  failNext(count: number, status?: number): void | Promise<void>;
  requests(): number;
  stop(): Promise<void>;
  start(): Promise<void>;
  close(): Promise<void>;
}

export async function startTestS3(root: string, bucket = 'zebu-backups'): Promise<TestS3> {
  const dir = path.join(root, 's3');
  fs.mkdirSync(dir, { recursive: true });
  const server = new S3rver({ port: 0, address: '127.0.0.1', silent: true, directory: dir, configureBuckets: [{ name: bucket }] });
  const info = (await server.run()) as { port: number };
  // A proxy in front of it: the port tests use, which can refuse connections or fail requests.
  let failing = 0;
  let failStatus = 500;
  let count = 0;
  const sockets = new Set<net.Socket>();
  const proxy = http.createServer((req, res) => {
    count++;
    if (failing > 0) {
      failing--;
      req.resume();
      res.writeHead(failStatus, { 'content-type': 'application/xml' });
      res.end(`<?xml version="1.0" encoding="UTF-8"?><Error><Code>InternalError</Code><Message>injected by the test</Message></Error>`);
      return;
    }
    const upstream = http.request({ host: '127.0.0.1', port: info.port, method: req.method, path: req.url, headers: req.headers }, (up) => {
      res.writeHead(up.statusCode ?? 502, up.headers);
      up.pipe(res);
    });
    upstream.on('error', () => res.destroy());
    req.pipe(upstream);
  });
  proxy.on('connection', (s) => {
    sockets.add(s);
    s.on('close', () => sockets.delete(s));
  });
  await new Promise<void>((resolve) => proxy.listen(0, '127.0.0.1', resolve));
  const port = (proxy.address() as net.AddressInfo).port;
  let listening = true;
  const stop = async (): Promise<void> => {
    if (!listening) return;
    listening = false;
    for (const s of sockets) s.destroy();
    await new Promise<void>((resolve) => proxy.close(() => resolve()));
  };
  return {
    endpoint: `http://127.0.0.1:${port}`,
    bucket,
    credentials: { accessKeyId: 'S3RVER', secretAccessKey: 'S3RVER' },
    dir: path.join(dir, bucket),
    failNext(n, status = 500) {
      failing = n;
      failStatus = status;
    },
    requests: () => count,
    stop,
    async start() {
      if (listening) return;
      await new Promise<void>((resolve) => proxy.listen(port, '127.0.0.1', resolve));
      listening = true;
    },
    async close() {
      await stop();
      await server.close();
    },
  };
}

/**
 * The same server in a child process, for tests whose own process blocks (spawnSync of the CLI):
 * an in-process server could not answer meanwhile. Controlled over the IPC channel.
 */
export async function startTestS3Process(root: string, bucket = 'zebu-backups'): Promise<TestS3> {
  const { fork } = await import('node:child_process');
  const child = fork(new URL(import.meta.url), ['--serve', root, bucket], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
  child.on('error', () => {}); // a send racing the kill at the end
  let requestsSeen = 0;
  const ask = (message: Record<string, unknown>): Promise<Record<string, unknown>> =>
    new Promise((resolve, reject) => {
      const onMessage = (answer: Record<string, unknown>): void => {
        if (answer.requests !== undefined) requestsSeen = answer.requests as number;
        child.off('exit', onExit);
        resolve(answer);
      };
      const onExit = (): void => reject(new Error('the S3 test server exited'));
      child.once('message', onMessage);
      child.once('exit', onExit);
      child.send(message);
    });
  const ready = await ask({ op: 'ready' });
  return {
    endpoint: ready.endpoint as string,
    bucket,
    credentials: ready.credentials as TestS3['credentials'],
    dir: ready.dir as string,
    failNext: async (count, status = 500) => void (await ask({ op: 'failNext', count, status })),
    requests: () => requestsSeen,
    stop: async () => void (await ask({ op: 'stop' })),
    start: async () => void (await ask({ op: 'start' })),
    close: async () => {
      if (child.exitCode !== null || child.signalCode !== null) return;
      const exited = new Promise((resolve) => child.once('exit', resolve));
      child.kill('SIGKILL');
      await exited;
    },
  };
}

if (process.argv[2] === '--serve' && process.send !== undefined) {
  const server = await startTestS3(process.argv[3], process.argv[4]);
  process.on('message', (message: { op: string; count?: number; status?: number }) => {
    const answer = async (): Promise<Record<string, unknown>> => {
      switch (message.op) {
        case 'ready':
          return { endpoint: server.endpoint, credentials: server.credentials, dir: server.dir };
        case 'failNext':
          server.failNext(message.count ?? 1, message.status);
          return {};
        case 'stop':
          await server.stop();
          return {};
        case 'start':
          await server.start();
          return {};
      }
      return {};
    };
    void answer().then((a) => process.send!({ ...a, requests: server.requests() }));
  });
  process.on('disconnect', () => process.exit(0));
}
