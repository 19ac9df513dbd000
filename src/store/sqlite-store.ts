/**
 * The embedded state store on node:sqlite, for `zebu up` on one machine. Semantics: store.ts.
 *
 * Durability contract: every write is one SQLite transaction in WAL mode with synchronous=FULL,
 * so COMMIT returns only after the WAL is fsynced; the write's promise resolves after COMMIT.
 * Nothing (watch event, in-memory revision) is published before COMMIT returns.
 *
 * The file holds: the objects, the leases (id and TTL only: expiry is kept in memory, and a
 * reopened store gives every surviving lease a fresh full TTL, as etcd does after a leader
 * change, so that holders can keep them alive), the store revision, and the last `historyLimit`
 * changes (the watch history). The file is locked exclusively: one process owns a store.
 *
 * DatabaseSync is synchronous: each call runs to completion on the event loop thread, so no two
 * writes interleave and a read sees every committed write. Watch callbacks always run later, from
 * setImmediate, never inside a writer's call stack.
 */
import { randomBytes } from 'node:crypto';
import { DatabaseSync, type StatementSync } from 'node:sqlite';
import { ErrorCode, ZebuError, assert, invalid } from '../errors.ts';
import type { Lease, ListResult, Store, StoreObject, Watch, WatchEvent, WatchHandlers, WatchOptions, WriteGuard } from './store.ts';
import { checkGuard, checkKeyPart, checkLeaseId, checkLeaseTtl, checkRevision, fencedBy, serializeValue } from './validate.ts';

export interface SqliteStoreOptions {
  /** Clock for lease expiry, in ms; monotonic by default. Tests inject a fake one. */
  now?: () => number;
  /** How many changes the watch history keeps (default 10000); older afterRevisions get COMPACTED. */
  historyLimit?: number;
  /** How often expired leases are looked for (default 250 ms). */
  leaseCheckIntervalMs?: number;
}

const SCHEMA_VERSION = 1;
const SCHEMA_V1 = `
  CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) STRICT;
  INSERT INTO meta (key, value) VALUES ('revision', 0);
  CREATE TABLE leases (id TEXT PRIMARY KEY, ttl_ms INTEGER NOT NULL) STRICT;
  CREATE TABLE objects (
    kind TEXT NOT NULL, name TEXT NOT NULL, value TEXT NOT NULL,
    resource_version INTEGER NOT NULL, created_revision INTEGER NOT NULL,
    lease_id TEXT REFERENCES leases (id),
    PRIMARY KEY (kind, name)
  ) STRICT;
  CREATE INDEX objects_by_lease ON objects (lease_id) WHERE lease_id IS NOT NULL;
  -- The watch history: one row per change; the object after a put, before a delete.
  CREATE TABLE events (
    revision INTEGER PRIMARY KEY, type TEXT NOT NULL CHECK (type IN ('put', 'delete')),
    kind TEXT NOT NULL, name TEXT NOT NULL, value TEXT NOT NULL,
    resource_version INTEGER NOT NULL, created_revision INTEGER NOT NULL, lease_id TEXT
  ) STRICT;
`;

const DEFAULT_HISTORY_LIMIT = 10_000;
const DEFAULT_LEASE_CHECK_INTERVAL_MS = 250;
/** Events read from the history per query while a watch catches up. */
const WATCH_READ_BATCH = 256;
/** Events delivered per setImmediate turn, so that a busy watch does not starve I/O. */
const WATCH_DELIVERY_BATCH = 256;
/** Live events queued per watch; past this it drops them and reads the history instead. */
const WATCH_QUEUE_MAX = 1000;

/** An objects row, or an events row's object columns. */
interface ObjectRow {
  kind: string;
  name: string;
  value: string;
  resource_version: number;
  created_revision: number;
  lease_id: string | null;
}

interface EventRow extends ObjectRow {
  revision: number;
  type: 'put' | 'delete';
}

/** What a watch may see of its store. */
interface WatchSource {
  position(): { revision: number; compactedRevision: number };
  /** The history after `afterRevision` (of the watch's kind), oldest first, at most `limit` rows. */
  read(afterRevision: number, limit: number): EventRow[];
  forget(watcher: Watcher): void;
}

interface LeaseState {
  ttlMs: number;
  expiresAtMs: number;
}

