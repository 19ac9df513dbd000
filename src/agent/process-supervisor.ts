/**
 * Runs the data-path processes of a node (replicas, engines, the NBD frontend) so that they do
 * not depend on the agent: each is started in its own session (a signal to the agent's process
 * group does not reach it), with stdout and stderr going to files, never to pipes (a dead agent
 * must not make its children's writes fail).
 *
 * A record per process (run/procs/ID.json: pid, the kernel's start time of that pid, arguments)
 * lets a restarted agent re-adopt what is still running instead of starting duplicates; the
 * start time guards against a recycled pid. Adopted processes are not our children, so their
 * exit is noticed by polling /proc.
 *
 * A process that exits while wanted is restarted with capped exponential backoff — by the
 * supervisor itself, or (`autoRestart: false`) by the caller's next `ensure` once the backoff has
 * passed, so that the caller can give the new process new arguments (an engine's new epoch).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { ZebuError, ErrorCode } from '../errors.ts';
import { procStat } from '../os/process-identity.ts';

export type ManagedState = 'starting' | 'running' | 'error' | 'stopped';

export interface ManagedView {
  id: string;
  args: string[];
  pid: number | null;
  state: ManagedState;
  /** The process's JSON "ready" line. */
  ready: Record<string, unknown> | null;
  restarts: number;
  message: string | null;
  adopted: boolean;
}

export interface ProcessSupervisorOptions {
  /** Where process records go (run/procs). */
  recordDir: string;
  logDir: string;
  /** The zebu CLI entry (src/cli/main.ts). */
  main: string;
  /** Node.js flags the processes start with (before the entry). */
  nodeFlags?: string[];
  execPath?: string;
  readyTimeoutMs?: number;
  stopTimeoutMs?: number;
  pollMs?: number;
  backoffMsMin?: number;
  backoffMsMax?: number;
  /** Runs when a process's state changes (ready, exited, restarted). */
  onChange?: (id: string) => void;
  log?: (event: Record<string, unknown>) => void;
}

interface ProcessRecord {
  id: string;
  pid: number;
  startTime: string;
  args: string[];
  startedAt: string;
}

interface Managed {
  id: string;
  args: string[];
  pid: number | null;
  startTime: string | null;
  child: ChildProcess | null;
  state: ManagedState;
  ready: Record<string, unknown> | null;
  restarts: number;
  /** Exits in a row before the process was ready (a crash loop at start-up): the backoff grows with them. */
  failedStarts: number;
  message: string | null;
  adopted: boolean;
  /** Restart when it exits. False once a stop was asked for. */
  wanted: boolean;
  /** Restart by itself after an exit (else the next ensure, after the backoff, starts it). */
  autoRestart: boolean;
  /** Descriptors handed to every start as fd 3, 4, … (a listening socket kept across restarts). */
  fds: number[];
  /** Killed when not ready this long after a start (null: the supervisor's readyTimeoutMs). */
  readyTimeoutMs: number | null;
  /** Longest wait before a restart (null: the supervisor's backoffMsMax). */
  backoffMsMax: number | null;
  startedAtMs: number;
  restartTimer: NodeJS.Timeout | null;
  readyTimer: NodeJS.Timeout | null;
  exitWaiters: (() => void)[];
}

const ID = /^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$/;
/** A process that ran this long before exiting starts its backoff afresh. */
const STABLE_MS = 60_000;
const LOG_ROTATE_BYTES = 10 * 1024 * 1024;

export class ProcessSupervisor {
  private readonly options: Required<Omit<ProcessSupervisorOptions, 'execPath'>> & { execPath: string };
  private readonly procs = new Map<string, Managed>();
  private readonly pollTimer: NodeJS.Timeout;
  private closed = false;

