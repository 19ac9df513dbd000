/**
 * A node agent's endpoint for the leader's manager on another node (a cluster on etcd): the
 * manager asks the engines it does not run itself — a snapshot, a revert, a verify of a volume
 * attached on this node — through it. HTTP/JSON over TCP on the node's address, with the
 * cluster's API token as a bearer token (every node holds it: it comes from the store).
 *
 *   POST /v1/engines/VOLUME/request  {"method": "GET"|"POST"|"PUT"|"DELETE", "path": "/v1/...", "body"?: any}
 *                                    -> the engine control socket's answer, or {"error", "code"}
 *                                       with its HTTP status (as the engine gave it)
 *   GET  /healthz                    {"node": NAME} (no token needed)
 *   GET  /v1/engines/VOLUME/data     with "Upgrade: zebu-data": answered 101, then the connection
 *                                    is the engine's data socket (backups read a volume attached
 *                                    here, restores write it); the data protocol's own handshake
 *                                    (the cluster's data secret) follows inside
 *
 * Only requests to the engine's control interface pass; the engine checks them as it checks its
 * own callers. One with no or a wrong token is refused (401) before its body is read.
 */
import http from 'node:http';
import net from 'node:net';
import crypto from 'node:crypto';
import type { Duplex } from 'node:stream';
import type { ConnectTarget, ReadInto, StreamSocket, Transport } from '../protocol/transport.ts';
import { ZebuError, ErrorCode, toZebuError } from '../errors.ts';
import { httpStatusFor } from '../error-status.ts';

const MAX_BODY_BYTES = 1024 * 1024;
const VOLUME_NAME = /^[a-z0-9][a-z0-9._-]{0,62}$/;
const METHODS = new Set(['GET', 'POST', 'PUT', 'DELETE']);

export interface AgentServerOptions {
  nodeId: string;
  token: string;
  engineRequest: (volume: string, method: string, path: string, body?: unknown) => Promise<unknown>;
  /** The UNIX socket of the volume's engine on this node (throws when it does not run here). */
  engineDataSocket: (volume: string) => string;
}

/** The HTTP head a refused tunnel gets, with the error as JSON. */
function refuse(socket: Duplex, err: ZebuError): void {
  const status = err.code === ErrorCode.UNAUTHORIZED ? 401 : httpStatusFor(err.code);
  const body = JSON.stringify({ error: err.message, code: err.code });
  socket.end(`HTTP/1.1 ${status} ${http.STATUS_CODES[status] ?? 'Error'}\r\ncontent-type: application/json\r\ncontent-length: ${Buffer.byteLength(body)}\r\nconnection: close\r\n\r\n${body}`);
}

export class AgentServer {
  private readonly server: http.Server;
  private readonly options: AgentServerOptions;
  private readonly tokenHash: Buffer;

  constructor(options: AgentServerOptions) {
    this.options = options;
    this.tokenHash = crypto.createHash('sha256').update(options.token).digest();
    this.server = http.createServer((req, res) => {
      this.handle(req).then(
        (body) => send(res, 200, body),
        (err) => {
          const e = toZebuError(err);
          send(res, e.code === ErrorCode.UNAUTHORIZED ? 401 : httpStatusFor(e.code), { error: e.message, code: e.code });
        },
      );
    });
    this.server.requestTimeout = 0; // a verify answers after minutes
    this.server.on('upgrade', (req, socket, head) => this.tunnel(req, socket, head));
  }

  /** An engine data tunnel: checked, then piped both ways to the engine's UNIX socket. */
  private tunnel(req: http.IncomingMessage, socket: Duplex, head: Buffer): void {
    socket.on('error', () => {});
    let volume: string;
    try {
      this.checkToken(req);
      const m = /^\/v1\/engines\/([^/]+)\/data$/.exec(new URL(req.url ?? '/', 'http://agent').pathname);
      if (req.method !== 'GET' || m === null || req.headers.upgrade !== 'zebu-data') throw new ZebuError(ErrorCode.NOT_FOUND, `no tunnel at ${req.method} ${req.url}`);
      volume = decodeURIComponent(m[1]);
      if (!VOLUME_NAME.test(volume)) throw new ZebuError(ErrorCode.EINVAL, `volume name ${JSON.stringify(volume)} is not valid`);
    } catch (err) {
      refuse(socket, toZebuError(err));
      return;
    }
    let engine: net.Socket;
    try {
      engine = net.createConnection({ path: this.options.engineDataSocket(volume) });
    } catch (err) {
      refuse(socket, toZebuError(err));
      return;
    }
    engine.once('error', (err) => {
      if (!socket.destroyed) refuse(socket, new ZebuError(ErrorCode.BUSY, `the engine of volume ${volume} on node ${this.options.nodeId}: ${err.message}`));
    });
    engine.once('connect', () => {
      engine.removeAllListeners('error');
      engine.on('error', () => socket.destroy());
      socket.write('HTTP/1.1 101 Switching Protocols\r\nupgrade: zebu-data\r\nconnection: upgrade\r\n\r\n');
      if (head.length > 0) engine.write(head);
      socket.pipe(engine);
      engine.pipe(socket);
      socket.on('close', () => engine.destroy());
      engine.on('close', () => socket.destroy());
    });
  }