export class SqliteStore implements Store {
  private readonly db: DatabaseSync;
  private readonly path: string;
  private readonly now: () => number;
  private readonly historyLimit: number;
  private readonly leaseTimer: NodeJS.Timeout;
  private readonly leases = new Map<string, LeaseState>();
  private readonly watchers = new Set<Watcher>();
  private readonly sql: Record<
    | 'getObject' | 'listKind' | 'listLease' | 'insertObject' | 'updateObject' | 'deleteObject'
    | 'insertEvent' | 'readEvents' | 'readKindEvents' | 'deleteEventsUpTo' | 'setRevision'
    | 'insertLease' | 'deleteLease',
    StatementSync
  >;
  /** The last committed revision, and the highest revision no longer in the history. */
  private revisionNow: number;
  private compactedRevision: number;
  private closed = false;
  /** State of the write in progress: the revision it reached and the events it made. */
  private txRevision = 0;
  private txEvents: EventRow[] = [];

  /** Opens (creating if needed) the store at `path`; ':memory:' for a store that lives in memory. */
  static open(path: string, options: SqliteStoreOptions = {}): SqliteStore {
    if (typeof path !== 'string' || path.length === 0) throw invalid('path: a file name or ":memory:"', 'path');
    const historyLimit = options.historyLimit ?? DEFAULT_HISTORY_LIMIT;
    if (!Number.isSafeInteger(historyLimit) || historyLimit < 1) throw invalid(`historyLimit ${historyLimit}: an integer >= 1`, 'historyLimit');
    const intervalMs = options.leaseCheckIntervalMs ?? DEFAULT_LEASE_CHECK_INTERVAL_MS;
    if (!Number.isSafeInteger(intervalMs) || intervalMs < 1) throw invalid(`leaseCheckIntervalMs ${intervalMs}: an integer >= 1`, 'leaseCheckIntervalMs');
    let db: DatabaseSync;
    try {
      db = new DatabaseSync(path, { timeout: 0 });
    } catch (err) {
      throw storeError(err, `cannot open the store ${path}`);
    }
    try {
      // Exclusive: the first write below takes the file lock and keeps it until close, so a
      // second process opening the same store fails (BUSY) instead of sharing it.
      db.exec('PRAGMA locking_mode = EXCLUSIVE');
      const mode = (db.prepare('PRAGMA journal_mode = WAL').get() as { journal_mode: string }).journal_mode;
      if (path !== ':memory:' && mode !== 'wal') throw new ZebuError(ErrorCode.EIO, `the store ${path} cannot use WAL journaling (got ${mode})`);
      db.exec('PRAGMA synchronous = FULL');
      migrate(db, path);
    } catch (err) {
      db.close();
      throw storeError(err, `cannot open the store ${path}`);
    }
    return new SqliteStore(db, path, options.now ?? (() => performance.now()), historyLimit, intervalMs);
  }

