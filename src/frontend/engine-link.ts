/**
 * The frontend's side of the frontend <-> engine socket, for one export. It keeps the table of
 * requests it has forwarded and not yet answered, so that the engine can crash, hang or be
 * restarted without the NBD client seeing anything but latency.
 *
 * The link is in one of three states (the names of the Linux cachefiles on-demand failover model,
 * which this follows: the engine is the user-space daemon that may die):
 *
 *   OPEN       connected to an engine; requests are forwarded at once.
 *   CLOSE      no engine: it died, was killed as hung, or has not started yet. Requests (those in
 *              flight when it went, and new ones) are held; the link keeps trying the socket.
 *   REOPENING  a new engine answered: the held requests were re-issued to it, and new ones follow
 *              them on the same connection; OPEN again once every re-issued request is answered.
 *
 * Re-issuing is safe because reads and writes are idempotent at block level and ordered: a request
 * is re-issued only to a *different* engine process than the one that may still hold it (a hung
 * engine is killed first, and the new engine has a new epoch, so the replicas fence anything the
 * old one still had on the wire).
 *
 * A hung engine (alive, not answering) is told from a slow one by two deadlines: a heartbeat PING
 * unanswered for `hangTimeoutMs` (on a connection of its own, so that it never waits behind
 * requests), or a forwarded request unanswered for `stallTimeoutMs` (longer
 * than the engine's own replica timeout, after which a slow replica is taken out and the request
 * completes). The link then kills the engine process (its pid and start time come with the
 * engine's INFO: the frontend runs on the engine's node), drops the connection and holds every
 * request for the engine its supervisor starts next. The frontend kills it itself rather than
 * asking the supervisor, so that a hung engine is replaced even while the agent is down.
 *
 * Held requests older than `holdTimeoutMs` fail with EIO: the bound on how long a client waits.
 */
import { ZebuError, ErrorCode, assert } from '../errors.ts';
import { DataClient } from '../protocol/client.ts';
import { ioBuffers, LentBuffer } from '../protocol/buffer-pool.ts';
import { Op, OpName, RequestFlag, decodeExtents, READ_REPORT_BYTES, writeU64 } from '../protocol/frames.ts';
import { DirectReads, parseReadView } from './read-view.ts';
import { isAlive, parseIdentity, type ProcessIdentity } from '../os/process-identity.ts';
import { STALL_MS, systemClock, type Clock, type ClockTimer } from '../os/clock.ts';
import type { Transport } from '../protocol/transport.ts';
import type { NbdExport, NbdExtent } from './nbd-server.ts';

export const LinkState = { OPEN: 'OPEN', CLOSE: 'CLOSE', REOPENING: 'REOPENING' } as const;
export type LinkState = (typeof LinkState)[keyof typeof LinkState];

/** Why a link went CLOSE: the engine went away, was found hung (and killed), or the frontend itself restarted. */
export type CloseKind = 'engine-lost' | 'engine-hung' | 'frontend-restarted';

/** The deadlines of a link; every one can be changed while it runs (setTimeouts). */
export interface LinkTimeouts {
  /** Held requests fail with EIO after this long without an engine (default 300 s). */
  holdTimeoutMs: number;
  /** A heartbeat PING unanswered this long means the engine hangs (default 10 s). */
  hangTimeoutMs: number;
  /** A forwarded request unanswered this long means the engine hangs (default 60 s). */
  stallTimeoutMs: number;
}

export const DEFAULT_LINK_TIMEOUTS: LinkTimeouts = { holdTimeoutMs: 300_000, hangTimeoutMs: 10_000, stallTimeoutMs: 60_000 };

export interface EngineLinkOptions extends Partial<LinkTimeouts> {
  name: string;
  socketPath: string;
  secret: Buffer;
  /** Bound on one connect + authenticate attempt. */
  connectTimeoutMs?: number;
  /** How often the heartbeat PING goes out (default 1 s). */
  heartbeatIntervalMs?: number;
  /** Kills a hung engine process (tests inject one); the default sends SIGKILL. True when sent. */
  killEngine?: (identity: ProcessIdentity) => boolean;
  log?: (event: Record<string, unknown>) => void;
  /** Defaults: the real network and the system clock (the simulator passes its own). */
  transport?: Transport;
  clock?: Clock;
}

