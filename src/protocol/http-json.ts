/**
 * The small HTTP/JSON servers of the processes (an engine's control socket, an agent's endpoint,
 * the API forwarder) share these: a bounded JSON body, a JSON answer, listen and close.
 */
import http from 'node:http';
import { ZebuError, ErrorCode } from '../errors.ts';

/** The request's JSON body ({} when empty); EINVAL past `maxBytes` or when it is not JSON. */
export async function readJsonBody(req: http.IncomingMessage, maxBytes: number): Promise<unknown> {
  let size = 0;
  const chunks: Buffer[] = [];
  for await (const chunk of req) {
    size += (chunk as Buffer).length;
    if (size > maxBytes) throw new ZebuError(ErrorCode.EINVAL, `request body over ${maxBytes} bytes`);
    chunks.push(chunk as Buffer);
  }
  if (size === 0) return {};
  try {
    return JSON.parse(Buffer.concat(chunks).toString('utf8'));
  } catch {
    throw new ZebuError(ErrorCode.EINVAL, 'request body is not JSON');
  }
}

export function sendJson(res: http.ServerResponse, status: number, body: unknown): void {
  const text = JSON.stringify(body ?? {});
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) });
  res.end(text);
}

/** Listens on HOST:PORT (port 0: any); resolves with the port. */
export function listenTcp(server: http.Server, host: string, port: number): Promise<number> {
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, host, () => {
      server.off('error', reject);
      resolve((server.address() as { port: number }).port);
    });
  });
}

/** Stops listening and ends the connections still open. */
export function closeHttp(server: http.Server): Promise<void> {
  return new Promise((resolve) => {
    server.close(() => resolve());
    server.closeAllConnections();
  });
}
