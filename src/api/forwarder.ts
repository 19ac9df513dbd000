/**
 * The API on a node that does not lead (a cluster on etcd): every request is passed on to the
 * leader's API as it came (method, path, token, body) and its answer passed back, so that the CLI
 * and scripts on any node work against their own node's address. With no leader (an election
 * under way) or a leader that cannot be reached, the answer is 503 with the reason, in the API's
 * error shape. The leader's address comes from the store (`leaderApi`), looked up per request.
 */
import http from 'node:http';
import { once } from 'node:events';
import { ErrorCode } from '../errors.ts';
import { errorBody } from './http-errors.ts';
import { sendJson, listenTcp, closeHttp } from '../protocol/http-json.ts';

const MAX_BODY_BYTES = 64 * 1024 * 1024;
const FORWARD_TIMEOUT_MS = 6 * 3600_000; // a verify through the API answers after minutes
/** Request headers passed on; the rest (host, connection, ...) are the forwarder's own. */
const PASSED_HEADERS = ['authorization', 'content-type', 'accept'];

export interface ApiForwarderOptions {
  nodeId: string;
  /** The leader's API URL, or null when no node leads now. */
  leaderApi: () => Promise<string | null>;
}

export class ApiForwarder {
  private readonly server: http.Server;
  private readonly options: ApiForwarderOptions;

  constructor(options: ApiForwarderOptions) {
    this.options = options;
    this.server = http.createServer((req, res) => {
      this.forward(req, res).catch((err) => {
        if (!res.headersSent) unavailable(res, `node ${options.nodeId} could not pass the request on to the leader: ${(err as Error).message}`);
        else res.destroy();
      });
    });
    this.server.requestTimeout = 0;
  }

  listen(host: string, port: number): Promise<number> {
    return listenTcp(this.server, host, port);
  }

  close(): Promise<void> {
    return closeHttp(this.server);
  }

  private async forward(req: http.IncomingMessage, res: http.ServerResponse): Promise<void> {
    const chunks: Buffer[] = [];
    let size = 0;
    for await (const chunk of req) {
      size += (chunk as Buffer).length;
      if (size > MAX_BODY_BYTES) {
        sendJson(res, 413, errorBody(ErrorCode.EINVAL, `request body over ${MAX_BODY_BYTES} bytes`));
        return;
      }
      chunks.push(chunk as Buffer);
    }
    const leader = await this.options.leaderApi();
    if (leader === null) {
      unavailable(res, `node ${this.options.nodeId} does not lead, and no node leads right now (an election is under way): try again in a few seconds`);
      return;
    }
    const headers: Record<string, string> = {};
    for (const name of PASSED_HEADERS) {
      const value = req.headers[name];
      if (typeof value === 'string') headers[name] = value;
    }
    // The answer is passed on as it comes (a followed stream never ends); a caller that goes away ends it.
    const callerGone = new AbortController();
    res.once('close', () => callerGone.abort());
    let answer: Response;
    try {
      answer = await fetch(`${leader}${req.url ?? '/'}`, {
        method: req.method, headers, body: size > 0 ? Buffer.concat(chunks) : undefined, redirect: 'manual',
        signal: AbortSignal.any([AbortSignal.timeout(FORWARD_TIMEOUT_MS), callerGone.signal]),
      });
    } catch (err) {
      const e = err as Error;
      unavailable(res, `node ${this.options.nodeId} does not lead, and the leader's API at ${leader} cannot be reached: ${(e.cause as Error | undefined)?.message ?? e.message}`);
      return;
    }
    const out: Record<string, string> = { 'x-zebu-leader': leader };
    for (const name of ['content-type', 'content-length', 'cache-control']) {
      const value = answer.headers.get(name);
      if (value !== null) out[name] = value;
    }
    res.writeHead(answer.status, out);
    if (answer.body === null) {
      res.end();
      return;
    }
    try {
      for await (const chunk of answer.body) {
        if (!res.write(chunk)) await once(res, 'drain', { signal: callerGone.signal });
      }
      res.end();
    } catch {
      // The leader went away mid-answer, or the caller did: the caller sees the answer cut short.
      res.destroy();
    }
  }
}

function unavailable(res: http.ServerResponse, message: string): void {
  sendJson(res, 503, errorBody(ErrorCode.BUSY, message));
}