/** What a link has been through, for the control API, the agent, `zebu volume get` and /metrics. */
export interface LinkView {
  state: LinkState;
  /** When the link entered its state (ISO time). */
  stateSince: string;
  /** Times a new engine was reached after the link was CLOSE (the first connection not counted). */
  reopens: number;
  /** Requests re-issued to a new engine. */
  reissued: number;
  /** Engines found hung (heartbeat or stall) and killed. */
  hangs: number;
  /** Longest a re-issued request waited, from when it was first sent to its answer. */
  longestHoldMs: number;
  /** Requests held now (no engine to send them to). */
  held: number;
  /** The last time the engine went away: why, and what was held then. */
  lastClose: { at: string; kind: CloseKind; cause: string; outstanding: number } | null;
  /** The engine process connected now (null while CLOSE, or when it does not say). */
  engine: ProcessIdentity | null;
  /** Reads served from the replicas of the read view, not through the engine (read-view.ts). */
  directReads: number;
}

interface Forwarded {
  op: number;
  flags: number;
  offset: number;
  length: number;
  payload: Buffer;
  callback: (err: ZebuError | null, data: Buffer) => void;
  /** When the request was first sent (or held). */
  sinceMs: number;
  /** Re-issued at least once (its answer counts towards longestHoldMs). */
  reissued: boolean;
  /**
   * A payload lent from ioBuffers (writeLent), held by the request until its answer and by every
   * engine connection it was sent on until that lets go of it; null for a payload not lent.
   */
  loan: LentBuffer | null;
}

const EMPTY = Buffer.alloc(0);
const MAX_TABLE = 65536;
/** Reconnect attempts to a missing engine socket cost nothing: try often, the client is waiting. */
const RECONNECT_DELAY_MS_MAX = 100;
/** Direct reads are reported to the engine this often while there are some (its counters, its "clients busy"). */
const READ_REPORT_MS = 250;
/** A READ_VIEW that failed for a reason of its own is asked again after this long. */
const VIEW_RETRY_MS = 1000;

function sizeFromInfo(info: unknown, socketPath: string): number {
  const sizeBytes = (info as { sizeBytes?: unknown } | null)?.sizeBytes;
  if (typeof sizeBytes !== 'number' || !Number.isSafeInteger(sizeBytes) || sizeBytes < 0) {
    throw new ZebuError(ErrorCode.PROTOCOL, `engine at ${socketPath} reported no valid sizeBytes in INFO`);
  }
  return sizeBytes;
}

function sameProcess(a: ProcessIdentity | null, b: ProcessIdentity | null): boolean {
  return a !== null && b !== null && a.pid === b.pid && a.startTime === b.startTime;
}

/** SIGKILL to a process, only when it is still the one named (pid and start time). */
export function killProcess(identity: ProcessIdentity): boolean {
  if (identity.pid === process.pid || !isAlive(identity)) return false;
  try {
    process.kill(identity.pid, 'SIGKILL');
    return true;
  } catch {
    return false;
  }
}