  private constructor(db: DatabaseSync, path: string, now: () => number, historyLimit: number, leaseCheckIntervalMs: number) {
    this.db = db;
    this.path = path;
    this.now = now;
    this.historyLimit = historyLimit;
    const objectColumns = 'kind, name, value, resource_version, created_revision, lease_id';
    this.sql = {
      getObject: db.prepare(`SELECT ${objectColumns} FROM objects WHERE kind = ? AND name = ?`),
      listKind: db.prepare(`SELECT ${objectColumns} FROM objects WHERE kind = ? ORDER BY name`),
      listLease: db.prepare(`SELECT ${objectColumns} FROM objects WHERE lease_id = ? ORDER BY kind, name`),
      insertObject: db.prepare(`INSERT INTO objects (${objectColumns}) VALUES (:kind, :name, :value, :resource_version, :created_revision, :lease_id)`),
      updateObject: db.prepare('UPDATE objects SET value = :value, resource_version = :resource_version WHERE kind = :kind AND name = :name'),
      deleteObject: db.prepare('DELETE FROM objects WHERE kind = ? AND name = ?'),
      insertEvent: db.prepare(`INSERT INTO events (revision, type, ${objectColumns}) VALUES (:revision, :type, :kind, :name, :value, :resource_version, :created_revision, :lease_id)`),
      readEvents: db.prepare(`SELECT revision, type, ${objectColumns} FROM events WHERE revision > ? ORDER BY revision LIMIT ?`),
      readKindEvents: db.prepare(`SELECT revision, type, ${objectColumns} FROM events WHERE revision > ? AND kind = ? ORDER BY revision LIMIT ?`),
      deleteEventsUpTo: db.prepare('DELETE FROM events WHERE revision <= ?'),
      setRevision: db.prepare("UPDATE meta SET value = ? WHERE key = 'revision'"),
      insertLease: db.prepare('INSERT INTO leases (id, ttl_ms) VALUES (?, ?)'),
      deleteLease: db.prepare('DELETE FROM leases WHERE id = ?'),
    };
    this.revisionNow = (db.prepare("SELECT value FROM meta WHERE key = 'revision'").get() as { value: number }).value;
    const oldest = (db.prepare('SELECT MIN(revision) AS oldest FROM events').get() as { oldest: number | null }).oldest;
    this.compactedRevision = oldest === null ? this.revisionNow : oldest - 1;
    assert(this.compactedRevision <= this.revisionNow, 'the history ends at the store revision');
    // A smaller historyLimit than the last run's takes effect now.
    const floor = this.revisionNow - this.historyLimit;
    if (floor > this.compactedRevision) {
      this.sql.deleteEventsUpTo.run(floor);
      this.compactedRevision = floor;
    }
    const openedAtMs = this.now();
    for (const row of db.prepare('SELECT id, ttl_ms FROM leases').all() as { id: string; ttl_ms: number }[]) {
      this.leases.set(row.id, { ttlMs: row.ttl_ms, expiresAtMs: openedAtMs + row.ttl_ms });
    }
    this.leaseTimer = setInterval(() => {
      // A failed expiry (I/O error) leaves the lease in place; the next tick tries again.
      try {
        if (!this.closed) this.expireLeases();
      } catch {}
    }, leaseCheckIntervalMs);
    this.leaseTimer.unref();
  }

  async get<T = unknown>(kind: string, name: string): Promise<StoreObject<T> | null> {
    this.enter();
    checkKeyPart(kind, 'kind');
    checkKeyPart(name, 'name');
    const row = this.sql.getObject.get(kind, name) as ObjectRow | undefined;
    return row === undefined ? null : toObject<T>(row);
  }

  async list<T = unknown>(kind: string): Promise<ListResult<T>> {
    this.enter();
    checkKeyPart(kind, 'kind');
    const rows = this.sql.listKind.all(kind) as unknown as ObjectRow[];
    return { items: rows.map((row) => toObject<T>(row)), revision: this.revisionNow };
  }

  async create<T = unknown>(kind: string, name: string, value: T, options: { leaseId?: string; guard?: WriteGuard } = {}): Promise<StoreObject<T>> {
    this.enter();
    checkKeyPart(kind, 'kind');
    checkKeyPart(name, 'name');
    const text = serializeValue(value);
    const leaseId = options.leaseId == null ? null : checkLeaseId(options.leaseId);
    if (leaseId !== null && !this.leases.has(leaseId)) {
      throw new ZebuError(ErrorCode.NOT_FOUND, `lease ${leaseId} has expired or was never granted`);
    }
    const guard = checkGuard(options.guard);
    return this.write(() => {
      this.holds(guard);
      if (this.sql.getObject.get(kind, name) !== undefined) throw new ZebuError(ErrorCode.EXISTS, `${kind} ${name} already exists`);
      const revision = ++this.txRevision;
      const row: ObjectRow = { kind, name, value: text, resource_version: revision, created_revision: revision, lease_id: leaseId };
      this.sql.insertObject.run({ ...row });
      this.recordEvent('put', revision, row);
      return toObject<T>(row);
    });
  }

  async update<T = unknown>(kind: string, name: string, value: T, options: { resourceVersion?: number; guard?: WriteGuard } = {}): Promise<StoreObject<T>> {
    this.enter();
    checkKeyPart(kind, 'kind');
    checkKeyPart(name, 'name');
    const text = serializeValue(value);
    const expected = options.resourceVersion === undefined ? null : checkRevision(options.resourceVersion, 'resourceVersion', 1);
    const guard = checkGuard(options.guard);
    return this.write(() => {
      this.holds(guard);
      const current = this.currentObject(kind, name, expected);
      const revision = ++this.txRevision;
      const row: ObjectRow = { ...current, value: text, resource_version: revision };
      this.sql.updateObject.run({ kind, name, value: text, resource_version: revision });
      this.recordEvent('put', revision, row);
      return toObject<T>(row);
    });
  }