  constructor(options: ProcessSupervisorOptions) {
    this.options = {
      execPath: process.execPath,
      nodeFlags: [],
      readyTimeoutMs: 60_000,
      stopTimeoutMs: 30_000,
      pollMs: 250,
      backoffMsMin: 500,
      backoffMsMax: 30_000,
      onChange: () => {},
      log: () => {},
      ...options,
    };
    fs.mkdirSync(this.options.recordDir, { recursive: true, mode: 0o700 });
    fs.mkdirSync(this.options.logDir, { recursive: true, mode: 0o700 });
    this.pollTimer = setInterval(() => this.poll(), this.options.pollMs);
    this.pollTimer.unref();
  }

  private recordPath(id: string): string {
    return path.join(this.options.recordDir, `${id}.json`);
  }
  logPath(id: string): string {
    return path.join(this.options.logDir, `${id}.log`);
  }
  private outPath(id: string): string {
    return path.join(this.options.logDir, `${id}.out`);
  }

  /**
   * Re-adopts the processes a previous agent left running; forgets records of dead ones.
   * Returns the ids adopted. Call once, before anything is started.
   */
  adopt(options: { autoRestart?: (id: string) => boolean } = {}): string[] {
    const adopted: string[] = [];
    for (const file of fs.readdirSync(this.options.recordDir)) {
      if (!file.endsWith('.json')) continue;
      const full = path.join(this.options.recordDir, file);
      let record: ProcessRecord;
      try {
        record = JSON.parse(fs.readFileSync(full, 'utf8')) as ProcessRecord;
      } catch {
        fs.rmSync(full, { force: true });
        continue;
      }
      const stat = procStat(record.pid);
      if (stat === null || stat.startTime !== record.startTime || !ID.test(record.id) || this.procs.has(record.id)) {
        fs.rmSync(full, { force: true });
        continue;
      }
      const m: Managed = {
        id: record.id, args: record.args, pid: record.pid, startTime: record.startTime, child: null, state: 'starting', ready: null,
        restarts: 0, failedStarts: 0, message: null, adopted: true, wanted: true, autoRestart: options.autoRestart?.(record.id) ?? true, fds: [], readyTimeoutMs: null, backoffMsMax: null, startedAtMs: Date.parse(record.startedAt) || Date.now(),
        restartTimer: null, readyTimer: null, exitWaiters: [],
      };
      this.procs.set(record.id, m);
      this.checkReady(m);
      adopted.push(record.id);
      this.options.log({ event: 'process-adopted', id: record.id, pid: record.pid });
    }
    return adopted;
  }

  get(id: string): ManagedView | undefined {
    const m = this.procs.get(id);
    if (m === undefined) return undefined;
    return { id: m.id, args: [...m.args], pid: m.pid, state: m.state, ready: m.ready, restarts: m.restarts, message: m.message, adopted: m.adopted };
  }

  ids(): string[] {
    return [...this.procs.keys()];
  }

  /**
   * Wants `id` running with `args`. Starts it when it is not running. A running process keeps
   * running; the new arguments (and `fds`, handed over as fd 3, 4, …) are used when it next starts.
   */
  ensure(id: string, args: string[], options: { autoRestart?: boolean; fds?: number[]; readyTimeoutMs?: number; backoffMsMax?: number } = {}): ManagedView {
    if (!ID.test(id)) throw new ZebuError(ErrorCode.EINVAL, `bad process id ${id}`);
    if (this.closed) throw new ZebuError(ErrorCode.CLOSED, 'supervisor is closed');
    let m = this.procs.get(id);
    if (m === undefined) {
      m = {
        id, args, pid: null, startTime: null, child: null, state: 'stopped', ready: null, restarts: 0, failedStarts: 0, message: null, adopted: false,
        wanted: true, autoRestart: true, fds: [], readyTimeoutMs: null, backoffMsMax: null, startedAtMs: 0, restartTimer: null, readyTimer: null, exitWaiters: [],
      };
      this.procs.set(id, m);
    }
    m.args = args;
    m.wanted = true;
    m.autoRestart = options.autoRestart ?? true;
    m.fds = options.fds ?? [];
    m.readyTimeoutMs = options.readyTimeoutMs ?? null;
    m.backoffMsMax = options.backoffMsMax ?? null;
    if (m.pid === null && m.restartTimer === null) this.start(m);
    return this.get(id)!;
  }

