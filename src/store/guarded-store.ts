/**
 * A store whose every write carries one guard (store.ts WriteGuard): the view of the store a
 * leader's manager and API work through. Reads, watches and leases pass through unchanged; a
 * create, update or delete fails with FENCED once the guard no longer holds — the term is over —
 * however long the write took to reach the store.
 */
import type { Lease, ListResult, Store, StoreObject, Watch, WatchHandlers, WatchOptions, WriteGuard } from './store.ts';

export class GuardedStore implements Store {
  private readonly inner: Store;
  readonly guard: WriteGuard;

  constructor(inner: Store, guard: WriteGuard) {
    this.inner = inner;
    this.guard = guard;
  }

  get<T = unknown>(kind: string, name: string): Promise<StoreObject<T> | null> {
    return this.inner.get<T>(kind, name);
  }

  list<T = unknown>(kind: string): Promise<ListResult<T>> {
    return this.inner.list<T>(kind);
  }

  create<T = unknown>(kind: string, name: string, value: T, options: { leaseId?: string } = {}): Promise<StoreObject<T>> {
    return this.inner.create<T>(kind, name, value, { ...options, guard: this.guard });
  }

  update<T = unknown>(kind: string, name: string, value: T, options: { resourceVersion?: number } = {}): Promise<StoreObject<T>> {
    return this.inner.update<T>(kind, name, value, { ...options, guard: this.guard });
  }

  delete(kind: string, name: string, options: { resourceVersion?: number } = {}): Promise<void> {
    return this.inner.delete(kind, name, { ...options, guard: this.guard });
  }

  watch<T = unknown>(options: WatchOptions, handlers: WatchHandlers<T>): Watch {
    return this.inner.watch<T>(options, handlers);
  }

  revision(): Promise<number> {
    return this.inner.revision();
  }

  grantLease(ttlMs: number): Promise<Lease> {
    return this.inner.grantLease(ttlMs);
  }

  keepAlive(leaseId: string): Promise<void> {
    return this.inner.keepAlive(leaseId);
  }

  revokeLease(leaseId: string): Promise<void> {
    return this.inner.revokeLease(leaseId);
  }

  /** The store itself is not this view's to close. */
  async close(): Promise<void> {}
}
