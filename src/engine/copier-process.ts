/**
 * The rebuild copier as a process of its own, the engine's side. The engine stays the lease
 * authority; the copier process (copier-main.ts) runs each region's chunk loop
 * (leased-copy.ts) over its own connections to the source and target replicas, so a rebuild's
 * reads, writes and pulls cost the engine only a few messages per lease, and a copier that
 * hangs or dies is a fault the engine survives:
 *
 * - stopped (SIGSTOP, stuck): a client write recalls its lease, the recall times out, the
 *   engine revokes the lease and the write goes on; the copier, going on later, gets
 *   LEASE_REVOKED from the target and replays from its committed offset.
 * - dead (SIGKILL, crash): every lease it held is revoked (a pull it started may still land
 *   on the target: the revoke makes the target refuse it, or land it, before the client writes
 *   that wait go on), its copies fail with CopierLost, and the next copy starts a new copier.
 *
 * Messages go over the IPC channel of a forked child (JSON; forkCopier), or whatever channel a
 * CopierStarter gives (the simulator's). The engine → copier ones: init,
 * copy, answer (to an ask), recall, revoked, cancel. The copier → engine ones: ask (a turn or a lease),
 * endTurn, release, chunk (the copy got this far), copied (the region is on the target to its
 * end), replayed, done, failed.
 */
import { fork } from 'node:child_process';
import os from 'node:os';
import { ZebuError, ErrorCode, toZebuError } from '../errors.ts';
import type { RegionCopy } from './rebuild-plan.ts';
import { systemClock, type Clock, type ClockTimer } from '../os/clock.ts';

/** A replica as the copier reaches it (named: the replica must report `key` as its name). */
export interface CopyEndpoint {
  address: string;
  host: string;
  port: number;
  key: string;
  named: boolean;
}

/** One region to copy from a source to the target. */
export interface RegionCopyRequest {
  epoch: number;
  target: CopyEndpoint;
  /**
   * RW replicas to read from, best first (the copier takes the next when one fails), when the copy
   * was asked for; each lease grant replaces them with those of its moment.
   */
  sources: CopyEndpoint[];
  offset: number;
  length: number;
  how: RegionCopy;
  chunkBytes: number;
  maxRetries: number;
  /** The target pulls each chunk from a source itself (else the copier reads and writes it). */
  pull: boolean;
}

/** What a copy uses of the engine, the lease authority. */
export interface RegionCopyHooks {
  /**
   * A lease on [start, end) of the target; `onRecall` when a client write waits for it, `onRevoke`
   * when it was revoked after the recall timeout. With it, the RW replicas to read from at the
   * grant (best first): a replica that left RW since the copy was asked for (it may have missed
   * writes since) is no source any more. Chunks copied under the lease may read the sources of its
   * grant: a write to the region that a source left out of waits for the lease.
   */
  acquireLease(start: number, end: number, onRecall: (id: number) => void, onRevoke: (id: number) => void): Promise<{ id: number; sources: CopyEndpoint[] }>;
  releaseLease(id: number): void;
  /** Revokes a lease now (the copier is gone): the target refuses its copy writes from now on. */
  revokeLease(id: number): void;
  copyTurn(): Promise<() => void>;
  clientsBusy(): boolean;
  /** Throws when the rebuild must stop. */
  check(): void;
  /** The region is on the target from `at` to its end (at + bytes). */
  regionCopied(at: number, bytes: number): void;
  /** The region's copy reached `end`. */
  chunkCopied(end: number): void;
  /** The copier copied from its committed offset again after a revoke. */
  replayed(): void;
}

/** Copies regions somewhere other than the engine's event loop. */
export interface RegionCopier {
  copy(request: RegionCopyRequest, hooks: RegionCopyHooks): Promise<number>;
  /** The copier process's pid (null: none running). */
  readonly pid: number | null;
  close(): void;
}

/** The copier process died or its channel closed while it copied: the region is copied again. */
export class CopierLost extends ZebuError {
  constructor(message: string) {
    super(ErrorCode.DISCONNECTED, message);
  }
}

