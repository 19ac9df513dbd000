/**
 * Downloads a backing image's bytes from an http(s) URL into a file on a disk, as an agent does
 * for the first file of a `download` image (docs/backing-images.md):
 *
 * - written to `PATH.part` and renamed to PATH only once complete, flushed and, when a checksum is
 *   expected, verified (SHA-512, computed while the bytes arrive): a file at PATH is always whole;
 * - a transfer cut off midway resumes where it stopped when the server honours `Range` (206 with
 *   the right start); a server that answers 200 instead is read again from the start;
 * - HTTP errors other than 408, 429 and 5xx are final (a 404 does not become right by retrying);
 *   network errors and those are retried a few times with a growing wait;
 * - a checksum mismatch is final and leaves nothing behind; so does a file larger than `maxBytes`.
 *
 * The HTTP client is injectable (tests, and a proxy-aware client later); by default the global fetch.
 */
import crypto from 'node:crypto';
import { setTimeout as delay } from 'node:timers/promises';
import fs from 'node:fs/promises';
import path from 'node:path';
import { ZebuError, ErrorCode } from '../errors.ts';

export interface ImageDownloadOptions {
  url: string;
  /** The final file; the download goes to `${path}.part` first. */
  path: string;
  /** SHA-512 in hex the bytes must have; null: whatever arrives (the result says what it was). */
  expectedChecksum: string | null;
  /** Refuse a larger image (the disk's free space); absent: no limit. */
  maxBytes?: number;
  signal?: AbortSignal;
  /** Called as bytes arrive (total null when the server does not say). */
  onProgress?: (doneBytes: number, totalBytes: number | null) => void;
  /** Attempts in all, for transient failures (default 5). */
  maxAttempts?: number;
  /** First wait between attempts, doubled each time (default 500 ms). */
  retryDelayMs?: number;
  fetch?: typeof fetch;
}

export interface ImageDownloadResult {
  sizeBytes: number;
  /** SHA-512 (hex) of the file. */
  checksum: string;
  attempts: number;
  /** Transfers continued with a Range request after a cut. */
  resumed: number;
  /** Transfers started again from byte 0 (the server ignored Range). */
  restarted: number;
}

class Retryable extends Error {}

/** Waits `ms`; an abort rejects with the abort's reason (not a generic AbortError). */
function sleep(ms: number, signal: AbortSignal | undefined): Promise<void> {
  return delay(ms, undefined, { signal }).catch(() => {
    throw signal!.reason;
  });
}

/** "bytes 100-199/1000" -> { start: 100, total: 1000 }; null when it is not that. */
function parseContentRange(value: string | null): { start: number; total: number | null } | null {
  const m = /^bytes (\d+)-\d+\/(\d+|\*)$/.exec(value ?? '');
  if (m === null) return null;
  return { start: Number(m[1]), total: m[2] === '*' ? null : Number(m[2]) };
}

export async function downloadImage(o: ImageDownloadOptions): Promise<ImageDownloadResult> {
  const request = o.fetch ?? fetch;
  const part = `${o.path}.part`;
  const maxAttempts = o.maxAttempts ?? 5;
  const file = await fs.open(part, 'w');
  let hash = crypto.createHash('sha512');
  let offset = 0;
  let total: number | null = null;
  let attempts = 0;
  let resumed = 0;
  let restarted = 0;
  let done = false;
  try {
    for (;;) {
      attempts++;
      try {
        const headers: Record<string, string> = {};
        if (offset > 0) headers.range = `bytes=${offset}-`;
        let response: Response;
        try {
          response = await request(o.url, { headers, signal: o.signal, redirect: 'follow' });
        } catch (err) {
          if (o.signal?.aborted) throw err;
          throw new Retryable(`cannot reach ${o.url}: ${(err as Error).cause instanceof Error ? ((err as Error).cause as Error).message : (err as Error).message}`);
        }
        if (offset > 0 && response.status === 206) {
          const range = parseContentRange(response.headers.get('content-range'));
          if (range === null || range.start !== offset) throw new Retryable(`the server answered a resume at byte ${offset} with ${response.headers.get('content-range') ?? 'no Content-Range'}`);
          total = range.total ?? total;
          resumed++;
        } else if (response.status === 200) {
          if (offset > 0) {
            // Range not honoured: the whole body comes again.
            await file.truncate(0);
            hash = crypto.createHash('sha512');
            offset = 0;
            restarted++;
          }
          const length = response.headers.get('content-length');
          total = length !== null && /^\d+$/.test(length) ? Number(length) : null;
        } else {
          await response.body?.cancel().catch(() => {});
          const text = `${o.url}: HTTP ${response.status} ${response.statusText}`.trim();
          if (response.status === 408 || response.status === 429 || response.status >= 500) throw new Retryable(text);
          throw new ZebuError(response.status === 404 || response.status === 410 ? ErrorCode.NOT_FOUND : ErrorCode.EIO, text);
        }
        if (o.maxBytes !== undefined && total !== null && total > o.maxBytes) {
          await response.body?.cancel().catch(() => {});
          throw new ZebuError(ErrorCode.ENOSPC, `${o.url} is ${total} bytes; the disk has room for ${o.maxBytes}`);
        }
        if (response.body === null) throw new Retryable(`${o.url}: the server sent no body`);
        try {
          for await (const chunk of response.body as unknown as AsyncIterable<Uint8Array>) {
            if (o.maxBytes !== undefined && offset + chunk.length > o.maxBytes) throw new ZebuError(ErrorCode.ENOSPC, `${o.url} is larger than the ${o.maxBytes} bytes the disk has room for`);
            await file.write(chunk, 0, chunk.length, offset);
            hash.update(chunk);
            offset += chunk.length;
            o.onProgress?.(offset, total);
          }
        } catch (err) {
          if (err instanceof ZebuError || o.signal?.aborted) throw err;
          throw new Retryable(`${o.url}: the transfer broke at byte ${offset}: ${(err as Error).message}`);
        }
        if (total !== null && offset !== total) throw new Retryable(`${o.url}: the transfer ended at byte ${offset} of ${total}`);
        break;
      } catch (err) {
        if (!(err instanceof Retryable)) throw err;
        if (attempts >= maxAttempts) throw new ZebuError(ErrorCode.EIO, `${err.message} (gave up after ${attempts} attempts)`);
        await sleep((o.retryDelayMs ?? 500) * 2 ** (attempts - 1), o.signal);
      }
    }
    await file.sync();
    const checksum = hash.digest('hex');
    if (o.expectedChecksum !== null && checksum !== o.expectedChecksum.toLowerCase()) {
      throw new ZebuError(ErrorCode.EINVAL, `checksum mismatch for ${o.url}: expected SHA-512 ${o.expectedChecksum.toLowerCase()}, the ${offset} bytes received have ${checksum}`);
    }
    await file.close();
    await fs.rename(part, o.path);
    const dir = await fs.open(path.dirname(o.path), 'r');
    try {
      await dir.sync();
    } finally {
      await dir.close();
    }
    done = true;
    return { sizeBytes: offset, checksum, attempts, resumed, restarted };
  } finally {
    if (!done) {
      await file.close().catch(() => {});
      await fs.rm(part, { force: true });
    }
  }
}