export class EngineLink implements NbdExport {
  readonly name: string;
  readonly description: string;
  sizeBytes = 0;
  private readonly options: Required<Omit<EngineLinkOptions, keyof LinkTimeouts | 'transport' | 'clock'>>;
  private readonly transport: Transport | undefined;
  private readonly clock: Clock;
  private timeouts: LinkTimeouts;
  private client: DataClient | null = null;
  /** The heartbeat's own connection to the same engine (null until made, or after it dropped). */
  private pinger: DataClient | null = null;
  /**
   * The engine connection a heartbeat connection is being made for. One being made for an engine
   * given up since (it hung; its connect may wait until the process dies) does not hold up the next
   * engine's heartbeat.
   */
  private pingerConnectingFor: DataClient | null = null;
  /** The engine process behind `client`, as its INFO said. */
  private engine: ProcessIdentity | null = null;
  /**
   * An engine not to send anything again: found hung (it may still hold the requests), or
   * superseded by a newer epoch (it answers FENCED to everything).
   */
  private refusedEngine: ProcessIdentity | null = null;
  private readonly table = new Set<Forwarded>();
  private held: Forwarded[] = [];
  /** Re-issued requests not yet answered: REOPENING lasts until they are. */
  private reissuedOutstanding = 0;
  private state: LinkState = LinkState.CLOSE;
  private stateSinceMs: number;
  /** Wall time of the same moment, for the view. */
  private stateSinceWallMs = Date.now();
  private reconnecting = false;
  private closed = false;
  private everConnected = false;
  private holdTimer: ClockTimer | null = null;
  private heartbeatTimer: ClockTimer | null = null;
  /** When the heartbeat PING in flight was sent (0: none in flight). */
  private pingSentAtMs = 0;
  /** Of the time since then, how long this process itself did not run (not the engine's fault). */
  private pingStalledMs = 0;
  private lastHeartbeatTickMs = 0;
  private readonly counters = { reopens: 0, reissued: 0, hangs: 0, longestHoldMs: 0 };
  private lastClose: LinkView['lastClose'] = null;
  /** Reads served from the replicas themselves, under the engine's read view. */
  private readonly direct: DirectReads;
  private reportTimer: ClockTimer | null = null;
  /** READ_VIEW failed last time (logged once until it works again). */
  private viewFailing = false;

  private constructor(options: EngineLinkOptions) {
    const { transport, clock, ...rest } = options;
    // An option given as undefined takes its default too.
    this.options = {
      ...rest,
      connectTimeoutMs: rest.connectTimeoutMs ?? 5000,
      heartbeatIntervalMs: rest.heartbeatIntervalMs ?? 1000,
      killEngine: rest.killEngine ?? killProcess,
      log: rest.log ?? (() => {}),
    };
    this.transport = transport;
    this.clock = clock ?? systemClock;
    this.stateSinceMs = this.clock.nowMs();
    this.timeouts = { ...DEFAULT_LINK_TIMEOUTS };
    this.setTimeouts(options);
    this.name = options.name;
    this.description = `Zebu volume ${options.name}`;
    this.direct = new DirectReads({
      name: options.name, secret: options.secret, transport, clock: this.clock, log: this.options.log,
      // Sent ahead of the read it failed, on the same connection: the engine has taken the replica out when the read arrives.
      replicaFailed: (replica, err) => this.client?.send(Op.READ_FAILED, 0, 0, 0, Buffer.from(JSON.stringify({ ...replica, error: err.message })), () => {}),
    });
  }

  /** A link with its first engine connection up (fails when the engine cannot be reached now). */
  static async connect(options: EngineLinkOptions): Promise<EngineLink> {
    const link = new EngineLink(options);
    try {
      await link.connectOnce();
    } catch (err) {
      link.close();
      throw err;
    }
    link.state = LinkState.OPEN;
    link.stateSinceMs = link.clock.nowMs();
    link.stateSinceWallMs = Date.now();
    link.startHeartbeat();
    return link;
  }

  /**
   * A link brought back from the frontend's state file after the frontend restarted: CLOSE, with
   * the size the export had, trying the engine socket until an engine answers. Clients can
   * connect at once (they are told that size); their requests are held until then.
   */
  static restore(options: EngineLinkOptions, sizeBytes: number): EngineLink {
    assert(Number.isSafeInteger(sizeBytes) && sizeBytes >= 0, 'restored export size');
    const link = new EngineLink(options);
    link.sizeBytes = sizeBytes;
    // Its first engine is a reopening: whatever the frontend had in flight before is gone with it.
    link.everConnected = true;
    link.lastClose = { at: new Date().toISOString(), kind: 'frontend-restarted', cause: 'the frontend restarted', outstanding: 0 };
    link.startHeartbeat();
    void link.reconnect();
    return link;
  }