  private start(m: Managed): void {
    const out = this.outPath(m.id);
    const logFile = this.logPath(m.id);
    try {
      if (fs.statSync(logFile).size > LOG_ROTATE_BYTES) fs.renameSync(logFile, `${logFile}.1`);
    } catch {
      // no log yet
    }
    const outFd = fs.openSync(out, 'w', 0o600);
    const logFd = fs.openSync(logFile, 'a', 0o600);
    let child: ChildProcess;
    try {
      child = spawn(this.options.execPath, [...this.options.nodeFlags, this.options.main, ...m.args], { detached: true, stdio: ['ignore', outFd, logFd, ...m.fds] });
    } finally {
      // The child has its own copies; keeping ours would leak a descriptor per start.
      fs.closeSync(outFd);
      fs.closeSync(logFd);
    }
    m.child = child;
    m.pid = child.pid ?? null;
    m.state = 'starting';
    m.ready = null;
    m.adopted = false;
    m.startedAtMs = Date.now();
    child.once('error', (err) => {
      m.message = `cannot start: ${err.message}`;
    });
    child.once('exit', (code, signal) => {
      if (m.child === child) this.exited(m, code !== null ? `exited with code ${code}` : `killed by ${signal}`);
    });
    if (m.pid !== null) {
      const stat = procStat(m.pid);
      m.startTime = stat?.startTime ?? null;
      const record: ProcessRecord = { id: m.id, pid: m.pid, startTime: m.startTime ?? '', args: m.args, startedAt: new Date().toISOString() };
      const tmp = `${this.recordPath(m.id)}.tmp`;
      fs.writeFileSync(tmp, JSON.stringify(record));
      fs.renameSync(tmp, this.recordPath(m.id));
    }
    this.options.log({ event: 'process-started', id: m.id, pid: m.pid, restarts: m.restarts });
    const readyTimeoutMs = m.readyTimeoutMs ?? this.options.readyTimeoutMs;
    m.readyTimer = setTimeout(() => {
      m.readyTimer = null;
      if (m.state === 'starting' && m.pid !== null) {
        m.message = `not ready after ${readyTimeoutMs} ms; killing it`;
        this.signal(m, 'SIGKILL');
      }
    }, readyTimeoutMs);
    m.readyTimer.unref();
    this.options.onChange(m.id);
  }

  /** Reads the process's stdout file for its "ready" JSON line. */
  private checkReady(m: Managed): void {
    if (m.state !== 'starting') return;
    let text: string;
    try {
      text = fs.readFileSync(this.outPath(m.id), 'utf8');
    } catch {
      return;
    }
    for (const line of text.split('\n')) {
      if (!line.includes('"ready"')) continue;
      try {
        const msg = JSON.parse(line) as Record<string, unknown>;
        if (msg.ready === true) {
          m.ready = msg;
          m.state = 'running';
          m.message = null;
          if (m.readyTimer !== null) clearTimeout(m.readyTimer);
          m.readyTimer = null;
          this.options.onChange(m.id);
          return;
        }
      } catch {
        // a partial line: read again at the next poll
      }
    }
  }

  private poll(): void {
    for (const m of this.procs.values()) {
      if (m.pid === null) continue;
      if (m.child === null) {
        // Adopted: not our child, so no exit event.
        const stat = procStat(m.pid);
        if (stat === null || stat.startTime !== m.startTime) {
          this.exited(m, 'exited');
          continue;
        }
      }
      if (m.state === 'starting') this.checkReady(m);
    }
  }

  private tail(id: string): string {
    try {
      const fd = fs.openSync(this.logPath(id), 'r');
      try {
        const size = fs.fstatSync(fd).size;
        const length = Math.min(size, 4096);
        const buf = Buffer.alloc(length);
        fs.readSync(fd, buf, 0, length, size - length);
        const lines = buf.toString('utf8').trim().split('\n').slice(-3);
        return lines
          .map((line) => {
            try {
              const obj = JSON.parse(line) as Record<string, unknown>;
              return String(obj.msg ?? obj.err ?? line);
            } catch {
              return line;
            }
          })
          .join(' | ');
      } finally {
        fs.closeSync(fd);
      }
    } catch {
      return '';
    }
  }

