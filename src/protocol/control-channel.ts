/**
 * The client side of the control sockets (the engine's and the frontend's: HTTP with JSON bodies
 * over a UNIX socket), for the agent and the CLI. One bounded channel:
 *
 * - every call has a deadline (TIMEOUT): a hung process must not hang its caller;
 * - a reply is read up to MAX_REPLY_BYTES (a verify report with its differences is the largest);
 *   more is PROTOCOL, as is a reply that is not JSON;
 * - an error reply `{"error": MESSAGE, "code": CODE}` becomes a ZebuError with that code when it
 *   is one of ours, else EIO — a peer cannot make us throw a code we do not know;
 * - a socket that cannot be reached is DISCONNECTED.
 */
import http from 'node:http';
import { ZebuError, ErrorCode } from '../errors.ts';

export const MAX_REPLY_BYTES = 16 * 1024 * 1024;
/** Default deadline of one call; long operations (verify) pass more. */
export const CONTROL_TIMEOUT_MS = 30_000;

const KNOWN_CODES = new Set<string>(Object.values(ErrorCode));

export interface ControlCallOptions {
  timeoutMs?: number;
  /** What the socket is, for messages ("frontend control socket"). */
  peer?: string;
}

/** One request on a control socket; resolves with the parsed JSON reply. */
export function controlRequest(socketPath: string, method: string, pathName: string, body?: unknown, options: ControlCallOptions = {}): Promise<unknown> {
  const timeoutMs = options.timeoutMs ?? CONTROL_TIMEOUT_MS;
  const peer = options.peer ?? 'control socket';
  return new Promise((resolve, reject) => {
    const payload = body === undefined ? undefined : JSON.stringify(body);
    let settled = false;
    const settle = (err: ZebuError | null, value?: unknown): void => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      if (err !== null) reject(err);
      else resolve(value);
    };
    const req = http.request(
      { socketPath, method, path: pathName, agent: false, headers: payload !== undefined ? { 'content-type': 'application/json', 'content-length': Buffer.byteLength(payload) } : {} },
      (res) => {
        const chunks: Buffer[] = [];
        let size = 0;
        res.on('data', (c: Buffer) => {
          size += c.length;
          if (size > MAX_REPLY_BYTES) {
            settle(new ZebuError(ErrorCode.PROTOCOL, `reply from ${peer} ${socketPath} over ${MAX_REPLY_BYTES} bytes`));
            req.destroy();
            return;
          }
          chunks.push(c);
        });
        res.on('error', () => {});
        res.on('end', () => {
          let parsed: unknown;
          try {
            parsed = JSON.parse(Buffer.concat(chunks).toString('utf8'));
          } catch {
            return settle(new ZebuError(ErrorCode.PROTOCOL, `bad reply from ${peer} ${socketPath}: not JSON`));
          }
          const status = res.statusCode ?? 500;
          if (status >= 400) {
            const e = (parsed ?? {}) as { error?: unknown; code?: unknown };
            const code = typeof e.code === 'string' && KNOWN_CODES.has(e.code) ? (e.code as ErrorCode) : ErrorCode.EIO;
            return settle(new ZebuError(code, typeof e.error === 'string' ? e.error : `HTTP ${status} from ${peer} ${socketPath}`));
          }
          settle(null, parsed);
        });
      },
    );
    const timer = setTimeout(() => {
      settle(new ZebuError(ErrorCode.TIMEOUT, `${peer} ${socketPath}: ${method} ${pathName} got no answer in ${timeoutMs} ms`));
      req.destroy();
    }, timeoutMs);
    req.on('error', (err) => settle(new ZebuError(ErrorCode.DISCONNECTED, `cannot reach ${peer} ${socketPath}: ${err.message}`, { cause: err })));
    req.end(payload);
  });
}
