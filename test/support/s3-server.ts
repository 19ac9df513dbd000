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
  failNext(count: number, status?: number): void;
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
