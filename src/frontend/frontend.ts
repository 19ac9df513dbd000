/**
 * The node's NBD frontend: one NBD listener (TCP and/or UNIX socket) serving every volume
 * attached on this node, by export name. Exports are added, replaced, refreshed and removed at
 * run time (by the node agent, through the control socket: control-server.ts); each export is an
 * EngineLink to that volume's engine.
 *
 * The data path does not depend on whoever manages the exports: once added, an export is served
 * until it is removed or the process stops, whatever happens to the agent.
 *
 * Changes to one export name are serialized (a queue per name), so a restarted agent that
 * repeats a request, or two requests that race, see one order of events.
 */
import path from 'node:path';
import { ZebuError, ErrorCode, invalid } from '../errors.ts';
import fs from 'node:fs';
import { EngineLink, type EngineLinkOptions, type LinkTimeouts, type LinkView } from './engine-link.ts';
import type { ProcessIdentity } from '../os/process-identity.ts';
import { NbdServer, type DrainResult } from './nbd-server.ts';

/** Export names are volume names. */
export const EXPORT_NAME = /^[a-z0-9][a-z0-9._-]{0,62}$/;
/** sun_path holds 108 bytes including the terminating NUL. */
export const MAX_SOCKET_PATH_BYTES = 107;
export const MAX_EXPORTS = 1024;
/** Changes queued for one export name beyond this are refused (BUSY). */
const MAX_QUEUED_PER_NAME = 16;

export interface FrontendOptions {
  secret: Buffer;
  /** How long adding an export waits for its engine socket to appear and answer. */
  engineConnectTimeoutMs?: number;
  /** How long removing (or replacing) an export waits for its in-flight requests. */
  drainTimeoutMs?: number;
  /** Deadlines of every engine link (hold, hang, stall); an export may set its own (putExport). */
  linkTimeouts?: Partial<LinkTimeouts>;
  /** How often each link sends its heartbeat PING (tests shorten it). */
  heartbeatIntervalMs?: number;
  /** Kills a hung engine (tests inject one; the default sends SIGKILL). */
  killEngine?: (identity: ProcessIdentity) => boolean;
  /**
   * Where the export table is kept (rewritten at every change). A restarted frontend reads it
   * first (restore()) and serves the same exports at once, before its supervisor re-adds them:
   * a client that reconnects finds its export, and its requests wait for the engine.
   */
  stateFile?: string;
  log?: (event: Record<string, unknown>) => void;
}

/** One export as the control API shows it. */
export interface ExportView {
  name: string;
  sizeBytes: number;
  engineSocket: string;
  /** Open NBD connections on this export. */
  connections: number;
  /** Requests forwarded to the engine and not yet answered (held ones included). */
  outstanding: number;
  engineConnected: boolean;
  /** The engine link: OPEN, CLOSE or REOPENING, and what it went through. */
  link: LinkView;
  timeouts: LinkTimeouts;
}

export interface FrontendInfo {
  pid: number;
  /** "HOST:PORT" actually bound, or null without TCP. */
  nbdAddress: string | null;
  nbdSocket: string | null;
  exports: number;
}

export interface RemoveResult {
  removed: string;
  /** NBD connections that were closed. */
  connections: number;
  /** False when the drain deadline passed with requests still unanswered. */
  drained: boolean;
}

/** The state file: the export table, enough to serve every export again after a restart. */
interface FrontendState {
  version: 1;
  exports: Record<string, { engineSocket: string; sizeBytes: number; timeouts: Partial<LinkTimeouts> }>;
}

function parseState(text: string): FrontendState {
  const state = JSON.parse(text) as FrontendState;
  if (state === null || typeof state !== 'object' || state.version !== 1 || typeof state.exports !== 'object' || state.exports === null) {
    throw new Error('not a frontend state file (version 1)');
  }
  for (const [name, entry] of Object.entries(state.exports)) {
    checkExportName(name);
    checkEngineSocket(entry.engineSocket);
    if (!Number.isSafeInteger(entry.sizeBytes) || entry.sizeBytes < 0) throw new Error(`export ${name}: bad sizeBytes`);
    if (typeof entry.timeouts !== 'object' || entry.timeouts === null) throw new Error(`export ${name}: bad timeouts`);
  }
  return state;
}