  async delete(kind: string, name: string, options: { resourceVersion?: number; guard?: WriteGuard } = {}): Promise<void> {
    this.enter();
    checkKeyPart(kind, 'kind');
    checkKeyPart(name, 'name');
    const expected = options.resourceVersion === undefined ? null : checkRevision(options.resourceVersion, 'resourceVersion', 1);
    const guard = checkGuard(options.guard);
    this.write(() => {
      this.holds(guard);
      const current = this.currentObject(kind, name, expected);
      this.sql.deleteObject.run(kind, name);
      this.recordEvent('delete', ++this.txRevision, current);
    });
  }

  watch<T = unknown>(options: WatchOptions, handlers: WatchHandlers<T>): Watch {
    this.enter();
    const kind = options?.kind === undefined ? null : checkKeyPart(options.kind, 'kind');
    const after = options?.afterRevision === undefined ? this.revisionNow : checkRevision(options.afterRevision, 'afterRevision', 0);
    if (typeof handlers?.onEvent !== 'function') throw invalid('handlers.onEvent must be a function', 'onEvent');
    const source: WatchSource = {
      position: () => ({ revision: this.revisionNow, compactedRevision: this.compactedRevision }),
      read: (afterRevision, limit) => (kind === null
        ? this.sql.readEvents.all(afterRevision, limit)
        : this.sql.readKindEvents.all(afterRevision, kind, limit)) as unknown as EventRow[],
      forget: (w) => this.watchers.delete(w),
    };
    const watcher = new Watcher(source, kind, after, handlers as WatchHandlers);
    this.watchers.add(watcher);
    watcher.schedule();
    return { close: () => watcher.close() };
  }

  async revision(): Promise<number> {
    this.enter();
    return this.revisionNow;
  }

  async grantLease(ttlMs: number): Promise<Lease> {
    this.enter();
    checkLeaseTtl(ttlMs);
    const id = randomBytes(8).toString('hex');
    this.write(() => this.sql.insertLease.run(id, ttlMs));
    this.leases.set(id, { ttlMs, expiresAtMs: this.now() + ttlMs });
    return { id, ttlMs };
  }

  async keepAlive(leaseId: string): Promise<void> {
    this.enter();
    checkLeaseId(leaseId);
    const lease = this.leases.get(leaseId);
    if (lease === undefined) throw new ZebuError(ErrorCode.NOT_FOUND, `lease ${leaseId} has expired or was never granted`);
    lease.expiresAtMs = this.now() + lease.ttlMs;
  }

  async revokeLease(leaseId: string): Promise<void> {
    this.enter();
    checkLeaseId(leaseId);
    if (this.leases.has(leaseId)) this.endLease(leaseId);
  }

  /** Stops the lease timer, ends every watch with CLOSED (delivered before this resolves), closes the file. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    clearInterval(this.leaseTimer);
    const closedError = new ZebuError(ErrorCode.CLOSED, 'the store is closed');
    for (const watcher of [...this.watchers]) watcher.end(closedError);
    this.db.close();
    await new Promise((resolve) => setImmediate(resolve)); // after the watchers' onError calls
  }

  // ---- internal ----

  /** Every call starts here: refuse when closed; delete what expired leases held, so every call sees a consistent store. */
  private enter(): void {
    if (this.closed) throw new ZebuError(ErrorCode.CLOSED, 'the store is closed');
    this.expireLeases();
  }

  private expireLeases(): void {
    const nowMs = this.now();
    for (const [id, lease] of this.leases) {
      if (lease.expiresAtMs <= nowMs) this.endLease(id);
    }
  }

  /** Deletes a lease and its objects, one change (revision) per object, in one transaction. */
  private endLease(leaseId: string): void {
    this.write(() => {
      for (const row of this.sql.listLease.all(leaseId) as unknown as ObjectRow[]) {
        this.sql.deleteObject.run(row.kind, row.name);
        this.recordEvent('delete', ++this.txRevision, row);
      }
      this.sql.deleteLease.run(leaseId);
    });
    this.leases.delete(leaseId);
  }

  /** The object a write applies to: NOT_FOUND when absent, CONFLICT when it is not at `expected`. */
  /** Inside a write: FENCED unless the guard object is there, created at the guard's revision. */
  private holds(guard: WriteGuard | null): void {
    if (guard === null) return;
    const row = this.sql.getObject.get(guard.kind, guard.name) as ObjectRow | undefined;
    if (row === undefined || row.created_revision !== guard.createdRevision) throw fencedBy(guard);
  }