  /** Changes the deadlines (undefined fields keep theirs). */
  /** Sets the deadlines given; whether any changed. */
  setTimeouts(timeouts: Partial<LinkTimeouts>): boolean {
    const next = { ...this.timeouts };
    for (const key of Object.keys(DEFAULT_LINK_TIMEOUTS) as (keyof LinkTimeouts)[]) {
      const value = timeouts[key];
      if (value === undefined) continue;
      if (!Number.isSafeInteger(value) || value < 1) throw new ZebuError(ErrorCode.EINVAL, `${key} must be a positive number of milliseconds, got ${value}`);
      next[key] = value;
    }
    const changed = (Object.keys(next) as (keyof LinkTimeouts)[]).some((key) => next[key] !== this.timeouts[key]);
    this.timeouts = next;
    return changed;
  }

  get linkTimeouts(): LinkTimeouts {
    return { ...this.timeouts };
  }

  get outstanding(): number {
    return this.table.size;
  }

  get socketPath(): string {
    return this.options.socketPath;
  }

  /** True while a connection to the engine is up (false while it restarts). */
  get engineConnected(): boolean {
    return this.client !== null;
  }

  get linkState(): LinkState {
    return this.state;
  }

  view(): LinkView {
    return {
      state: this.state,
      stateSince: new Date(this.stateSinceWallMs).toISOString(),
      ...this.counters,
      longestHoldMs: Math.round(this.counters.longestHoldMs),
      held: this.held.length,
      lastClose: this.lastClose,
      engine: this.engine,
      directReads: this.direct.total,
    };
  }

  /** Reads the engine's size again (after an online expand); returns it. */
  async refreshSize(): Promise<number> {
    const client = this.client;
    if (this.closed) throw new ZebuError(ErrorCode.CLOSED, `export ${this.name} is closed`);
    if (client === null) throw new ZebuError(ErrorCode.DISCONNECTED, `engine of export ${this.name} is not connected (restarting?); try again`);
    const sizeBytes = sizeFromInfo(await client.info(), this.options.socketPath);
    if (sizeBytes !== this.sizeBytes) this.options.log({ event: 'export-size-changed', fromBytes: this.sizeBytes, toBytes: sizeBytes });
    this.sizeBytes = sizeBytes;
    return sizeBytes;
  }

  private setState(state: LinkState, details: Record<string, unknown> = {}): void {
    if (this.state === state) return;
    const fromMs = this.stateSinceMs;
    this.options.log({ event: 'link-state', from: this.state, to: state, afterMs: this.clock.nowMs() - fromMs, ...details });
    this.state = state;
    this.stateSinceMs = this.clock.nowMs();
    this.stateSinceWallMs = Date.now();
  }

  private connectClient(requestTimeoutMs: number): Promise<DataClient> {
    return DataClient.connect({
      path: this.options.socketPath,
      peerLabel: 'engine',
      secret: this.options.secret,
      requestTimeoutMs,
      connectTimeoutMs: this.options.connectTimeoutMs,
      transport: this.transport,
      clock: this.clock,
    });
  }

  private async connectOnce(): Promise<void> {
    // Past stallTimeoutMs a request counts as stalled: the engine is treated as hung (never an error to the client).
    const client = await this.connectClient(this.timeouts.stallTimeoutMs);
    let sizeBytes: number;
    let engine: ProcessIdentity | null;
    try {
      const info = await client.info();
      sizeBytes = sizeFromInfo(info, this.options.socketPath);
      engine = parseIdentity((info as { process?: unknown } | null)?.process);
    } catch (err) {
      client.close();
      throw err;
    }
    if (this.closed) {
      // Closed while this attempt was under way: nothing may be left connected.
      client.close();
      throw new ZebuError(ErrorCode.CLOSED, `export ${this.name} is closed`);
    }
    if (sameProcess(engine, this.refusedEngine)) {
      // The hung engine still answers on a new connection (it could not be killed): it may still
      // run the requests we hold. A superseded one serves nothing. Wait for another one.
      client.close();
      throw new ZebuError(ErrorCode.BUSY, `engine process ${engine!.pid} was found hung or superseded and is still there; waiting for a new engine`);
    }
    this.sizeBytes = sizeBytes;
    this.client = client;
    this.engine = engine;
    this.pingSentAtMs = 0;
    if (this.everConnected) this.counters.reopens++;
    this.everConnected = true;
    client.onClose((err) => {
      if (this.client !== client) return; // already replaced or dropped (see lost())
      this.lost('engine-lost', `engine disconnected: ${err.message}`);
    });
    this.watchView(client);
  }

