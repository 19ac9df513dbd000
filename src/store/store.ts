/**
 * The state store: where the manager keeps every object (volumes, replicas, nodes, ...), and the
 * one thing the manager and the agents share. See docs/architecture.md ("Objects in the store").
 *
 * The interface is shaped after etcd's key-value model so that it has two implementations that
 * behave the same: the embedded one on node:sqlite (sqlite-store.ts, `zebu up`) and etcd (a later
 * issue). Nothing outside an implementation may know how it stores things.
 *
 * - Every write (create, update, delete, lease expiry) gets the next store-wide `revision`, a
 *   positive integer that only grows. An object's `resourceVersion` is the revision of its last
 *   write; `createdRevision` the revision of its creation.
 * - Optimistic concurrency: `update` and `delete` may name the resourceVersion the caller read;
 *   if the object changed since, they fail with CONFLICT and change nothing.
 * - `watch` delivers, in revision order and exactly once, every change after `afterRevision`
 *   (list, then watch after the list's revision: no change is missed). History older than the
 *   store keeps fails the watch with COMPACTED; the caller lists again.
 * - Leases: an object created with a lease is deleted (with a delete event) when the lease
 *   expires or is revoked. Used for node liveness and leader election.
 * - Durability: a write's promise resolves only once the write is durable.
 *
 * Errors are ZebuErrors: EXISTS (create of an existing name), NOT_FOUND, CONFLICT, COMPACTED,
 * FENCED (a write's guard does not hold), EINVAL (bad kind/name/value), CLOSED (store closed).
 */

/** Kinds and names: 1-253 characters of [A-Za-z0-9._-], first a letter or digit. */
export const STORE_KEY_PART = /^[A-Za-z0-9][A-Za-z0-9._-]{0,252}$/;

export interface StoreObject<T = unknown> {
  kind: string;
  name: string;
  /** Revision of the last write to this object. */
  resourceVersion: number;
  /** Revision at which the object was created. */
  createdRevision: number;
  /** Any JSON value; the store does not look inside. */
  value: T;
  /** The lease the object is attached to, if any. */
  leaseId: string | null;
}

export interface ListResult<T = unknown> {
  items: StoreObject<T>[];
  /** Store revision the list was read at; watch with afterRevision = this to miss nothing. */
  revision: number;
}

export interface WatchEvent<T = unknown> {
  type: 'put' | 'delete';
  kind: string;
  name: string;
  revision: number;
  /** The object after a put; the object as it was before a delete. */
  object: StoreObject<T>;
}

export interface WatchOptions {
  /** Only this kind; all kinds when absent. */
  kind?: string;
  /** Deliver changes with revision > afterRevision. Absent: only changes from now on. */
  afterRevision?: number;
}

export interface Watch {
  /** Stops delivery; no callback runs after close() returns. */
  close(): void;
}

export interface WatchHandlers<T = unknown> {
  onEvent: (event: WatchEvent<T>) => void;
  /** The watch ended and will deliver nothing more (COMPACTED, CLOSED, connection lost). */
  onError?: (err: Error) => void;
}

/**
 * A condition a write checks in its own transaction: the object `kind`/`name` still exists with
 * this createdRevision. A leader's writes carry its Leader object as guard, so that a leader that
 * lost its term — cut off while a write was on its way, say — can change nothing once another
 * node leads (FENCED), however late that write arrives.
 */
export interface WriteGuard {
  kind: string;
  name: string;
  createdRevision: number;
}

export interface Lease {
  id: string;
  ttlMs: number;
}

export interface Store {
  get<T = unknown>(kind: string, name: string): Promise<StoreObject<T> | null>;
  /** All objects of a kind, ordered by name. */
  list<T = unknown>(kind: string): Promise<ListResult<T>>;
  /** Fails with EXISTS when the name is taken. Writes with a `guard` fail with FENCED when it does not hold. */
  create<T = unknown>(kind: string, name: string, value: T, options?: { leaseId?: string; guard?: WriteGuard }): Promise<StoreObject<T>>;
  /**
   * Replaces the value. With `resourceVersion`, fails with CONFLICT unless the object's current
   * resourceVersion equals it. Fails with NOT_FOUND when there is no such object. The lease
   * attachment is kept.
   */
  update<T = unknown>(kind: string, name: string, value: T, options?: { resourceVersion?: number; guard?: WriteGuard }): Promise<StoreObject<T>>;
  /** Fails with NOT_FOUND when absent, CONFLICT when `resourceVersion` is given and differs. */
  delete(kind: string, name: string, options?: { resourceVersion?: number; guard?: WriteGuard }): Promise<void>;
  watch<T = unknown>(options: WatchOptions, handlers: WatchHandlers<T>): Watch;
  /** The current store revision. */
  revision(): Promise<number>;

  grantLease(ttlMs: number): Promise<Lease>;
  /** Extends the lease by its TTL from now. NOT_FOUND when it has already expired. */
  keepAlive(leaseId: string): Promise<void>;
  /** Ends the lease now, deleting its objects. No error when it is already gone. */
  revokeLease(leaseId: string): Promise<void>;

  close(): Promise<void>;
}