  private exited(m: Managed, how: string): void {
    const wasStarting = m.state === 'starting';
    m.child = null;
    m.pid = null;
    m.startTime = null;
    m.ready = null;
    if (m.readyTimer !== null) clearTimeout(m.readyTimer);
    m.readyTimer = null;
    fs.rmSync(this.recordPath(m.id), { force: true });
    const waiters = m.exitWaiters;
    m.exitWaiters = [];
    for (const w of waiters) w();
    if (!m.wanted || this.closed) {
      m.state = 'stopped';
      this.options.onChange(m.id);
      return;
    }
    // A process that served is restarted after the shortest wait (clients wait for it); only a
    // crash loop at start-up (never ready) backs off further and further.
    if (!wasStarting) m.failedStarts = 0;
    const ranMs = Date.now() - m.startedAtMs;
    if (ranMs > STABLE_MS) m.restarts = 0;
    const tail = this.tail(m.id);
    m.message = `${wasStarting ? 'failed to start' : 'crashed'}: ${how}${tail ? ` (${tail})` : ''}`;
    m.state = 'error';
    const delayMs = Math.min(m.backoffMsMax ?? this.options.backoffMsMax, this.options.backoffMsMin * 2 ** Math.min(m.failedStarts, 10));
    if (wasStarting) m.failedStarts++;
    m.restarts++;
    this.options.log({ event: 'process-exited', id: m.id, how, restartInMs: delayMs, restarts: m.restarts });
    m.restartTimer = setTimeout(() => {
      m.restartTimer = null;
      if (!m.wanted || this.closed || m.pid !== null) return;
      if (m.autoRestart) this.start(m);
      else this.options.onChange(m.id); // the caller starts it (with the arguments it wants now)
    }, delayMs);
    m.restartTimer.unref();
    this.options.onChange(m.id);
  }

  private signal(m: Managed, signal: NodeJS.Signals): void {
    if (m.pid === null) return;
    try {
      process.kill(m.pid, signal);
    } catch {
      // already gone
    }
  }

  /** Stops `id` (SIGTERM, then SIGKILL after the timeout) and forgets it. */
  async stop(id: string, timeoutMs = this.options.stopTimeoutMs): Promise<void> {
    const m = this.procs.get(id);
    if (m === undefined) return;
    m.wanted = false;
    if (m.restartTimer !== null) clearTimeout(m.restartTimer);
    m.restartTimer = null;
    if (m.pid !== null) {
      const gone = new Promise<void>((resolve) => m.exitWaiters.push(resolve));
      this.signal(m, 'SIGTERM');
      const killTimer = setTimeout(() => {
        this.options.log({ event: 'process-kill', id, reason: `no exit ${timeoutMs} ms after SIGTERM` });
        this.signal(m, 'SIGKILL');
      }, timeoutMs);
      await gone;
      clearTimeout(killTimer);
    }
    if (!m.wanted) this.procs.delete(id);
    fs.rmSync(this.recordPath(id), { force: true });
    fs.rmSync(this.outPath(id), { force: true });
  }

  /** Removes the log files of a process that is gone for good. */
  removeLogs(id: string): void {
    fs.rmSync(this.logPath(id), { force: true });
    fs.rmSync(`${this.logPath(id)}.1`, { force: true });
    fs.rmSync(this.outPath(id), { force: true });
  }

  /** Stops watching; processes keep running (a restarted agent re-adopts them). */
  detach(): void {
    this.closed = true;
    clearInterval(this.pollTimer);
    for (const m of this.procs.values()) {
      if (m.restartTimer !== null) clearTimeout(m.restartTimer);
      if (m.readyTimer !== null) clearTimeout(m.readyTimer);
      m.child?.removeAllListeners('exit');
    }
  }
}
