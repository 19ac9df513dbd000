/** Parsing of command-line quantities. */
import { invalid } from '../errors.ts';

const UNITS: Record<string, number> = {
  '': 1, b: 1,
  k: 1000, kb: 1000, m: 1000 ** 2, mb: 1000 ** 2, g: 1000 ** 3, gb: 1000 ** 3, t: 1000 ** 4, tb: 1000 ** 4,
  ki: 1024, kib: 1024, mi: 1024 ** 2, mib: 1024 ** 2, gi: 1024 ** 3, gib: 1024 ** 3, ti: 1024 ** 4, tib: 1024 ** 4,
};

/** "1073741824", "1GiB", "512MiB", "10G" (decimal) -> bytes. */
export function parseBytes(text: string): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$/.exec(text);
  const unit = m ? UNITS[m[2].toLowerCase()] : undefined;
  if (!m || unit === undefined) throw invalid(`not a size: ${JSON.stringify(text)} (use bytes, or a unit such as KiB, MiB, GiB, TiB)`);
  const value = Number(m[1]) * unit;
  if (!Number.isSafeInteger(value)) throw invalid(`size ${JSON.stringify(text)} is not a whole number of bytes`);
  return value;
}

/** "HOST:PORT" or "[v6]:PORT" -> parts. Port 0 asks for any free port. */
export function parseHostPort(text: string): { host: string; port: number } {
  const m = /^(?:\[([^\]]+)\]|([^:]+)):(\d+)$/.exec(text);
  if (!m) throw invalid(`not HOST:PORT: ${JSON.stringify(text)}`);
  const port = Number(m[3]);
  if (port > 65535) throw invalid(`port out of range in ${JSON.stringify(text)}`);
  return { host: m[1] ?? m[2], port };
}

export function parsePositiveInt(text: string, what: string): number {
  if (!/^\d+$/.test(text)) throw invalid(`${what} must be a whole number, got ${JSON.stringify(text)}`);
  return Number(text);
}

/** A whole number >= 0 that fits a double exactly (milliseconds, counts). */
export function parseNonNegativeInt(text: string, what: string): number {
  const value = parsePositiveInt(text, what);
  if (!Number.isSafeInteger(value)) throw invalid(`${what} is too large: ${JSON.stringify(text)}`);
  return value;
}