/** Throws EINVAL unless `name` is a valid export (volume) name. */
export function checkExportName(name: string): void {
  if (!EXPORT_NAME.test(name)) {
    throw invalid(`export name must be 1-63 of [a-z0-9._-] starting with a letter or digit, got ${JSON.stringify(name.slice(0, 100))}`, 'name');
  }
}

/** Throws EINVAL unless `socketPath` can name an engine's UNIX socket. */
export function checkEngineSocket(socketPath: string): void {
  if (!path.isAbsolute(socketPath)) throw invalid(`engineSocket must be an absolute path, got ${JSON.stringify(socketPath.slice(0, 200))}`, 'engineSocket');
  if (Buffer.byteLength(socketPath) > MAX_SOCKET_PATH_BYTES) {
    throw invalid(`engineSocket is ${Buffer.byteLength(socketPath)} bytes; UNIX socket paths are limited to ${MAX_SOCKET_PATH_BYTES}`, 'engineSocket');
  }
  if (socketPath.includes('\0')) throw invalid('engineSocket contains a NUL byte', 'engineSocket');
}

export class Frontend {
  private readonly nbd: NbdServer;
  private readonly options: Required<Omit<FrontendOptions, 'killEngine' | 'stateFile'>> & Pick<FrontendOptions, 'killEngine' | 'stateFile'>;
  private readonly links = new Map<string, EngineLink>();
  /** Tail of the queue of changes per export name, and its length. */
  private readonly queues = new Map<string, { tail: Promise<unknown>; length: number }>();
  private nbdAddress: string | null = null;
  private nbdSocket: string | null = null;
  private closing = false;
  private closed: Promise<void> | null = null;

  constructor(options: FrontendOptions) {
    this.options = {
      engineConnectTimeoutMs: 10_000,
      drainTimeoutMs: 10_000,
      linkTimeouts: {},
      heartbeatIntervalMs: 1000,
      log: () => {},
      ...options,
    };
    this.nbd = new NbdServer({
      registry: { get: (name) => this.links.get(name) ?? null, list: () => [...this.links.values()] },
      log: this.options.log,
    });
  }

  async listenTcp(host: string, port: number): Promise<string> {
    const address = await this.nbd.listenTcp(host, port);
    this.nbdAddress = address.family === 'IPv6' ? `[${address.address}]:${address.port}` : `${address.address}:${address.port}`;
    return this.nbdAddress;
  }

  async listenUnix(socketPath: string): Promise<void> {
    await this.nbd.listenUnix(socketPath);
    this.nbdSocket = socketPath;
  }

  /** Listens on an inherited TCP socket (kept by the supervisor); returns the HOST:PORT it is bound to. */
  async listenTcpFd(fd: number): Promise<string> {
    const address = await this.nbd.listenFd(fd);
    if (typeof address === 'string' || address === null) throw new ZebuError(ErrorCode.EINVAL, `inherited descriptor ${fd} is not a TCP socket`);
    this.nbdAddress = address.family === 'IPv6' ? `[${address.address}]:${address.port}` : `${address.address}:${address.port}`;
    return this.nbdAddress;
  }

  /** Listens on an inherited UNIX socket (kept by the supervisor) bound at `socketPath`. */
  async listenUnixFd(fd: number, socketPath: string): Promise<void> {
    await this.nbd.listenFd(fd);
    this.nbdSocket = socketPath;
  }

  info(): FrontendInfo {
    return { pid: process.pid, nbdAddress: this.nbdAddress, nbdSocket: this.nbdSocket, exports: this.links.size };
  }

  exportViews(): ExportView[] {
    return [...this.links.values()].sort((a, b) => (a.name < b.name ? -1 : 1)).map((link) => this.viewOf(link));
  }

  exportView(name: string): ExportView {
    checkExportName(name);
    return this.viewOf(this.linkOf(name));
  }