  private currentObject(kind: string, name: string, expected: number | null): ObjectRow {
    const row = this.sql.getObject.get(kind, name) as ObjectRow | undefined;
    if (row === undefined) throw new ZebuError(ErrorCode.NOT_FOUND, `${kind} ${name} does not exist`);
    if (expected !== null && row.resource_version !== expected) {
      throw new ZebuError(ErrorCode.CONFLICT, `${kind} ${name} changed: its resourceVersion is ${row.resource_version}, not ${expected}`);
    }
    return row;
  }

  private recordEvent(type: 'put' | 'delete', revision: number, object: ObjectRow): void {
    assert(revision === this.revisionNow + this.txEvents.length + 1, 'revisions are consecutive');
    const event: EventRow = { ...object, revision, type };
    this.sql.insertEvent.run({ ...event });
    this.txEvents.push(event);
  }

  /**
   * Runs `change` in one transaction: its events, the new store revision and the history trim
   * commit together. Watchers hear of the events only after COMMIT (durable) returns.
   */
  private write<R>(change: () => R): R {
    assert(!this.db.isTransaction, 'writes do not nest');
    this.txRevision = this.revisionNow;
    this.txEvents = [];
    let compactedRevision = this.compactedRevision;
    let result: R;
    try {
      this.db.exec('BEGIN IMMEDIATE');
      result = change();
      if (this.txEvents.length > 0) {
        this.sql.setRevision.run(this.txRevision);
        const floor = this.txRevision - this.historyLimit;
        if (floor > compactedRevision) {
          this.sql.deleteEventsUpTo.run(floor);
          compactedRevision = floor;
        }
      }
      this.db.exec('COMMIT');
    } catch (err) {
      try {
        if (this.db.isTransaction) this.db.exec('ROLLBACK');
      } catch {}
      this.txEvents = [];
      throw storeError(err, `write to the store ${this.path} failed`);
    }
    const events = this.txEvents;
    this.txEvents = [];
    assert(this.txRevision === this.revisionNow + events.length, 'one revision per change');
    this.revisionNow = this.txRevision;
    this.compactedRevision = compactedRevision;
    if (events.length > 0) for (const watcher of this.watchers) watcher.onCommit(events);
    return result;
  }
}

/**
 * One watch. It is either catching up (reading the history from `cursor`) or live (the store
 * pushes each commit's events into `queue`). It turns live at a history read that reached the
 * store revision: reads and commits never interleave, so no change falls between them; and
 * since it remembers the last revision it examined, no change is taken twice.
 */
class Watcher {
  private readonly source: WatchSource;
  private readonly kind: string | null;
  private readonly handlers: WatchHandlers;
  /** Every change up to `cursor` is delivered or not for this watch. */
  private cursor: number;
  /** Highest revision looked at (read from history or pushed); >= cursor. */
  private examined: number;
  private live = false;
  private queue: EventRow[] = [];
  private scheduled = false;
  /** active → ended (onError pending) → closed; closed delivers nothing. */
  private state: 'active' | 'ended' | 'closed' = 'active';

  constructor(source: WatchSource, kind: string | null, afterRevision: number, handlers: WatchHandlers) {
    this.source = source;
    this.kind = kind;
    this.handlers = handlers;
    this.cursor = afterRevision;
    this.examined = afterRevision;
  }

  schedule(): void {
    if (this.scheduled || this.state !== 'active') return;
    this.scheduled = true;
    setImmediate(() => this.pump());
  }

  onCommit(events: EventRow[]): void {
    if (this.state !== 'active') return;
    if (!this.live) return this.schedule(); // the history read will find them
    for (const event of events) {
      if (event.revision <= this.examined) continue; // afterRevision was ahead of the store
      this.examined = event.revision;
      if (this.kind === null || event.kind === this.kind) this.queue.push(event);
    }
    if (this.queue.length > WATCH_QUEUE_MAX) {
      // A slow consumer: keep memory bounded and read these from the history instead.
      this.queue = [];
      this.live = false;
      this.examined = this.cursor;
    }
    if (this.queue.length === 0 && this.live) this.cursor = this.examined;
    else this.schedule();
  }

  close(): void {
    this.state = 'closed';
    this.queue = [];
    this.source.forget(this);
  }