  // ---- read view -----------------------------------------------------------------------------

  /**
   * Asks the engine for its read view, and again each time it answers: the answer comes when the
   * view changes (a replica withdrawn: handled before any later reply on this connection, see
   * read-view.ts) or after a hold of a quarter of the stall deadline, so it never counts as stalled.
   */
  private watchView(client: DataClient): void {
    const holdMs = Math.max(1, Math.floor(this.timeouts.stallTimeoutMs / 4));
    client.send(Op.READ_VIEW, 0, this.direct.heldGeneration, holdMs, EMPTY, (err, data) => {
      if (this.client !== client || this.closed) return;
      if (err === null) {
        try {
          this.direct.adopt(parseReadView(data));
        } catch (e) {
          err = e as ZebuError;
        }
      }
      if (err === null) {
        this.viewFailing = false;
        return this.watchView(client);
      }
      // Without a view every read goes through the engine. An engine that has none to give
      // (UNSUPPORTED) is not asked again; a connection that broke is handled by lost().
      this.direct.drop();
      if (err.code === ErrorCode.UNSUPPORTED || err.code === ErrorCode.DISCONNECTED || err.code === ErrorCode.CLOSED) return;
      // Said once per run of failures: it is asked again every second.
      if (!this.viewFailing) this.options.log({ event: 'read-view-failed', error: err.message });
      this.viewFailing = true;
      this.clock.setTimeout(() => {
        if (this.client === client && !this.closed) this.watchView(client);
      }, VIEW_RETRY_MS).unref();
    });
  }

  /** Sends the engine what was read directly since the last report (its stats and "clients busy"). */
  private reportReads(): void {
    this.reportTimer = null;
    const client = this.client;
    const counts = this.direct.counts;
    if (client === null || counts.reads === 0) return;
    const payload = Buffer.allocUnsafe(READ_REPORT_BYTES);
    writeU64(payload, counts.reads, 0);
    writeU64(payload, counts.bytes, 8);
    writeU64(payload, counts.micros, 16);
    counts.reads = counts.bytes = counts.micros = 0;
    client.send(Op.READ_REPORT, 0, 0, 0, payload, () => {});
  }

  /** The engine connection is gone (or given up as hung): hold what is in flight, reconnect. */
  private lost(kind: CloseKind, cause: string): void {
    const client = this.client;
    if (client === null) return;
    this.client = null;
    this.engine = null;
    this.pingSentAtMs = 0;
    this.dropPinger();
    // The view was this engine's: reads go through the next engine until it gives its own.
    this.direct.drop();
    this.reissuedOutstanding = 0;
    this.lastClose = { at: new Date().toISOString(), kind, cause, outstanding: this.table.size };
    this.setState(LinkState.CLOSE, { cause, outstanding: this.table.size });
    // Its pending requests come back through their callbacks (DISCONNECTED/CLOSED) and are held.
    client.close();
    if (!this.closed) void this.reconnect();
  }

  private async reconnect(): Promise<void> {
    if (this.reconnecting || this.closed) return;
    this.reconnecting = true;
    this.holdTimer ??= this.clock.setInterval(() => this.expireHeld(), 1000);
    let delayMs = 25;
    while (!this.closed && this.client === null) {
      try {
        await this.connectOnce();
      } catch {
        await this.clock.sleep(delayMs);
        delayMs = Math.min(RECONNECT_DELAY_MS_MAX, delayMs * 2);
      }
    }
    this.reconnecting = false;
    if (this.client !== null) this.reissueHeld();
  }

