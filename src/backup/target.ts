/**
 * Where backups are kept: a local directory (`file:///DIR`, also how an NFS mount is used) or an
 * S3 bucket (`s3://BUCKET/PREFIX`). Both are a flat key -> bytes space behind one small
 * interface; everything about the backup format is in format.ts, not here.
 *
 * Rules every implementation keeps:
 * - `put` is all or nothing: a reader never sees a partly written object (a file is written
 *   to a temporary name, fsync'd and renamed; an S3 PUT is atomic).
 * - `get` of a missing key returns null; any other failure throws a ZebuError saying what and
 *   where (the S3 code and HTTP status, or the errno).
 * - `list` is used only for the manifests of a volume and the volume names (a catalog sync),
 *   never for blocks: listing blocks is what makes backups slow and costly on S3.
 * - Transient S3 failures (5xx, throttling, a dropped connection) are retried with backoff
 *   before an error is thrown.
 */
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import path from 'node:path';
import crypto from 'node:crypto';
import {
  S3Client,
  PutObjectCommand,
  GetObjectCommand,
  HeadObjectCommand,
  DeleteObjectCommand,
  ListObjectsV2Command,
  HeadBucketCommand,
  type S3ServiceException,
} from '@aws-sdk/client-s3';
import { ZebuError, ErrorCode, assert } from '../errors.ts';
import { DirectWriter } from './direct-write.ts';

export interface TargetListing {
  /** Keys directly under the prefix (relative to the target's root). */
  keys: string[];
  /** "Directories" one level down (with delimiter '/'), each ending in '/'. */
  prefixes: string[];
}

export interface PutOptions {
  /**
   * The object need not be durable when put() resolves, only after the next flush() (blocks:
   * one flush before the manifest that names them, instead of one per block).
   */
  deferSync?: boolean;
}

/** An object written but not yet visible under its key (see BackupTarget.stage). */
export interface StagedObject {
  /** Makes it visible under its key, as a put with deferSync would (durable after the next flush()). */
  commit(): Promise<void>;
  /** Drops it; it never becomes visible. */
  discard(): Promise<void>;
}

export interface BackupTarget {
  /** The target's URL as the user gave it (never with credentials). */
  readonly url: string;
  /** `data` in parts is stored as their concatenation. */
  put(key: string, data: Buffer | readonly Buffer[], options?: PutOptions): Promise<void>;
  /**
   * The first half of a deferred put: once this resolves the caller may reuse `data`, and the
   * object is visible only after commit(). A backup writes a block's bytes while the partial
   * manifest that lists it is being written, and makes the block visible after that.
   */
  stage(key: string, data: Buffer | readonly Buffer[]): Promise<StagedObject>;
  /** Makes every object put with deferSync durable. */
  flush(): Promise<void>;
  get(key: string): Promise<Buffer | null>;
  exists(key: string): Promise<boolean>;
  /** No error when the key is already gone. */
  delete(key: string): Promise<void>;
  /** Keys and sub-prefixes directly under `prefix` (which ends in '/'). */
  list(prefix: string): Promise<TargetListing>;
  close(): void;
}

export interface S3Credentials {
  accessKeyId: string;
  secretAccessKey: string;
  sessionToken?: string;
}

export interface TargetOptions {
  /** S3 only: the endpoint of an S3-compatible server (path-style addressing is then used). */
  endpoint?: string | null;
  /** S3 only; default us-east-1. */
  region?: string | null;
  credentials?: S3Credentials | null;
  /** Attempts for a transient failure (S3); default 5. */
  attempts?: number;
  /** First retry delay, doubled each time (S3); default 200 ms. */
  retryDelayMs?: number;
  /** Per-request deadline (S3); default 60 s. */
  requestTimeoutMs?: number;
  /** Directory targets: write blocks around the page cache where the filesystem allows (default true). */
  directIo?: boolean;
}

export interface ParsedTargetUrl {
  scheme: 'file' | 's3';
  /** file: the directory. s3: the bucket. */
  location: string;
  /** s3: the key prefix ('' or ending in '/'); file: ''. */
  prefix: string;
}

