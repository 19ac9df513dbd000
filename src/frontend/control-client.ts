/**
 * Client of the frontend's control socket (control-server.ts), for the node agent and the CLI.
 * Every call has a deadline; a failed call rejects with a ZebuError carrying the server's code
 * (NOT_FOUND for an absent export, EINVAL for bad input, DISCONNECTED when the engine socket was
 * not reachable in time, or DISCONNECTED/TIMEOUT when the frontend itself is not reachable).
 */
import { ZebuError, ErrorCode } from '../errors.ts';
import { controlRequest } from '../protocol/control-channel.ts';
import type { ExportView, FrontendInfo, RemoveResult } from './frontend.ts';
import type { LinkTimeouts } from './engine-link.ts';

export type { ExportView, FrontendInfo, RemoveResult } from './frontend.ts';

/** Reads answer at once; changes may wait for an engine (10 s) and a drain (10 s). */
const READ_TIMEOUT_MS = 10_000;
const CHANGE_TIMEOUT_MS = 60_000;

/** One request on the frontend's control socket (the bounded control channel). */
export function frontendControlRequest(
  socketPath: string,
  method: string,
  pathName: string,
  options: { body?: unknown; timeoutMs?: number } = {},
): Promise<unknown> {
  return controlRequest(socketPath, method, pathName, options.body, { timeoutMs: options.timeoutMs ?? READ_TIMEOUT_MS, peer: 'frontend control socket' });
}

const exportPath = (name: string): string => `/v1/exports/${encodeURIComponent(name)}`;

/** Typed calls on one frontend's control socket. */
export class FrontendControlClient {
  readonly socketPath: string;

  constructor(socketPath: string) {
    this.socketPath = socketPath;
  }

  /** GET /v1/info */
  async info(): Promise<FrontendInfo> {
    return (await frontendControlRequest(this.socketPath, 'GET', '/v1/info')) as FrontendInfo;
  }

  /** GET /v1/exports */
  async listExports(): Promise<ExportView[]> {
    return (await frontendControlRequest(this.socketPath, 'GET', '/v1/exports')) as ExportView[];
  }

  /** GET /v1/exports/NAME; null when the frontend has no such export. */
  async getExport(name: string): Promise<ExportView | null> {
    try {
      return (await frontendControlRequest(this.socketPath, 'GET', exportPath(name))) as ExportView;
    } catch (err) {
      if (err instanceof ZebuError && err.code === ErrorCode.NOT_FOUND) return null;
      throw err;
    }
  }

  /**
   * PUT /v1/exports/NAME: serve NAME from the engine at `engineSocket` (absolute path).
   * Idempotent; a different socket replaces the export (old clients drained, then disconnected).
   */
  async putExport(name: string, engineSocket: string, timeouts: Partial<LinkTimeouts> = {}): Promise<ExportView> {
    return (await frontendControlRequest(this.socketPath, 'PUT', exportPath(name), { body: { engineSocket, ...timeouts }, timeoutMs: CHANGE_TIMEOUT_MS })) as ExportView;
  }

  /**
   * DELETE /v1/exports/NAME: answers once the export's in-flight requests were answered (or the
   * drain deadline passed) and its clients disconnected. Null when there was no such export.
   */
  async removeExport(name: string): Promise<RemoveResult | null> {
    try {
      return (await frontendControlRequest(this.socketPath, 'DELETE', exportPath(name), { timeoutMs: CHANGE_TIMEOUT_MS })) as RemoveResult;
    } catch (err) {
      if (err instanceof ZebuError && err.code === ErrorCode.NOT_FOUND) return null;
      throw err;
    }
  }

  /** POST /v1/exports/NAME/refresh: re-read the size from the engine (after an online expand). */
  async refreshExport(name: string): Promise<ExportView> {
    return (await frontendControlRequest(this.socketPath, 'POST', `${exportPath(name)}/refresh`, { timeoutMs: CHANGE_TIMEOUT_MS })) as ExportView;
  }
}
