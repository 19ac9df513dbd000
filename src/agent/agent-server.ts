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
 *
 * Only requests to the engine's control interface pass; the engine checks them as it checks its
 * own callers. One with no or a wrong token is refused (401) before its body is read.
 */
import http from 'node:http';
import crypto from 'node:crypto';
import { ZebuError, ErrorCode, toZebuError } from '../errors.ts';
import { httpStatusFor } from '../error-status.ts';

const MAX_BODY_BYTES = 1024 * 1024;
const VOLUME_NAME = /^[a-z0-9][a-z0-9._-]{0,62}$/;
const METHODS = new Set(['GET', 'POST', 'PUT', 'DELETE']);

export interface AgentServerOptions {
  nodeId: string;
  token: string;
  engineRequest: (volume: string, method: string, path: string, body?: unknown) => Promise<unknown>;
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
    const given = /^Bearer (.+)$/.exec(req.headers.authorization ?? '')?.[1];
    if (given === undefined || !crypto.timingSafeEqual(crypto.createHash('sha256').update(given).digest(), this.tokenHash)) {
      req.resume();
      throw new ZebuError(ErrorCode.UNAUTHORIZED, 'a bearer token (the cluster\'s API token) is needed');
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