  /** Ends the watch; onError runs later (never inside the caller's stack) unless close() comes first. */
  end(err: Error): void {
    if (this.state !== 'active') return;
    this.state = 'ended';
    this.queue = [];
    this.source.forget(this);
    setImmediate(() => {
      if (this.state !== 'ended') return;
      this.state = 'closed';
      this.handlers.onError?.(err);
    });
  }

  private pump(): void {
    this.scheduled = false;
    for (let delivered = 0; delivered < WATCH_DELIVERY_BATCH; delivered++) {
      if (this.state !== 'active') return;
      if (this.queue.length === 0 && !this.catchUp()) return;
      const event = this.queue.shift()!;
      assert(event.revision > this.cursor, 'watch events are delivered in revision order, once');
      this.cursor = event.revision;
      if (this.queue.length === 0 && this.live) this.cursor = this.examined;
      try {
        this.handlers.onEvent(toEvent(event));
      } catch (err) {
        // A throwing callback ends its watch; with nobody to tell, the error stays loud.
        if (this.handlers.onError === undefined) throw err;
        this.end(err instanceof Error ? err : new Error(String(err)));
        return;
      }
    }
    this.schedule();
  }

  /** Fills the empty queue from the history; false when there is nothing to deliver now. */
  private catchUp(): boolean {
    if (this.live) return false;
    const { revision, compactedRevision } = this.source.position();
    if (this.cursor < compactedRevision) {
      this.end(new ZebuError(ErrorCode.COMPACTED,
        `the store no longer keeps changes after revision ${this.cursor} (history starts after ${compactedRevision}): list again, then watch`));
      return false;
    }
    const rows = this.source.read(this.cursor, WATCH_READ_BATCH);
    if (rows.length < WATCH_READ_BATCH) {
      this.live = true;
      this.examined = Math.max(this.cursor, revision);
    } else {
      this.examined = rows[rows.length - 1].revision;
    }
    this.queue = rows;
    if (rows.length > 0) return true;
    this.cursor = this.examined;
    return false;
  }
}

function migrate(db: DatabaseSync, path: string): void {
  db.exec('BEGIN IMMEDIATE');
  try {
    const version = (db.prepare('PRAGMA user_version').get() as { user_version: number }).user_version;
    if (version === 0) {
      db.exec(SCHEMA_V1);
      db.exec(`PRAGMA user_version = ${SCHEMA_VERSION}`);
    } else if (version !== SCHEMA_VERSION) {
      throw new ZebuError(ErrorCode.UNSUPPORTED,
        `the store ${path} has schema version ${version}; this Zebu knows version ${SCHEMA_VERSION} (was it written by a newer Zebu?)`);
    }
    db.exec('COMMIT');
  } catch (err) {
    if (db.isTransaction) db.exec('ROLLBACK');
    throw err;
  }
}

/** Each call parses afresh: callers may mutate what they get. */
function toObject<T>(row: ObjectRow): StoreObject<T> {
  return {
    kind: row.kind,
    name: row.name,
    resourceVersion: row.resource_version,
    createdRevision: row.created_revision,
    value: JSON.parse(row.value) as T,
    leaseId: row.lease_id,
  };
}

function toEvent(row: EventRow): WatchEvent {
  return { type: row.type, kind: row.kind, name: row.name, revision: row.revision, object: toObject(row) };
}

/** SQLite's errors as ZebuErrors: a full disk is ENOSPC, a store locked by another process BUSY. */
function storeError(err: unknown, context: string): ZebuError {
  if (err instanceof ZebuError) return err;
  const sqliteCode = (err as { errcode?: unknown } | null)?.errcode;
  const primaryCode = typeof sqliteCode === 'number' ? sqliteCode & 0xff : -1;
  const message = `${context}: ${err instanceof Error ? err.message : String(err)}`;
  const SQLITE_BUSY = 5, SQLITE_LOCKED = 6, SQLITE_FULL = 13;
  if (primaryCode === SQLITE_BUSY || primaryCode === SQLITE_LOCKED) {
    return new ZebuError(ErrorCode.BUSY, `${message} (is another process using this store?)`, { cause: err });
  }
  if (primaryCode === SQLITE_FULL) return new ZebuError(ErrorCode.ENOSPC, message, { cause: err });
  return new ZebuError(ErrorCode.EIO, message, { cause: err });
}