  private checkToken(req: http.IncomingMessage): void {
    const given = /^Bearer (.+)$/.exec(req.headers.authorization ?? '')?.[1];
    if (given === undefined || !crypto.timingSafeEqual(crypto.createHash('sha256').update(given).digest(), this.tokenHash)) {
      throw new ZebuError(ErrorCode.UNAUTHORIZED, 'a bearer token (the cluster\'s API token) is needed');
    }
  }

  /** Listens on HOST:PORT (port 0: any); resolves with the port. */
  listen(host: string, port: number): Promise<number> {
    return new Promise((resolve, reject) => {
      this.server.once('error', reject);
      this.server.listen(port, host, () => {
        this.server.off('error', reject);
        resolve((this.server.address() as { port: number }).port);
      });
    });
  }

  close(): Promise<void> {
    return new Promise((resolve) => {
      this.server.close(() => resolve());
      this.server.closeAllConnections();
    });
  }

  private async handle(req: http.IncomingMessage): Promise<unknown> {
    const url = new URL(req.url ?? '/', 'http://agent');
    if (req.method === 'GET' && url.pathname === '/healthz') return { node: this.options.nodeId };
    try {
      this.checkToken(req);
    } catch (err) {
      req.resume();
      throw err;
    }
    const m = /^\/v1\/engines\/([^/]+)\/request$/.exec(url.pathname);
    if (req.method !== 'POST' || m === null) {
      req.resume();
      throw new ZebuError(ErrorCode.NOT_FOUND, `no route ${req.method} ${url.pathname}`);
    }
    let volume: string;
    try {
      volume = decodeURIComponent(m[1]);
    } catch {
      throw new ZebuError(ErrorCode.EINVAL, 'bad escape in the volume name');
    }
    if (!VOLUME_NAME.test(volume)) throw new ZebuError(ErrorCode.EINVAL, `volume name ${JSON.stringify(volume)} is not valid`);
    const body = (await readBody(req)) as { method?: unknown; path?: unknown; body?: unknown };
    if (typeof body.method !== 'string' || !METHODS.has(body.method)) throw new ZebuError(ErrorCode.EINVAL, 'body field "method" must be GET, POST, PUT or DELETE');
    if (typeof body.path !== 'string' || !/^\/v1\/[A-Za-z0-9._~%/-]*$/.test(body.path)) throw new ZebuError(ErrorCode.EINVAL, 'body field "path" must be a path of the engine\'s control interface (/v1/...)');
    return this.options.engineRequest(volume, body.method, body.path, body.body);
  }
}

function send(res: http.ServerResponse, status: number, body: unknown): void {
  const text = JSON.stringify(body ?? {});
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) });
  res.end(text);
}

async function readBody(req: http.IncomingMessage): Promise<unknown> {
  let size = 0;
  const chunks: Buffer[] = [];
  for await (const chunk of req) {
    size += (chunk as Buffer).length;
    if (size > MAX_BODY_BYTES) throw new ZebuError(ErrorCode.EINVAL, `request body over ${MAX_BODY_BYTES} bytes`);
    chunks.push(chunk as Buffer);
  }
  try {
    return JSON.parse(Buffer.concat(chunks).toString('utf8'));
  } catch {
    throw new ZebuError(ErrorCode.EINVAL, 'request body is not JSON');
  }
}

/**
 * The manager's side: an engine request to the agent of another node at `endpoint` (HOST:PORT).
 * Its errors come back as the engine's (same code); an agent that cannot be reached is
 * DISCONNECTED, one that does not answer within `timeoutMs` TIMEOUT.
 */