  /**
   * The restore: every held request goes to the new engine, in the order they were held (before
   * any new request: they are sent first on the connection). REOPENING until all are answered.
   */
  private reissueHeld(): void {
    assert(this.client !== null, 'engine link re-issues with no engine');
    const held = this.held;
    this.held = [];
    if (held.length > 0 || this.state !== LinkState.OPEN) {
      this.counters.reissued += held.length;
      this.reissuedOutstanding += held.length;
      this.setState(this.reissuedOutstanding > 0 ? LinkState.REOPENING : LinkState.OPEN, { reissued: held.length, engine: this.engine });
    }
    for (const f of held) {
      f.reissued = true;
      this.sendNow(f);
    }
    if (this.holdTimer !== null) {
      this.clock.clear(this.holdTimer);
      this.holdTimer = null;
    }
  }

  private expireHeld(): void {
    const now = this.clock.nowMs();
    const keep: Forwarded[] = [];
    for (const f of this.held) {
      if (now - f.sinceMs < this.timeouts.holdTimeoutMs) {
        keep.push(f);
        continue;
      }
      this.table.delete(f);
      f.callback(new ZebuError(ErrorCode.EIO, `engine of volume ${this.name} unreachable for ${this.timeouts.holdTimeoutMs} ms`), EMPTY);
    }
    this.held = keep;
  }

  // ---- hang detection ------------------------------------------------------------------------

  private startHeartbeat(): void {
    this.lastHeartbeatTickMs = this.clock.nowMs();
    this.heartbeatTimer = this.clock.setInterval(() => this.heartbeat(), this.options.heartbeatIntervalMs).unref();
  }

  /**
   * One PING in flight at a time, on the heartbeat's own connection; one unanswered past
   * hangTimeoutMs (or no heartbeat connection made in that time) means a hung engine.
   */
  private heartbeat(): void {
    const client = this.client;
    const now = this.clock.nowMs();
    // A tick far later than its interval means this process did not run (stopped, a long pause):
    // an answer may be waiting unread. That time is not the engine's, so the PING's clock moves on
    // by it, and no verdict is given before the sockets were read (the next tick).
    const stalledMs = now - this.lastHeartbeatTickMs - this.options.heartbeatIntervalMs;
    this.lastHeartbeatTickMs = now;
    if (stalledMs > STALL_MS) {
      if (this.pingSentAtMs !== 0) this.pingStalledMs += stalledMs;
      return;
    }
    if (client === null || this.closed) return;
    if (this.pingSentAtMs !== 0) {
      const waitedMs = now - this.pingSentAtMs - this.pingStalledMs;
      if (waitedMs > this.timeouts.hangTimeoutMs) return this.engineHung(`no answer to a heartbeat in ${waitedMs} ms`);
      // The heartbeat connection failed while the PING waited (its handshake timed out while this
      // process was stopped, say): a new one is tried, whose handshake answers that PING — else an
      // engine that runs again could not be seen to, and would be killed at the deadline.
      if ((this.pinger === null || this.pinger.closed) && this.pingerConnectingFor !== client) this.connectPinger(client, this.pingSentAtMs);
      return;
    }
    const sentAtMs = now;
    this.pingSentAtMs = sentAtMs;
    this.pingStalledMs = 0;
    const pinger = this.pinger;
    if (pinger === null || pinger.closed) {
      this.connectPinger(client, sentAtMs);
      return;
    }
    pinger.send(Op.PING, 0, 0, 0, EMPTY, (err) => {
      if (this.client !== client || this.pingSentAtMs !== sentAtMs) return;
      if (err === null) {
        this.pingSentAtMs = 0;
        return;
      }
      // Unanswered (TIMEOUT): the deadline stands, the next tick finds the engine hung. A heartbeat
      // connection that broke is made again at the next tick, under a deadline of its own.
      this.dropPinger();
      if (err.code !== ErrorCode.TIMEOUT) this.pingSentAtMs = 0;
    });
  }