/** Parses and checks a target URL; EINVAL with field "url" says what is wrong. */
export function parseTargetUrl(url: string): ParsedTargetUrl {
  const bad = (why: string): ZebuError => new ZebuError(ErrorCode.EINVAL, `backup target URL ${JSON.stringify(url)}: ${why}`, { field: 'url' });
  if (typeof url !== 'string' || url.length === 0 || url.length > 1024) throw bad('must be 1-1024 characters');
  let parsed: URL;
  try {
    parsed = new URL(url);
  } catch {
    throw bad('not a URL (expected file:///DIR or s3://BUCKET/PREFIX)');
  }
  if (parsed.protocol === 'file:') {
    if (parsed.host !== '') throw bad('a file URL has no host (file:///DIR)');
    if (parsed.search !== '' || parsed.hash !== '') throw bad('a file URL has no query or fragment');
    const dir = decodeURIComponent(parsed.pathname);
    if (!path.isAbsolute(dir) || dir === '/') throw bad('the directory must be an absolute path other than /');
    return { scheme: 'file', location: path.normalize(dir).replace(/\/$/, ''), prefix: '' };
  }
  if (parsed.protocol === 's3:') {
    // The URL parser lowercases the host and folds "..": check what the user wrote instead.
    const raw = url.slice(url.indexOf('//') + 2);
    const slash = raw.indexOf('/');
    const bucket = slash < 0 ? raw : raw.slice(0, slash);
    if (parsed.username !== '' || parsed.password !== '' || bucket.includes('@')) throw bad('put the credentials in a credential file, not in the URL');
    if (parsed.port !== '' || bucket.includes(':')) throw bad('put the endpoint in its own option, not in the URL');
    if (!/^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$/.test(bucket)) throw bad('the bucket name must be 3-63 characters of a-z, 0-9, "." and "-"');
    if (parsed.search !== '' || parsed.hash !== '') throw bad('an s3 URL has no query or fragment');
    let prefix = slash < 0 ? '' : decodeURIComponent(raw.slice(slash + 1));
    if (prefix.split('/').some((part) => part === '.' || part === '..')) throw bad('the prefix may not contain . or .. parts');
    if (prefix.startsWith('/') || prefix.includes('//')) throw bad('the prefix may not have empty parts');
    if (prefix !== '' && !prefix.endsWith('/')) prefix += '/';
    if (prefix !== '' && !/^([A-Za-z0-9._-]+\/)+$/.test(prefix)) throw bad('the prefix may only contain A-Z, a-z, 0-9, ".", "_", "-" and "/"');
    return { scheme: 's3', location: bucket, prefix };
  }
  throw bad(`unsupported scheme ${parsed.protocol} (expected file: or s3:)`);
}

/** Keys are relative paths of [A-Za-z0-9._-] parts; nothing can climb out of the root. */
function checkKey(key: string): void {
  if (!/^[A-Za-z0-9._-]+(\/[A-Za-z0-9._-]+)*\/?$/.test(key) || key.split('/').some((p) => p === '.' || p === '..')) {
    throw new ZebuError(ErrorCode.EINVAL, `bad backup target key ${JSON.stringify(key)}`);
  }
}

export function openTarget(url: string, options: TargetOptions = {}): BackupTarget {
  const parsed = parseTargetUrl(url);
  if (parsed.scheme === 'file') return new FileTarget(url, parsed.location, { directIo: options.directIo });
  return new S3Target(url, parsed.location, parsed.prefix, options);
}

// ---- file:// ----------------------------------------------------------------------------------

const TEMP_PREFIX = '.tmp-';
const STAGING_DIR = '.staging';
/** A staged file this old was left by a process that crashed (commits follow within seconds). */
const STALE_STAGED_MS = 60 * 60 * 1000;
/** Deferred files (2 MiB blocks) that start an early sync, and how many such syncs run at once. */
const EARLY_SYNC_FILES = 32;
const EARLY_SYNCS = 2;
/** fsyncs in flight at once (each holds a thread of the pool). */
const SYNCS_AT_ONCE = 32;
/** An early sync's fsyncs in flight: few, so that the writes of the blocks behind it get threads (measured: 4 beat 1, 8 and 32). */
const EARLY_SYNCS_AT_ONCE = 4;