/** The copier gave the region up (revoked past the retry limit): the rebuild fails with it. */
export class CopierGaveUp extends ZebuError {}

/** The answer to a lease ask: the lease, and the sources to read from under it. */
export interface LeaseGrant {
  lease: number;
  sources: CopyEndpoint[];
}

export type EngineToCopier =
  | { t: 'init'; secret: string; requestTimeoutMs: number | null }
  | { t: 'copy'; copy: number; request: RegionCopyRequest }
  | { t: 'answer'; ask: number; value?: unknown; error?: { code: ErrorCode; message: string } }
  | { t: 'recall'; lease: number }
  | { t: 'revoked'; lease: number }
  | { t: 'cancel'; copy: number; code: ErrorCode; message: string };

export type CopierToEngine =
  | { t: 'ask'; ask: number; copy: number; what: 'turn' }
  | { t: 'ask'; ask: number; copy: number; what: 'lease'; start: number; end: number }
  | { t: 'endTurn'; copy: number; turn: number }
  | { t: 'release'; copy: number; lease: number }
  | { t: 'copied'; copy: number; at: number; bytes: number }
  | { t: 'chunk'; copy: number; end: number }
  | { t: 'replayed'; copy: number }
  | { t: 'done'; copy: number; written: number }
  | { t: 'failed'; copy: number; code: ErrorCode; message: string; gaveUp: boolean };

/** While a copy runs, how often the engine checks that its rebuild still goes on (a stopped copier cannot). */
const CHECK_INTERVAL_MS = 500;
/** A copier with nothing to copy this long exits (a process costs memory; the next rebuild starts one). */
const IDLE_EXIT_MS = 10_000;

/** The engine's end of a running copier. */
export interface CopierChannel {
  send(message: EngineToCopier): void;
  /** Lets it go while idle: it exits by itself. */
  release(): void;
  kill(): void;
  readonly pid: number | null;
  /**
   * Whether clients use the volume: the copier then yields the CPU to the data path (optional;
   * called on every copy turn, so it must be cheap when nothing changes).
   */
  clientsBusy?(busy: boolean): void;
}

/**
 * Starts a copier: `onMessage` gets its messages in order, `onGone` is called once when it died
 * or its channel closed (not after release() or kill()).
 */
export type CopierStarter = (onMessage: (message: CopierToEngine) => void, onGone: (why: string) => void) => CopierChannel;

/**
 * The copier's CPU priority (nice) while clients use the volume: below the data path's
 * processes, so that on a busy machine client I/O comes first (measured: fio's 4k write p99
 * during a rebuild 30.5 ms at the same priority, 15.3 without a rebuild). With no client I/O it
 * runs at the engine's priority: niced, it starved behind the replicas doing its pulls (idle
 * rebuild 228-282 MiB/s against 277-286).
 */
const COPIER_BUSY_NICE = 10;

/** A copier process forked from this one, over the IPC channel; `args` tell it apart in a process list. */
export function forkCopier(args: string[]): CopierStarter {
  return (onMessage, onGone) => {
    const child = fork(new URL(import.meta.url.endsWith('.js') ? './copier-main.js' : './copier-main.ts', import.meta.url), args, { stdio: ['ignore', 'inherit', 'inherit', 'ipc'], serialization: 'json' });
    const basePriority = os.getPriority();
    let niced: boolean | null = null;
    const nice = (busy: boolean): void => {
      if (busy === niced || child.pid === undefined || child.exitCode !== null) return;
      niced = busy;
      try {
        os.setPriority(child.pid, busy ? Math.min(19, basePriority + COPIER_BUSY_NICE) : basePriority);
      } catch {
        // Not allowed here (a priority raised back needs the privilege to): it stays as it is.
      }
    };
    // Niced from the start: a rebuild usually starts while clients use the volume.
    nice(true);
    let current = true;
    const gone = (why: string): void => {
      if (!current) return;
      current = false;
      onGone(why);
    };
    child.on('message', (message) => {
      if (current) onMessage(message as CopierToEngine);
    });
    child.on('exit', (code, signal) => gone(signal !== null ? `was killed by ${signal}` : `exited with code ${code}`));
    child.on('error', (err) => {
      gone(`failed: ${err.message}`);
      child.kill('SIGKILL');
    });
    child.on('disconnect', () => {
      if (!current) return; // let go while idle: it exits by itself
      gone('closed its channel');
      child.kill('SIGKILL');
    });
    return {
      send: (message) => {
        if (!child.connected) return;
        try {
          child.send(message);
        } catch {
          // The channel closed: 'disconnect' ends the copies.
        }
      },
      release: () => {
        current = false;
        if (child.connected) child.disconnect();
      },
      kill: () => {
        current = false;
        child.kill('SIGKILL');
      },
      clientsBusy: nice,
      get pid() {
        return child.pid ?? null;
      },
    };
  };
}