  /** Makes the heartbeat connection; its handshake answers for the PING of `sentAtMs`. */
  private connectPinger(client: DataClient, sentAtMs: number): void {
    if (this.pingerConnectingFor === client) return;
    this.pingerConnectingFor = client;
    this.connectClient(this.timeouts.hangTimeoutMs).then(
      (pinger) => {
        if (this.pingerConnectingFor === client) this.pingerConnectingFor = null;
        if (this.client !== client || this.closed) return pinger.close();
        this.pinger = pinger;
        if (this.pingSentAtMs === sentAtMs) this.pingSentAtMs = 0;
      },
      () => {
        if (this.pingerConnectingFor === client) this.pingerConnectingFor = null;
      },
    );
  }

  private dropPinger(): void {
    const pinger = this.pinger;
    this.pinger = null;
    pinger?.close();
  }

  /** The engine does not answer: kill it (when it says who it is), drop it, hold everything. */
  private engineHung(why: string): void {
    if (this.client === null || this.closed) return;
    this.counters.hangs++;
    const engine = this.engine;
    let killed = false;
    if (engine !== null) {
      this.refusedEngine = engine;
      killed = this.options.killEngine(engine);
    }
    this.options.log({ event: 'engine-hung', why, engine, killed, outstanding: this.table.size });
    this.lost('engine-hung', `engine hung (${why})${engine !== null ? `; process ${engine.pid} ${killed ? 'killed' : 'not killed (gone already)'}` : ''}`);
  }

  private engineSuperseded(why: string): void {
    if (this.client === null || this.closed) return;
    this.refusedEngine = this.engine;
    this.options.log({ event: 'engine-superseded', why, engine: this.engine, outstanding: this.table.size });
    this.lost('engine-lost', `engine superseded by a newer epoch (${why})`);
  }

  // ---- requests ------------------------------------------------------------------------------

  private forward(op: number, flags: number, offset: number, length: number, payload: Buffer, callback: Forwarded['callback'], lent = false): void {
    const refused = this.closed ? new ZebuError(ErrorCode.CLOSED, 'frontend is stopping') : this.table.size >= MAX_TABLE ? new ZebuError(ErrorCode.BUSY, 'too many requests outstanding') : null;
    if (refused !== null) {
      if (lent) ioBuffers.release(payload);
      return callback(refused, EMPTY);
    }
    const loan = lent ? new LentBuffer(ioBuffers, payload) : null;
    const f: Forwarded = { op, flags, offset, length, payload, callback, sinceMs: this.clock.nowMs(), reissued: false, loan };
    if (loan !== null) {
      let answered = false;
      f.callback = (err, data) => {
        assert(!answered, 'a forwarded request was answered twice');
        answered = true;
        callback(err, data);
        loan.letGo();
      };
    }
    this.table.add(f);
    this.sendNow(f);
  }

  /**
   * Keeps a request for the next engine. (Its old connection is gone; should a new engine be
   * connected already, which the order of callbacks makes possible only in principle, the
   * restore runs again and sends it behind the others.)
   */
  private hold(f: Forwarded): void {
    this.held.push(f);
    this.holdTimer ??= this.clock.setInterval(() => this.expireHeld(), 1000);
    if (this.client === null) void this.reconnect();
    else if (!this.reconnecting) this.reissueHeld();
  }