export class FileTarget implements BackupTarget {
  readonly url: string;
  readonly root: string;
  /** Files put with deferSync and not yet synced, and the directories holding their names. */
  private readonly unsyncedFiles = new Set<string>();
  private readonly unsyncedDirs = new Set<string>();
  /** Syncs started before flush() (so the disk writes while the backup goes on), and their first failure. */
  private readonly syncing = new Set<Promise<void>>();
  private syncFailure: unknown = null;
  /** Directories known to exist (made or seen by a put): no mkdir for every block. */
  private readonly knownDirs = new Set<string>();
  /** fsync of a file or directory by path (tests record what is made durable). */
  private readonly syncPath: (p: string) => Promise<void>;

  /** Writes new files; blocks around the page cache where the filesystem allows. */
  readonly writer: DirectWriter;

  constructor(url: string, root: string, options: { sync?: (p: string) => Promise<void>; directIo?: boolean } = {}) {
    this.url = url;
    this.root = root;
    this.syncPath = options.sync ?? syncPath;
    this.writer = new DirectWriter({ direct: options.directIo });
  }

  private full(key: string): string {
    checkKey(key);
    return path.join(this.root, key);
  }

  /**
   * Makes `dir` (and what is missing above it) exist; returns the directories whose entries
   * changed because of it (each new directory's parent), which must be synced for its name to last.
   */
  private async makeDir(dir: string): Promise<string[]> {
    const parents: string[] = [];
    if (this.knownDirs.has(dir)) return parents;
    const created = await fsp.mkdir(dir, { recursive: true });
    if (created !== undefined) {
      for (let d = dir; ; d = path.dirname(d)) {
        parents.push(path.dirname(d));
        if (d === created || d === path.dirname(d)) break;
      }
    }
    this.knownDirs.add(dir);
    return parents;
  }

  /** Creates `file` (a new temporary name) holding `data`; on failure nothing is left behind. */
  private async writeNew(file: string, dir: string, data: Buffer | readonly Buffer[], datasync: boolean): Promise<string[]> {
    const parents = await this.makeDir(dir);
    // A directory this process made was removed meanwhile (by hand): it is made again.
    const onMissingDir = async (): Promise<void> => {
      this.knownDirs.delete(dir);
      parents.push(...(await this.makeDir(dir)));
    };
    try {
      await this.writer.writeNew(file, Buffer.isBuffer(data) ? [data] : data, { datasync, onMissingDir });
    } catch (err) {
      await fsp.rm(file, { force: true }).catch(() => {});
      throw err;
    }
    return parents;
  }

  /** Renames a written temporary file to `file`; records what a later flush must sync. */
  private async publish(tmp: string, file: string, deferSync: boolean, parentsMade: string[]): Promise<void> {
    const dir = path.dirname(file);
    const parents = [...parentsMade, ...(await this.makeDir(dir))];
    try {
      await fsp.rename(tmp, file);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT' || !this.knownDirs.has(dir)) throw err;
      // The target directory was removed meanwhile (by hand): make it again.
      this.knownDirs.delete(dir);
      parents.push(...(await this.makeDir(dir)));
      await fsp.rename(tmp, file);
    }
    if (deferSync) {
      this.unsyncedFiles.add(file);
      this.unsyncedDirs.add(dir);
      for (const p of parents) this.unsyncedDirs.add(p);
      if (this.unsyncedFiles.size >= EARLY_SYNC_FILES && this.syncing.size < EARLY_SYNCS) this.syncEarly();
      return;
    }
    // The rename is durable once the directory is: a manifest must not vanish in a power cut
    // after the backup said it completed.
    await this.syncPath(dir);
    for (const p of parents) await this.syncPath(p);
  }

  async put(key: string, data: Buffer | readonly Buffer[], options: PutOptions = {}): Promise<void> {
    const file = this.full(key);
    const dir = path.dirname(file);
    const tmp = path.join(dir, `${TEMP_PREFIX}${path.basename(file)}-${crypto.randomBytes(6).toString('hex')}`);
    const deferSync = options.deferSync === true;
    try {
      const parents = await this.writeNew(tmp, dir, data, !deferSync);
      await this.publish(tmp, file, deferSync, parents);
    } catch (err) {
      await fsp.rm(tmp, { force: true }).catch(() => {});
      throw fileError(err, `write ${key}`, this.root);
    }
  }

