/**
 * The running volume's small control interface: HTTP/JSON on a UNIX socket, used by
 * `zebu engine …` commands and later by the manager.
 *
 *   GET    /v1/info               engine, size, replicas (modes, rebuild progress), rebuilding, stats
 *   GET    /v1/replicas           replica list with modes
 *   POST   /v1/replicas           {"address": "HOST:PORT"}: add a new empty replica and rebuild it
 *                                 (returns at once; progress in /v1/replicas); 409 while one rebuilds
 *   DELETE /v1/replicas/ADDRESS   take a replica out (not the last RW one)
 *   POST   /v1/expand             {"sizeBytes": N}: online expansion; returns /v1/info
 *   GET    /v1/stats              I/O counters
 *   GET    /v1/snapshots          snapshots
 *   POST   /v1/snapshots          {"name": "..."}: create (drains, flushes, snapshots every replica)
 *   DELETE /v1/snapshots/NAME     delete
 *   POST   /v1/snapshots/NAME/revert   revert the volume to the snapshot (drains first)
 */
import http from 'node:http';
import { ZebuError, ErrorCode, toZebuError } from '../errors.ts';
import type { Engine } from './engine.ts';
import { listenOnUnixSocket } from '../protocol/unix-socket.ts';

const MAX_BODY_BYTES = 64 * 1024;

function statusFor(err: ZebuError): number {
  switch (err.code) {
    case ErrorCode.EINVAL:
      return 400;
    case ErrorCode.NOT_FOUND:
      return 404;
    case ErrorCode.EXISTS:
    case ErrorCode.BUSY:
    case ErrorCode.CONFLICT:
      return 409;
    case ErrorCode.ENOSPC:
      return 507;
    default:
      return 500;
  }
}

async function readBody(req: http.IncomingMessage): Promise<unknown> {
  let size = 0;
  const chunks: Buffer[] = [];
  for await (const chunk of req) {
    size += (chunk as Buffer).length;
    if (size > MAX_BODY_BYTES) throw new ZebuError(ErrorCode.EINVAL, `request body over ${MAX_BODY_BYTES} bytes`);
    chunks.push(chunk as Buffer);
  }
  if (size === 0) return {};
  try {
    return JSON.parse(Buffer.concat(chunks).toString('utf8'));
  } catch {
    throw new ZebuError(ErrorCode.EINVAL, 'request body is not JSON');
  }
}

export class EngineControlServer {
  private readonly server: http.Server;
  private readonly engine: Engine;

  constructor(engine: Engine) {
    this.engine = engine;
    this.server = http.createServer((req, res) => {
      this.handle(req).then(
        (body) => this.send(res, 200, body),
        (err) => {
          const e = toZebuError(err);
          this.send(res, statusFor(e), { error: e.message, code: e.code });
        },
      );
    });
  }

  private send(res: http.ServerResponse, status: number, body: unknown): void {
    const text = JSON.stringify(body ?? {});
    res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) });
    res.end(text);
  }

  private async handle(req: http.IncomingMessage): Promise<unknown> {
    const url = new URL(req.url ?? '/', 'http://engine');
    const route = `${req.method} ${url.pathname}`;
    if (route === 'GET /v1/info') return this.engine.info();
    if (route === 'GET /v1/replicas') return this.engine.replicaStatus();
    if (route === 'GET /v1/stats') return this.engine.stats;
    if (route === 'GET /v1/snapshots') return this.engine.snapshotList();
    if (route === 'POST /v1/snapshots') {
      const body = (await readBody(req)) as { name?: unknown };
      if (typeof body.name !== 'string') throw new ZebuError(ErrorCode.EINVAL, 'body field "name" must be a string');
      return this.engine.snapshotCreate(body.name);
    }
    if (route === 'POST /v1/replicas') {
      const body = (await readBody(req)) as { address?: unknown };
      if (typeof body.address !== 'string') throw new ZebuError(ErrorCode.EINVAL, 'body field "address" must be a string HOST:PORT');
      return this.engine.addReplica(body.address);
    }
    const removeReplica = /^DELETE \/v1\/replicas\/([^/]+)$/.exec(route);
    if (removeReplica) return this.engine.removeReplica(decodeURIComponent(removeReplica[1]));
    if (route === 'POST /v1/expand') {
      const body = (await readBody(req)) as { sizeBytes?: unknown };
      if (typeof body.sizeBytes !== 'number') throw new ZebuError(ErrorCode.EINVAL, 'body field "sizeBytes" must be a number');
      return this.engine.expand(body.sizeBytes);
    }
    const revert = /^POST \/v1\/snapshots\/([^/]+)\/revert$/.exec(route);
    if (revert) {
      await this.engine.snapshotRevert(decodeURIComponent(revert[1]));
      return { reverted: decodeURIComponent(revert[1]) };
    }
    const del = /^DELETE \/v1\/snapshots\/([^/]+)$/.exec(route);
    if (del) {
      await this.engine.snapshotDelete(decodeURIComponent(del[1]));
      return { deleted: decodeURIComponent(del[1]) };
    }
    throw new ZebuError(ErrorCode.NOT_FOUND, `no route ${route}`);
  }

  listen(socketPath: string): Promise<void> {
    return listenOnUnixSocket(this.server, socketPath);
  }

  close(): void {
    this.server.close();
    this.server.closeAllConnections();
  }
}

/** Client side of the control interface (for the CLI). */
export function controlRequest(socketPath: string, method: string, pathName: string, body?: unknown): Promise<unknown> {
  return new Promise((resolve, reject) => {
    const payload = body === undefined ? undefined : JSON.stringify(body);
    const req = http.request(
      { socketPath, method, path: pathName, headers: payload ? { 'content-type': 'application/json', 'content-length': Buffer.byteLength(payload) } : {} },
      (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('end', () => {
          let parsed: unknown;
          try {
            parsed = JSON.parse(Buffer.concat(chunks).toString('utf8'));
          } catch {
            return reject(new ZebuError(ErrorCode.PROTOCOL, `bad reply from ${socketPath}`));
          }
          if ((res.statusCode ?? 500) >= 400) {
            const e = parsed as { error?: string; code?: string };
            return reject(new ZebuError((e.code as ErrorCode) ?? ErrorCode.EIO, e.error ?? `HTTP ${res.statusCode}`));
          }
          resolve(parsed);
        });
      },
    );
    req.on('error', (err) => reject(new ZebuError(ErrorCode.DISCONNECTED, `cannot reach engine control socket ${socketPath}: ${err.message}`)));
    req.end(payload);
  });
}