export async function remoteEngineRequest(endpoint: string, token: string, node: string, volume: string, method: string, path: string, body: unknown, timeoutMs: number): Promise<unknown> {
  let res: Response;
  try {
    res = await fetch(`http://${endpoint}/v1/engines/${encodeURIComponent(volume)}/request`, {
      method: 'POST',
      headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' },
      body: JSON.stringify({ method, path, body }),
      signal: AbortSignal.timeout(timeoutMs),
    });
  } catch (err) {
    const e = err as Error;
    if (e.name === 'TimeoutError') throw new ZebuError(ErrorCode.TIMEOUT, `the agent of node ${node} (${endpoint}) did not answer within ${timeoutMs} ms`);
    throw new ZebuError(ErrorCode.DISCONNECTED, `the agent of node ${node} (${endpoint}) cannot be reached: ${(e.cause as Error | undefined)?.message ?? e.message}`);
  }
  const text = await res.text();
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch {
    throw new ZebuError(ErrorCode.PROTOCOL, `the agent of node ${node} answered ${res.status} with no JSON`);
  }
  if (res.ok) return parsed;
  const { error, code } = (parsed ?? {}) as { error?: unknown; code?: unknown };
  const known = typeof code === 'string' && (Object.values(ErrorCode) as string[]).includes(code) ? (code as ErrorCode) : ErrorCode.EIO;
  throw new ZebuError(known, typeof error === 'string' ? error : `the agent of node ${node} answered ${res.status}`);
}

/**
 * The manager's side of an engine data tunnel: a Transport (for DataClient) whose connections go
 * to the agent at `endpoint`, ask for the tunnel to `volume`'s engine, and hand the data protocol
 * every byte after the agent's 101. A refused tunnel fails the connection with the agent's reason.
 */
export function engineTunnelTransport(endpoint: { host: string; port: number }, token: string, volume: string, node: string): Transport {
  return {
    connect(_target: ConnectTarget, readInto: ReadInto): StreamSocket {
      let head: Buffer | null = Buffer.alloc(0);
      let socket: net.Socket | null = null;
      const wrapped: ReadInto = {
        buffer: () => readInto.buffer(),
        callback: (nread, buf) => {
          if (head === null) return readInto.callback(nread, buf);
          head = Buffer.concat([head, Buffer.from(buf.subarray(0, nread))]);
          const end = head.indexOf('\r\n\r\n');
          if (end < 0) {
            if (head.length > 16 * 1024) socket?.destroy(new Error(`the agent of node ${node} sent no tunnel answer`));
            return true;
          }
          const status = /^HTTP\/1\.1 (\d{3})/.exec(head.subarray(0, end).toString('latin1'))?.[1];
          if (status !== '101') {
            let reason = `HTTP ${status ?? '?'}`;
            try {
              reason = (JSON.parse(head.subarray(end + 4).toString('utf8')) as { error?: string }).error ?? reason;
            } catch {
              // a partial or missing body: the status says enough
            }
            socket?.destroy(new Error(`the agent of node ${node} refused the data tunnel to ${volume}'s engine: ${reason}`));
            return false;
          }
          // What came after the agent's answer is the engine's: into a buffer the receiver lent.
          const rest = head.subarray(end + 4);
          head = null;
          if (rest.length === 0) return true;
          const into = readInto.buffer();
          rest.copy(into, 0);
          return readInto.callback(rest.length, into);
        },
      };
      socket = net.createConnection({ host: endpoint.host, port: endpoint.port, noDelay: true, onread: wrapped });
      socket.write(`GET /v1/engines/${encodeURIComponent(volume)}/data HTTP/1.1\r\nhost: ${endpoint.host}:${endpoint.port}\r\nauthorization: Bearer ${token}\r\nupgrade: zebu-data\r\nconnection: upgrade\r\n\r\n`);
      return socket;
    },
  };
}

/** HOST:PORT (an IPv6 host in brackets) as its parts. */
export function splitEndpoint(endpoint: string): { host: string; port: number } {
  const m = /^(?:\[([^\]]+)\]|([^:]+)):(\d+)$/.exec(endpoint);
  if (m === null) throw new ZebuError(ErrorCode.EINVAL, `agent endpoint ${JSON.stringify(endpoint)} is not HOST:PORT`);
  return { host: m[1] ?? m[2], port: Number(m[3]) };
}
