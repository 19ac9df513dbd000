/**
 * The frontend's control interface: HTTP/JSON on a UNIX socket (same style as the engine's),
 * used by the node agent to add and remove the exports of the volumes attached on this node.
 *
 *   GET    /v1/info                    {pid, nbdAddress, nbdSocket, exports}
 *   GET    /v1/exports                 [ExportView]
 *   GET    /v1/exports/NAME            ExportView (404 when absent)
 *   PUT    /v1/exports/NAME            {"engineSocket": "/abs/path", "holdTimeoutMs"?, "hangTimeoutMs"?,
 *                                      "stallTimeoutMs"?}: add, or replace when the socket differs;
 *                                      the same socket again only applies the deadlines
 *   ExportView = {name, sizeBytes, engineSocket, connections, outstanding, engineConnected,
 *                 link: {state: OPEN|CLOSE|REOPENING, stateSince, reopens, reissued, hangs,
 *                 longestHoldMs, held, lastClose, engine}, timeouts}
 *   DELETE /v1/exports/NAME            drain and remove: {removed, connections, drained}
 *   POST   /v1/exports/NAME/refresh    re-read the size from the engine: ExportView
 *
 * Errors: {"error": message, "code": ZEBU_ERR_...} with 400 (bad input), 404 (no such export or
 * route), 405 (method), 409 (busy), 502 (engine refused us), 503 (engine unreachable), 500.
 */
import http from 'node:http';
import { httpStatusFor } from '../error-status.ts';
import { ZebuError, ErrorCode, toZebuError, invalid } from '../errors.ts';
import { listenOnUnixSocket } from '../protocol/unix-socket.ts';
import type { Frontend } from './frontend.ts';
import type { LinkTimeouts } from './engine-link.ts';

/** The deadlines a PUT may set for one export's engine link. */
const TIMEOUT_FIELDS = ['holdTimeoutMs', 'hangTimeoutMs', 'stallTimeoutMs'] as const satisfies readonly (keyof LinkTimeouts)[];
const MAX_TIMEOUT_MS = 24 * 3600_000;

const MAX_BODY_BYTES = 64 * 1024;
const MAX_CONTROL_CONNECTIONS = 64;
/** Time for a client to send its whole request (not for us to answer it). */
const REQUEST_RECEIVE_TIMEOUT_MS = 30_000;

/** Errors that mean "this path exists, not with this method": 405 rather than the code's status. */
const METHOD_NOT_ALLOWED = new WeakSet<ZebuError>();

function statusFor(err: ZebuError): number {
  return METHOD_NOT_ALLOWED.has(err) ? 405 : httpStatusFor(err.code);
}

async function readJsonObject(req: http.IncomingMessage): Promise<Record<string, unknown>> {
  const declared = Number(req.headers['content-length'] ?? 0);
  if (declared > MAX_BODY_BYTES) throw invalid(`request body over ${MAX_BODY_BYTES} bytes`);
  let size = 0;
  const chunks: Buffer[] = [];
  for await (const chunk of req) {
    size += (chunk as Buffer).length;
    if (size > MAX_BODY_BYTES) throw invalid(`request body over ${MAX_BODY_BYTES} bytes`);
    chunks.push(chunk as Buffer);
  }
  let body: unknown;
  try {
    body = JSON.parse(Buffer.concat(chunks).toString('utf8'));
  } catch {
    throw invalid('request body is not JSON');
  }
  if (typeof body !== 'object' || body === null || Array.isArray(body)) throw invalid('request body must be a JSON object');
  return body as Record<string, unknown>;
}

function exportNameFrom(encoded: string): string {
  try {
    return decodeURIComponent(encoded);
  } catch {
    throw invalid('export name in the path is not valid percent-encoding', 'name');
  }
}

export class FrontendControlServer {
  private readonly server: http.Server;
  private readonly frontend: Frontend;

