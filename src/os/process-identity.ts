/**
 * Who a process is, in a way that survives pid reuse: its pid and the kernel's start time of that
 * pid (/proc/PID/stat field 22, clock ticks since boot). Two processes never share both while the
 * machine runs, so a signal sent after checking both reaches the process that was meant.
 *
 * Used by the supervisors (re-adopting processes after their own restart) and by the frontend
 * (killing a hung engine it is connected to).
 */
import fs from 'node:fs';

export interface ProcessIdentity {
  pid: number;
  startTime: string;
}

/** State and start time of a pid from /proc, or null when there is no live process. */
export function procStat(pid: number): { state: string; startTime: string } | null {
  if (!Number.isSafeInteger(pid) || pid <= 0) return null;
  let text: string;
  try {
    text = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  } catch {
    return null;
  }
  // "pid (comm) S ppid ...": comm may hold spaces and parentheses, so split after the last ')'.
  const fields = text.slice(text.lastIndexOf(')') + 2).split(' ');
  const state = fields[0];
  if (state === 'Z' || state === 'X') return null;
  return { state, startTime: fields[19] };
}

/** This process's identity. */
export function selfIdentity(): ProcessIdentity {
  return { pid: process.pid, startTime: procStat(process.pid)?.startTime ?? '' };
}

/** Whether `identity` names a live process (the same one: pid and start time both match). */
export function isAlive(identity: ProcessIdentity): boolean {
  const stat = procStat(identity.pid);
  return stat !== null && identity.startTime !== '' && stat.startTime === identity.startTime;
}

/** A process identity read from untrusted JSON (an INFO reply), or null when it is not one. */
export function parseIdentity(value: unknown): ProcessIdentity | null {
  const v = value as { pid?: unknown; startTime?: unknown } | null;
  if (v === null || typeof v !== 'object') return null;
  if (typeof v.pid !== 'number' || !Number.isSafeInteger(v.pid) || v.pid <= 1) return null;
  if (typeof v.startTime !== 'string' || !/^\d{1,20}$/.test(v.startTime)) return null;
  return { pid: v.pid, startTime: v.startTime };
}