  /**
   * Staged objects wait in one directory (`.staging`), so that those a crashed process left are
   * found without listing the blocks; the first stage of a process removes ones older than an hour.
   */
  async stage(key: string, data: Buffer | readonly Buffer[]): Promise<StagedObject> {
    const file = this.full(key);
    const staging = path.join(this.root, STAGING_DIR);
    const tmp = path.join(staging, `${path.basename(file)}-${process.pid}-${crypto.randomBytes(6).toString('hex')}`);
    this.stagingSwept ??= this.removeStaleStaged(staging);
    try {
      await this.writeNew(tmp, staging, data, false);
    } catch (err) {
      throw fileError(err, `write ${key}`, this.root);
    }
    let done = false;
    return {
      commit: async () => {
        assert(!done, `staged ${key} committed or discarded twice`);
        done = true;
        try {
          await this.publish(tmp, file, true, []);
        } catch (err) {
          await fsp.rm(tmp, { force: true }).catch(() => {});
          throw fileError(err, `write ${key}`, this.root);
        }
      },
      discard: async () => {
        if (done) return;
        done = true;
        await fsp.rm(tmp, { force: true }).catch(() => {});
      },
    };
  }

  private stagingSwept: Promise<void> | undefined;

  private async removeStaleStaged(staging: string): Promise<void> {
    const before = Date.now() - STALE_STAGED_MS;
    let names: string[];
    try {
      names = await fsp.readdir(staging);
    } catch {
      return;
    }
    for (const name of names) {
      const p = path.join(staging, name);
      try {
        if ((await fsp.stat(p)).mtimeMs < before) await fsp.rm(p, { force: true });
      } catch {
        // gone meanwhile, or not ours to remove: harmless
      }
    }
  }

  /**
   * Syncs the deferred files put so far without waiting: their bytes go to the disk while the
   * backup reads on, instead of all at the end. A failure is reported by the next flush().
   */
  private syncEarly(): void {
    const files = [...this.unsyncedFiles];
    this.unsyncedFiles.clear();
    const done = this.syncEach(files, EARLY_SYNCS_AT_ONCE).catch((err: unknown) => {
      this.syncFailure ??= err;
    });
    this.syncing.add(done);
    void done.finally(() => this.syncing.delete(done));
  }

  private async syncEach(paths: readonly string[], atOnce = SYNCS_AT_ONCE): Promise<void> {
    for (let i = 0; i < paths.length; i += atOnce) await Promise.all(paths.slice(i, i + atOnce).map((p) => this.syncPath(p)));
  }

  async flush(): Promise<void> {
    await Promise.all([...this.syncing]);
    const early = this.syncFailure;
    this.syncFailure = null;
    // Files first, then the directories holding their names.
    const files = [...this.unsyncedFiles];
    const dirs = [...this.unsyncedDirs];
    this.unsyncedFiles.clear();
    this.unsyncedDirs.clear();
    try {
      // An early sync that failed: its files are not known to be durable (a caller puts them again).
      if (early !== null) throw early;
      await this.syncEach(files);
      await this.syncEach(dirs);
    } catch (err) {
      for (const p of files) this.unsyncedFiles.add(p);
      for (const p of dirs) this.unsyncedDirs.add(p);
      throw fileError(err, 'make blocks durable', this.root);
    }
  }

  async get(key: string): Promise<Buffer | null> {
    try {
      return await fsp.readFile(this.full(key));
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return null;
      throw fileError(err, `read ${key}`, this.root);
    }
  }

  async exists(key: string): Promise<boolean> {
    try {
      await fsp.access(this.full(key), fs.constants.F_OK);
      return true;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return false;
      throw fileError(err, `look up ${key}`, this.root);
    }
  }

  async delete(key: string): Promise<void> {
    try {
      await fsp.rm(this.full(key), { force: true });
    } catch (err) {
      throw fileError(err, `delete ${key}`, this.root);
    }
  }

  async list(prefix: string): Promise<TargetListing> {
    const dir = prefix === '' ? this.root : this.full(prefix);
    let entries: fs.Dirent[];
    try {
      entries = await fsp.readdir(dir, { withFileTypes: true });
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return { keys: [], prefixes: [] };
      throw fileError(err, `list ${prefix || '/'}`, this.root);
    }
    const keys: string[] = [];
    const prefixes: string[] = [];
    for (const entry of entries.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0))) {
      // Temporary and staged files, and the staging directory, are not objects.
      if (entry.name.startsWith('.')) continue;
      if (entry.isDirectory()) prefixes.push(`${prefix}${entry.name}/`);
      else if (entry.isFile()) keys.push(`${prefix}${entry.name}`);
    }
    return { keys, prefixes };
  }

  close(): void {}
}