  constructor(frontend: Frontend) {
    this.frontend = frontend;
    this.server = http.createServer({ requestTimeout: REQUEST_RECEIVE_TIMEOUT_MS }, (req, res) => {
      this.handle(req).then(
        (body) => this.send(res, 200, body),
        (err) => {
          const e = toZebuError(err);
          if (!req.complete) {
            // The body was refused unread (too long): answer, discard the rest, close.
            res.shouldKeepAlive = false;
            req.resume();
          }
          this.send(res, statusFor(e), { error: e.message, code: e.code, ...(e.field !== undefined ? { field: e.field } : {}) });
        },
      );
    });
    this.server.maxConnections = MAX_CONTROL_CONNECTIONS;
  }

  private send(res: http.ServerResponse, status: number, body: unknown): void {
    if (res.headersSent || res.destroyed) return;
    const text = JSON.stringify(body ?? {});
    res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) });
    res.end(text);
  }

  private async handle(req: http.IncomingMessage): Promise<unknown> {
    const url = new URL(req.url ?? '/', 'http://frontend');
    const method = req.method ?? 'GET';
    const pathName = url.pathname;
    if (pathName === '/v1/info') {
      if (method !== 'GET') throw methodNotAllowed(method, pathName);
      return this.frontend.info();
    }
    if (pathName === '/v1/exports') {
      if (method !== 'GET') throw methodNotAllowed(method, pathName);
      return this.frontend.exportViews();
    }
    const refresh = /^\/v1\/exports\/([^/]+)\/refresh$/.exec(pathName);
    if (refresh !== null) {
      if (method !== 'POST') throw methodNotAllowed(method, pathName);
      return this.frontend.refreshExport(exportNameFrom(refresh[1]));
    }
    const one = /^\/v1\/exports\/([^/]+)$/.exec(pathName);
    if (one !== null) {
      const name = exportNameFrom(one[1]);
      if (method === 'GET') return this.frontend.exportView(name);
      if (method === 'DELETE') return this.frontend.removeExport(name);
      if (method === 'PUT') {
        const body = await readJsonObject(req);
        const unknown = Object.keys(body).filter((k) => k !== 'engineSocket' && !(TIMEOUT_FIELDS as readonly string[]).includes(k));
        if (unknown.length > 0) throw invalid(`unknown body field ${JSON.stringify(unknown[0])}; expected {"engineSocket": PATH, ${TIMEOUT_FIELDS.map((f) => `"${f}"?: MS`).join(', ')}}`, unknown[0]);
        if (typeof body.engineSocket !== 'string' || body.engineSocket === '') throw invalid('body field "engineSocket" must be a non-empty string', 'engineSocket');
        const timeouts: Partial<LinkTimeouts> = {};
        for (const field of TIMEOUT_FIELDS) {
          const value = body[field];
          if (value === undefined) continue;
          if (typeof value !== 'number' || !Number.isSafeInteger(value) || value < 1 || value > MAX_TIMEOUT_MS) {
            throw invalid(`body field "${field}" must be a whole number of milliseconds from 1 to ${MAX_TIMEOUT_MS}`, field);
          }
          timeouts[field] = value;
        }
        return this.frontend.putExport(name, body.engineSocket, { timeouts });
      }
      throw methodNotAllowed(method, pathName);
    }
    throw new ZebuError(ErrorCode.NOT_FOUND, `no route ${method} ${pathName.slice(0, 200)}`);
  }

  listen(socketPath: string): Promise<void> {
    return listenOnUnixSocket(this.server, socketPath);
  }

  close(): void {
    this.server.close();
    this.server.closeAllConnections();
  }
}

function methodNotAllowed(method: string, pathName: string): ZebuError {
  const err = new ZebuError(ErrorCode.UNSUPPORTED, `method ${method.slice(0, 20)} not allowed on ${pathName.slice(0, 200)}`);
  METHOD_NOT_ALLOWED.add(err);
  return err;
}
