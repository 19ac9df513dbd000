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
import { ZebuError, ErrorCode, toZebuError } from '../errors.ts';
import { httpStatusFor } from '../error-status.ts';
import { readJsonBody, sendJson, listenTcp, closeHttp } from '../protocol/http-json.ts';

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
        (body) => sendJson(res, 200, body),
        (err) => {
          const e = toZebuError(err);
          sendJson(res, e.code === ErrorCode.UNAUTHORIZED ? 401 : httpStatusFor(e.code), { error: e.message, code: e.code });
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
    return listenTcp(this.server, host, port);
  }

  close(): Promise<void> {
    return closeHttp(this.server);
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
    const body = (await readJsonBody(req, MAX_BODY_BYTES)) as { method?: unknown; path?: unknown; body?: unknown };
    if (typeof body.method !== 'string' || !METHODS.has(body.method)) throw new ZebuError(ErrorCode.EINVAL, 'body field "method" must be GET, POST, PUT or DELETE');
    if (typeof body.path !== 'string' || !/^\/v1\/[A-Za-z0-9._~%/-]*$/.test(body.path)) throw new ZebuError(ErrorCode.EINVAL, 'body field "path" must be a path of the engine\'s control interface (/v1/...)');
    return this.options.engineRequest(volume, body.method, body.path, body.body);
  }
}