  private sendNow(f: Forwarded): void {
    const client = this.client;
    if (client === null) {
      this.held.push(f);
      this.holdTimer ??= this.clock.setInterval(() => this.expireHeld(), 1000);
      return;
    }
    client.send(f.op, f.flags, f.offset, f.length, f.payload, (err, data) => {
      if (err !== null && !this.closed) {
        if (err.code === ErrorCode.DISCONNECTED || err.code === ErrorCode.CLOSED) {
          // The engine went away with this request unanswered: hold it for the next engine.
          if (this.client === client) this.lost('engine-lost', `engine disconnected: ${err.message}`);
          this.hold(f);
          return;
        }
        if (err.code === ErrorCode.FENCED) {
          // The engine was superseded: another engine of a newer epoch opened the replicas, and
          // this one never serves again. The request waits for the volume's next engine, as one
          // in flight when an engine dies does (a restarted frontend can meet such an engine at
          // the socket before its successor takes the socket over).
          if (this.client === client) this.engineSuperseded(err.message);
          this.hold(f);
          return;
        }
        if (err.code === ErrorCode.TIMEOUT) {
          // Unanswered for stallTimeoutMs: the engine is stuck. Replace it; the request is held.
          if (this.client === client) this.engineHung(`a ${OpName[f.op] ?? f.op} request unanswered for ${this.timeouts.stallTimeoutMs} ms`);
          this.hold(f);
          return;
        }
      }
      this.table.delete(f);
      if (f.reissued) {
        this.counters.longestHoldMs = Math.max(this.counters.longestHoldMs, this.clock.nowMs() - f.sinceMs);
        this.reissuedOutstanding--;
        assert(this.reissuedOutstanding >= 0 || this.client !== client, 'engine link re-issued count');
        if (this.reissuedOutstanding <= 0 && this.state === LinkState.REOPENING && this.client === client) {
          this.reissuedOutstanding = 0;
          this.setState(LinkState.OPEN, { longestHoldMs: Math.round(this.counters.longestHoldMs) });
        }
      }
      f.callback(err, data);
    }, null, f.loan?.hold() ?? null);
  }

  read(offset: number, length: number, cb: (err: ZebuError | null, data: Buffer) => void): void {
    if (this.client !== null && !this.closed) {
      const sent = this.direct.read(offset, length, (data) => {
        this.reportTimer ??= this.clock.setTimeout(() => this.reportReads(), READ_REPORT_MS).unref();
        cb(null, data);
      }, () => this.forward(Op.READ, 0, offset, length, EMPTY, cb));
      if (sent) return;
    }
    this.forward(Op.READ, 0, offset, length, EMPTY, cb);
  }
  write(offset: number, data: Buffer, fua: boolean, cb: (err: ZebuError | null) => void): void {
    this.forward(Op.WRITE, fua ? RequestFlag.FUA : 0, offset, data.length, data, cb);
  }
  writeLent(offset: number, data: Buffer, fua: boolean, cb: (err: ZebuError | null) => void): void {
    this.forward(Op.WRITE, fua ? RequestFlag.FUA : 0, offset, data.length, data, cb, true);
  }
  zero(offset: number, length: number, trim: boolean, fua: boolean, noHole: boolean, cb: (err: ZebuError | null) => void): void {
    this.forward(trim ? Op.TRIM : Op.WRITE_ZEROES, (fua ? RequestFlag.FUA : 0) | (noHole ? RequestFlag.NO_HOLE : 0), offset, length, EMPTY, cb);
  }
  flush(cb: (err: ZebuError | null) => void): void {
    this.forward(Op.FLUSH, 0, 0, 0, EMPTY, cb);
  }
  blockStatus(offset: number, length: number, cb: (err: ZebuError | null, extents: NbdExtent[]) => void): void {
    this.forward(Op.BLOCK_STATUS, 0, offset, length, EMPTY, (err, data) => {
      if (err !== null) return cb(err, []);
      try {
        cb(null, decodeExtents(data));
      } catch (e) {
        cb(new ZebuError(ErrorCode.EIO, `bad block status from engine: ${(e as Error).message}`), []);
      }
    });
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.clock.clear(this.holdTimer);
    this.clock.clear(this.heartbeatTimer);
    this.clock.clear(this.reportTimer);
    this.direct.close();
    for (const f of this.held) f.callback(new ZebuError(ErrorCode.CLOSED, 'frontend is stopping'), EMPTY);
    this.held = [];
    const client = this.client;
    this.client = null;
    client?.close();
    this.dropPinger();
  }
}