/** fsync of a file or a directory (a directory's fsync makes the names in it durable). */
export async function syncPath(p: string): Promise<void> {
  const handle = await fsp.open(p, 'r');
  try {
    await handle.sync();
  } finally {
    await handle.close();
  }
}

function fileError(err: unknown, what: string, root: string): ZebuError {
  const e = err as NodeJS.ErrnoException;
  if (err instanceof ZebuError) return err;
  const code = e.code === 'ENOSPC' || e.code === 'EDQUOT' ? ErrorCode.ENOSPC : e.code === 'EACCES' || e.code === 'EPERM' || e.code === 'EROFS' ? ErrorCode.EIO : ErrorCode.EIO;
  return new ZebuError(code, `backup target ${root}: cannot ${what}: ${e.code ?? ''} ${e.message}`.replace(/\s+/g, ' '), { cause: err });
}

// ---- s3:// ------------------------------------------------------------------------------------

export class S3Target implements BackupTarget {
  readonly url: string;
  readonly bucket: string;
  readonly prefix: string;
  private readonly client: S3Client;
  private readonly attempts: number;
  private readonly retryDelayMs: number;
  private readonly endpoint: string;

  constructor(url: string, bucket: string, prefix: string, options: TargetOptions) {
    this.url = url;
    this.bucket = bucket;
    this.prefix = prefix;
    this.attempts = options.attempts ?? 5;
    this.retryDelayMs = options.retryDelayMs ?? 200;
    this.endpoint = options.endpoint ?? 'AWS';
    const credentials = options.credentials ?? undefined;
    this.client = new S3Client({
      region: options.region ?? 'us-east-1',
      ...(options.endpoint ? { endpoint: options.endpoint, forcePathStyle: true } : {}),
      ...(credentials ? { credentials } : {}),
      // Our own retries (below) report what failed; the SDK's would hide it.
      maxAttempts: 1,
      // Checksums only where S3 requires them: S3-compatible servers differ in what they accept.
      requestChecksumCalculation: 'WHEN_REQUIRED',
      responseChecksumValidation: 'WHEN_REQUIRED',
      requestHandler: { requestTimeout: options.requestTimeoutMs ?? 60_000, connectionTimeout: 10_000 },
    });
  }

  private key(key: string): string {
    checkKey(key);
    return this.prefix + key;
  }

  /** Runs one S3 call, retrying transient failures with backoff. */
  private async call<T>(what: string, run: () => Promise<T>): Promise<T> {
    let delay = this.retryDelayMs;
    for (let attempt = 1; ; attempt++) {
      try {
        return await run();
      } catch (err) {
        const status = (err as S3ServiceException).$metadata?.httpStatusCode;
        const name = (err as Error).name;
        const transient = status === undefined || status >= 500 || status === 429 || name === 'SlowDown' || name === 'RequestTimeout' || name === 'TimeoutError';
        if (!transient || attempt >= this.attempts) throw this.error(err, what, attempt);
        await new Promise((resolve) => setTimeout(resolve, delay + Math.floor(Math.random() * delay)));
        delay = Math.min(delay * 2, 10_000);
      }
    }
  }

  private error(err: unknown, what: string, attempts: number): ZebuError {
    const status = (err as S3ServiceException).$metadata?.httpStatusCode;
    const name = (err as Error).name;
    const message = (err as Error).message;
    const where = `s3://${this.bucket}/${this.prefix} at ${this.endpoint}`;
    const tried = attempts > 1 ? ` (after ${attempts} attempts)` : '';
    const code =
      status === 403 || name === 'InvalidAccessKeyId' || name === 'SignatureDoesNotMatch' || name === 'AccessDenied'
        ? ErrorCode.UNAUTHORIZED
        : name === 'NoSuchBucket'
          ? ErrorCode.NOT_FOUND
          : name === 'EntityTooLarge' || name === 'QuotaExceeded'
            ? ErrorCode.ENOSPC
            : status === undefined
              ? ErrorCode.DISCONNECTED
              : ErrorCode.EIO;
    return new ZebuError(code, `backup target ${where}: cannot ${what}: ${name}${status !== undefined ? ` (HTTP ${status})` : ''}: ${message}${tried}`, { cause: err });
  }