interface RunningCopy {
  hooks: RegionCopyHooks;
  leases: Set<number>;
  turns: Map<number, () => void>;
  resolve: (written: number) => void;
  reject: (err: Error) => void;
  timer: ClockTimer;
}

export interface RemoteCopierOptions {
  start: CopierStarter;
  secret: Buffer;
  requestTimeoutMs?: number;
  log: (event: Record<string, unknown>) => void;
  clock?: Clock;
}

/** Starts a copier on the first copy, again after one died, and lets an idle one go. */
export class RemoteCopier implements RegionCopier {
  private readonly options: RemoteCopierOptions;
  private readonly clock: Clock;
  private channel: CopierChannel | null = null;
  private readonly copies = new Map<number, RunningCopy>();
  private nextCopy = 1;
  private nextTurn = 1;
  private closed = false;
  private idleTimer: ClockTimer | null = null;
  /** Copiers started (the first one included). */
  starts = 0;

  constructor(options: RemoteCopierOptions) {
    this.options = options;
    this.clock = options.clock ?? systemClock;
  }

  get pid(): number | null {
    return this.channel?.pid ?? null;
  }

  copy(request: RegionCopyRequest, hooks: RegionCopyHooks): Promise<number> {
    if (this.closed) return Promise.reject(new ZebuError(ErrorCode.CLOSED, 'the copier is closed'));
    const channel = this.running();
    this.clock.clear(this.idleTimer);
    this.idleTimer = null;
    const copy = this.nextCopy++;
    return new Promise<number>((resolve, reject) => {
      const timer = this.clock.setInterval(() => {
        try {
          hooks.check();
        } catch (err) {
          // The rebuild stops: no need to wait for the copier (it may be stopped) to notice.
          const e = toZebuError(err);
          channel.send({ t: 'cancel', copy, code: e.code, message: e.message });
          this.end(copy, e);
        }
      }, CHECK_INTERVAL_MS).unref();
      this.copies.set(copy, { hooks, leases: new Set(), turns: new Map(), resolve, reject, timer });
      channel.send({ t: 'copy', copy, request });
    });
  }

  close(): void {
    this.closed = true;
    this.clock.clear(this.idleTimer);
    const channel = this.channel;
    if (channel !== null) {
      this.channel = null;
      channel.kill();
      this.lost('the engine closed');
    }
  }

  private running(): CopierChannel {
    if (this.channel !== null) return this.channel;
    let channel: CopierChannel | null = null;
    const onMessage = (message: CopierToEngine): void => {
      if (channel !== null && this.channel === channel) this.onMessage(channel, message);
    };
    const onGone = (why: string): void => {
      if (channel === null || this.channel !== channel) return;
      this.channel = null;
      this.options.log({ event: 'rebuild-copier-exited', pid: channel.pid, why, copies: this.copies.size });
      this.lost(`the copier (pid ${channel.pid}) ${why}`);
    };
    channel = this.options.start(onMessage, onGone);
    this.channel = channel;
    this.starts++;
    channel.send({ t: 'init', secret: this.options.secret.toString('base64'), requestTimeoutMs: this.options.requestTimeoutMs ?? null });
    this.options.log({ event: 'rebuild-copier-started', pid: channel.pid });
    return channel;
  }