  /**
   * Serves `name` from the engine at `engineSocket`. Idempotent: the same socket again returns
   * the current view (with `timeouts` applied). Another socket replaces the export: new clients go
   * to the new engine, the old engine's clients get their in-flight requests answered, then are
   * disconnected. The engine socket may not exist yet: it is retried up to `engineConnectTimeoutMs`.
   */
  putExport(name: string, engineSocket: string, options: { engineConnectTimeoutMs?: number; timeouts?: Partial<LinkTimeouts> } = {}): Promise<ExportView> {
    checkExportName(name);
    checkEngineSocket(engineSocket);
    return this.serialize(name, async () => {
      const old = this.links.get(name);
      if (old !== undefined && old.socketPath === engineSocket) {
        // The agent puts every export again at each of its passes: the table is rewritten only on a change.
        if (options.timeouts !== undefined && old.setTimeouts(options.timeouts)) this.saveState();
        return this.viewOf(old);
      }
      if (old === undefined && this.links.size >= MAX_EXPORTS) throw new ZebuError(ErrorCode.BUSY, `this frontend already serves ${MAX_EXPORTS} exports`);
      const link = await this.connectLink(name, engineSocket, options.engineConnectTimeoutMs ?? this.options.engineConnectTimeoutMs, options.timeouts ?? {});
      if (this.closing) {
        link.close();
        throw new ZebuError(ErrorCode.CLOSED, 'frontend is stopping');
      }
      this.links.set(name, link);
      this.saveState();
      this.options.log({ event: old === undefined ? 'export-added' : 'export-replaced', export: name, engineSocket, sizeBytes: link.sizeBytes });
      if (old !== undefined) await this.retire(old);
      return this.viewOf(link);
    });
  }

  /**
   * Stops serving `name`: new handshakes fail at once; in-flight requests are answered (up to
   * `drainTimeoutMs`), then the export's clients are disconnected and its engine link closed.
   */
  removeExport(name: string): Promise<RemoveResult> {
    checkExportName(name);
    return this.serialize(name, async () => {
      const link = this.linkOf(name);
      this.links.delete(name);
      this.saveState();
      const drain = await this.retire(link);
      this.options.log({ event: 'export-removed', export: name, ...drain });
      return { removed: name, connections: drain.connections, drained: drain.drained };
    });
  }

  /** Re-reads the export's size from its engine; connections opened from now on see it. */
  refreshExport(name: string): Promise<ExportView> {
    checkExportName(name);
    return this.serialize(name, async () => {
      const link = this.linkOf(name);
      await link.refreshSize();
      this.saveState();
      return this.viewOf(link);
    });
  }

  /** Stops listening, answers in-flight requests (bounded), closes every client and link. */
  close(): Promise<void> {
    this.closed ??= (async () => {
      this.closing = true;
      await this.nbd.close(this.options.drainTimeoutMs);
      for (const link of this.links.values()) link.close();
      this.links.clear();
    })();
    return this.closed;
  }