  async put(key: string, parts: Buffer | readonly Buffer[]): Promise<void> {
    // An S3 PUT is durable when it is answered.
    const Key = this.key(key);
    const data = Buffer.isBuffer(parts) ? parts : Buffer.concat(parts);
    await this.call(`write ${key}`, () => this.client.send(new PutObjectCommand({ Bucket: this.bucket, Key, Body: data, ContentLength: data.length })));
  }

  async stage(key: string, parts: Buffer | readonly Buffer[]): Promise<StagedObject> {
    // Nothing to write ahead on S3 (a PUT is atomic): keep a copy, since the caller reuses `parts`.
    const data = Buffer.concat(Buffer.isBuffer(parts) ? [parts] : parts);
    let done = false;
    return {
      commit: () => {
        assert(!done, `staged ${key} committed or discarded twice`);
        done = true;
        return this.put(key, data);
      },
      discard: async () => {
        done = true;
      },
    };
  }

  async get(key: string): Promise<Buffer | null> {
    const Key = this.key(key);
    return this.call(`read ${key}`, async () => {
      try {
        const out = await this.client.send(new GetObjectCommand({ Bucket: this.bucket, Key }));
        return Buffer.from(await out.Body!.transformToByteArray());
      } catch (err) {
        if ((err as Error).name === 'NoSuchKey' || (err as S3ServiceException).$metadata?.httpStatusCode === 404 && (err as Error).name !== 'NoSuchBucket') return null;
        throw err;
      }
    });
  }

  async exists(key: string): Promise<boolean> {
    const Key = this.key(key);
    return this.call(`look up ${key}`, async () => {
      try {
        await this.client.send(new HeadObjectCommand({ Bucket: this.bucket, Key }));
        return true;
      } catch (err) {
        if ((err as Error).name === 'NotFound' || (err as S3ServiceException).$metadata?.httpStatusCode === 404) return false;
        throw err;
      }
    });
  }

  async delete(key: string): Promise<void> {
    const Key = this.key(key);
    await this.call(`delete ${key}`, () => this.client.send(new DeleteObjectCommand({ Bucket: this.bucket, Key })));
  }

  async list(prefix: string): Promise<TargetListing> {
    if (prefix !== '') checkKey(prefix);
    const keys: string[] = [];
    const prefixes: string[] = [];
    let token: string | undefined;
    do {
      const out = await this.call(`list ${prefix || '/'}`, () =>
        this.client.send(new ListObjectsV2Command({ Bucket: this.bucket, Prefix: this.prefix + prefix, Delimiter: '/', ContinuationToken: token })),
      );
      for (const o of out.Contents ?? []) if (o.Key !== undefined) keys.push(o.Key.slice(this.prefix.length));
      for (const p of out.CommonPrefixes ?? []) if (p.Prefix !== undefined) prefixes.push(p.Prefix.slice(this.prefix.length));
      token = out.IsTruncated ? out.NextContinuationToken : undefined;
    } while (token !== undefined);
    return { keys, prefixes };
  }

  async flush(): Promise<void> {}

  /** The bucket exists and the credentials reach it. */
  async headBucket(): Promise<void> {
    await this.call('reach the bucket', () => this.client.send(new HeadBucketCommand({ Bucket: this.bucket })));
  }

  close(): void {
    this.client.destroy();
  }
}

/**
 * Whether the target is reachable and writable: writes, reads back and deletes a small probe
 * object. Returns null when it is, or the reason when not.
 */
export async function checkTarget(target: BackupTarget): Promise<string | null> {
  const key = `zebu-probe-${crypto.randomBytes(8).toString('hex')}`;
  const data = crypto.randomBytes(64);
  try {
    if (target instanceof S3Target) await target.headBucket();
    await target.put(key, data);
    const back = await target.get(key);
    if (back === null || !back.equals(data)) return `a probe object written to ${target.url} did not read back the same`;
    await target.delete(key);
    return null;
  } catch (err) {
    return (err as Error).message;
  }
}
