/**
 * The leader's side of the agents on other nodes (agent-server.ts): engine control requests, and
 * data connections to an engine through the agent's tunnel, each to the agent endpoint the node
 * wrote in its Node object. Used by the manager for volumes attached on another node than its own.
 */
import net from 'node:net';
import { ZebuError, ErrorCode } from '../errors.ts';
import type { ConnectTarget, ReadInto, StreamSocket, Transport } from '../protocol/transport.ts';
import { DataClient } from '../protocol/client.ts';
import { readSecretFile } from '../protocol/auth.ts';
import { Kind, type Objects } from '../cluster/objects.ts';
import { ENGINE_REQUEST_TIMEOUT_MS, VERIFY_TIMEOUT_MS } from './agent.ts';

/** What the manager needs of other nodes' engines. */
export class RemoteEngines {
  private readonly objects: Objects;
  private readonly token: string;
  private readonly secretFile: string;

  constructor(objects: Objects, token: string, secretFile: string) {
    this.objects = objects;
    this.token = token;
    this.secretFile = secretFile;
  }

  /** An engine control request to the agent of `node`. */
  async request(node: string, volume: string, method: string, pathName: string, body: unknown): Promise<unknown> {
    const endpoint = await this.endpointOf(node);
    const timeoutMs = (pathName === '/v1/verify' ? VERIFY_TIMEOUT_MS : ENGINE_REQUEST_TIMEOUT_MS) + 10_000;
    return remoteEngineRequest(endpoint, this.token, node, volume, method, pathName, body, timeoutMs);
  }

  /** A data connection to the engine of `volume` on `node`, through its agent. */
  async openData(node: string, volume: string): Promise<DataClient> {
    const at = splitEndpoint(await this.endpointOf(node));
    return DataClient.connect({
      host: at.host, port: at.port, secret: readSecretFile(this.secretFile), peerLabel: `engine of ${volume} on node ${node} (through its agent)`,
      requestTimeoutMs: ENGINE_REQUEST_TIMEOUT_MS, transport: engineTunnelTransport(at, this.token, volume, node),
    });
  }

  private async endpointOf(node: string): Promise<string> {
    const endpoint = (await this.objects.get(Kind.Node, node))?.value.status.agentEndpoint ?? null;
    if (endpoint === null) throw new ZebuError(ErrorCode.UNSUPPORTED, `node ${node} has no agent endpoint this manager can reach (is it on the same store?)`);
    return endpoint;
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