  /**
   * Serves again the exports of the state file (a restart of this frontend): each one at once,
   * CLOSE until its engine answers. Call before listening. Returns the names restored; a state
   * file that cannot be read is set aside (logged), never fatal: the supervisor re-adds exports.
   */
  restore(): string[] {
    const file = this.options.stateFile;
    if (file === undefined) return [];
    let state: FrontendState;
    try {
      state = parseState(fs.readFileSync(file, 'utf8'));
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') {
        this.options.log({ event: 'frontend-state-unreadable', file, error: (err as Error).message });
        fs.renameSync(file, `${file}.bad`);
      }
      return [];
    }
    const restored: string[] = [];
    for (const [name, entry] of Object.entries(state.exports)) {
      if (this.links.has(name) || this.links.size >= MAX_EXPORTS) continue;
      try {
        this.links.set(name, EngineLink.restore(this.linkOptions(name, entry.engineSocket, entry.timeouts, 5000), entry.sizeBytes));
        restored.push(name);
      } catch (err) {
        this.options.log({ event: 'export-not-restored', export: name, error: (err as Error).message });
      }
    }
    if (restored.length > 0) this.options.log({ event: 'exports-restored', exports: restored });
    return restored;
  }

  private saveState(): void {
    const file = this.options.stateFile;
    if (file === undefined) return;
    const state: FrontendState = { version: 1, exports: {} };
    for (const link of this.links.values()) state.exports[link.name] = { engineSocket: link.socketPath, sizeBytes: link.sizeBytes, timeouts: link.linkTimeouts };
    try {
      const tmp = `${file}.tmp`;
      fs.writeFileSync(tmp, JSON.stringify(state), { mode: 0o600 });
      fs.renameSync(tmp, file);
    } catch (err) {
      // Only a restart loses by it (its supervisor re-adds the exports): serving goes on.
      this.options.log({ event: 'frontend-state-not-saved', file, error: (err as Error).message });
    }
  }

  private linkOptions(name: string, engineSocket: string, timeouts: Partial<LinkTimeouts>, connectTimeoutMs: number): EngineLinkOptions {
    return {
      name,
      socketPath: engineSocket,
      secret: this.options.secret,
      ...this.options.linkTimeouts,
      ...timeouts,
      heartbeatIntervalMs: this.options.heartbeatIntervalMs,
      ...(this.options.killEngine !== undefined ? { killEngine: this.options.killEngine } : {}),
      connectTimeoutMs,
      log: (event) => this.options.log({ ...event, export: name }),
    };
  }

  private linkOf(name: string): EngineLink {
    const link = this.links.get(name);
    if (link === undefined) throw new ZebuError(ErrorCode.NOT_FOUND, `no export named ${JSON.stringify(name)}`);
    return link;
  }

  private viewOf(link: EngineLink): ExportView {
    return {
      name: link.name,
      sizeBytes: link.sizeBytes,
      engineSocket: link.socketPath,
      connections: this.nbd.connectionsTo(link),
      outstanding: link.outstanding,
      engineConnected: link.engineConnected,
      link: link.view(),
      timeouts: link.linkTimeouts,
    };
  }

  /** The link must already be out of the registry. */
  private async retire(link: EngineLink): Promise<DrainResult> {
    const drain = await this.nbd.drainExport(link, this.options.drainTimeoutMs);
    link.close();
    return drain;
  }

  private async connectLink(name: string, engineSocket: string, timeoutMs: number, timeouts: Partial<LinkTimeouts>): Promise<EngineLink> {
    const deadline = Date.now() + timeoutMs;
    let delayMs = 50;
    let lastError = '';
    for (;;) {
      const leftMs = deadline - Date.now();
      if (this.closing) throw new ZebuError(ErrorCode.CLOSED, 'frontend is stopping');
      try {
        return await EngineLink.connect(this.linkOptions(name, engineSocket, timeouts, Math.max(500, Math.min(5000, leftMs))));
      } catch (err) {
        lastError = (err as Error).message;
        // A wrong secret will not fix itself: say so now rather than after the timeout.
        if (err instanceof ZebuError && err.code === ErrorCode.AUTH) throw err;
      }
      if (Date.now() + delayMs > deadline) break;
      await new Promise((r) => setTimeout(r, delayMs));
      delayMs = Math.min(500, delayMs * 2);
    }
    throw new ZebuError(
      ErrorCode.DISCONNECTED,
      `engine of export ${name} not reachable at ${engineSocket} within ${timeoutMs} ms: ${lastError}`,
    );
  }

  private serialize<T>(name: string, work: () => Promise<T>): Promise<T> {
    const queue = this.queues.get(name) ?? { tail: Promise.resolve(), length: 0 };
    if (queue.length >= MAX_QUEUED_PER_NAME) {
      return Promise.reject(new ZebuError(ErrorCode.BUSY, `${queue.length} changes to export ${name} already queued`));
    }
    queue.length++;
    const result = queue.tail.then(work);
    queue.tail = result.then(
      () => {},
      () => {},
    ).then(() => {
      queue.length--;
      if (queue.length === 0 && this.queues.get(name) === queue) this.queues.delete(name);
    });
    this.queues.set(name, queue);
    return result;
  }
}