  /** Every copy of the copier that is gone fails; the leases it held are revoked first. */
  private lost(why: string): void {
    for (const copy of [...this.copies.keys()]) this.end(copy, new CopierLost(`${why} while it copied`));
  }

  /** Nothing left to copy: the copier exits after a while unless a copy comes. */
  private idle(): void {
    if (this.copies.size > 0 || this.channel === null || this.idleTimer !== null) return;
    this.idleTimer = this.clock.setTimeout(() => {
      this.idleTimer = null;
      const channel = this.channel;
      if (this.copies.size > 0 || channel === null) return;
      this.channel = null;
      channel.release();
    }, IDLE_EXIT_MS).unref();
  }

  /** Ends a copy: its leases still held revoked (a copier that is gone may have a pull under way), its turns ended. */
  private end(copy: number, err: Error | null, written = 0): void {
    const running = this.copies.get(copy);
    if (running === undefined) return;
    this.copies.delete(copy);
    this.clock.clear(running.timer);
    for (const lease of running.leases) running.hooks.revokeLease(lease);
    for (const endTurn of running.turns.values()) endTurn();
    this.idle();
    if (err === null) running.resolve(written);
    else running.reject(err);
  }

  private onMessage(channel: CopierChannel, m: CopierToEngine): void {
    const running = this.copies.get(m.copy);
    switch (m.t) {
      case 'ask': {
        const answer = (value: unknown): void => channel.send({ t: 'answer', ask: m.ask, value });
        const refuse = (err: unknown): void => {
          const e = toZebuError(err);
          channel.send({ t: 'answer', ask: m.ask, error: { code: e.code, message: e.message } });
        };
        if (running === undefined) return refuse(new ZebuError(ErrorCode.CLOSED, 'the copy ended'));
        try {
          running.hooks.check();
        } catch (err) {
          return refuse(err);
        }
        if (m.what === 'turn') {
          running.hooks.copyTurn().then((endTurn) => {
            if (this.copies.get(m.copy) !== running) return endTurn();
            const turn = this.nextTurn++;
            running.turns.set(turn, endTurn);
            const busy = running.hooks.clientsBusy();
            channel.clientsBusy?.(busy);
            answer({ turn, busy });
          }, refuse);
        } else {
          // A recall may come before the grant: the copier keeps it until it has the lease.
          running.hooks.acquireLease(m.start, m.end, (lease) => channel.send({ t: 'recall', lease }), (lease) => channel.send({ t: 'revoked', lease })).then(({ id, sources }) => {
            if (this.copies.get(m.copy) !== running) {
              running.hooks.releaseLease(id);
              return refuse(new ZebuError(ErrorCode.CLOSED, 'the copy ended'));
            }
            running.leases.add(id);
            answer({ lease: id, sources } satisfies LeaseGrant);
          }, refuse);
        }
        return;
      }
      case 'endTurn': {
        const endTurn = running?.turns.get(m.turn);
        if (endTurn === undefined) return;
        running!.turns.delete(m.turn);
        endTurn();
        return;
      }
      case 'release':
        if (running === undefined || !running.leases.delete(m.lease)) return;
        running.hooks.releaseLease(m.lease);
        return;
      case 'copied':
        if (running === undefined) return;
        try {
          running.hooks.check();
          running.hooks.regionCopied(m.at, m.bytes);
        } catch (err) {
          const e = toZebuError(err);
          channel.send({ t: 'cancel', copy: m.copy, code: e.code, message: e.message });
          this.end(m.copy, e);
        }
        return;
      case 'chunk':
        running?.hooks.chunkCopied(m.end);
        return;
      case 'replayed':
        running?.hooks.replayed();
        return;
      case 'done':
        // The copier gives its leases back before it answers; one still held is revoked.
        this.end(m.copy, null, m.written);
        return;
      case 'failed':
        this.end(m.copy, m.gaveUp ? new CopierGaveUp(m.code, m.message) : new ZebuError(m.code, m.message));
        return;
    }
  }
}
