/**
 * The start of a `zebu … serve` child process, as tests wait for it: the tail of its stderr, its
 * exit, and its ready line (the first JSON line on stdout with "ready": true). `ready` rejects when
 * the child exits first or is not ready in time, with the stderr tail in the message.
 */
import type { ChildProcess } from 'node:child_process';
import readline from 'node:readline';

export interface ChildStart {
  ready: Promise<Record<string, unknown>>;
  exited: Promise<number | string>;
  stderr: () => string;
}

/** How much of stderr an error message quotes (its end). */
const MESSAGE_TAIL_BYTES = 20_000;

/**
 * `details`: what to quote in an error instead of stderr (a child whose stderr goes to a file,
 * not a pipe, has none here).
 */
export function watchChildStart(child: ChildProcess, what: string, timeoutMs: number, keepBytes = 200_000, details?: () => string): ChildStart {
  let stderr = '';
  child.stderr?.on('data', (d: Buffer) => {
    stderr += d.toString();
    if (stderr.length > keepBytes) stderr = stderr.slice(-keepBytes);
  });
  const tail = (): string => (details !== undefined ? details() : stderr.slice(-MESSAGE_TAIL_BYTES));
  const exited = new Promise<number | string>((resolve) => child.once('exit', (code, signal) => resolve(code ?? signal ?? -1)));
  const ready = new Promise<Record<string, unknown>>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`${what} not ready in ${timeoutMs / 1000} s: ${tail()}`)), timeoutMs);
    readline.createInterface({ input: child.stdout! }).on('line', (line) => {
      let msg: Record<string, unknown>;
      try {
        msg = JSON.parse(line) as Record<string, unknown>;
      } catch {
        return; // not a status line
      }
      if (msg.ready === true) {
        clearTimeout(timer);
        resolve(msg);
      }
    });
    void exited.then((code) => {
      clearTimeout(timer);
      reject(new Error(`${what} exited (${code}) before ready: ${tail()}`));
    });
  });
  // A caller that stops waiting (its test failed) must not leave an unhandled rejection behind.
  ready.catch(() => {});
  return { ready, exited, stderr: () => stderr };
}
