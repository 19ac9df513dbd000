/**
 * The target replica's side of rebuild leases. A rebuild's copier writes to the target with the
 * id of a lease the engine granted it on a region. When the copier does not give a lease back in
 * time after a recall, the engine revokes it here, and only once this replica has answered does
 * the client write that recalled it go on. From then on, a copy write with that id is refused
 * with LEASE_REVOKED: the copier read the source before the client write and would put older
 * data over it.
 *
 *   copy write (lease L) arrives:  L revoked? → LEASE_REVOKED.  Else counted in flight, applied.
 *   revoke L arrives:              L revoked from now; answered once L's copy writes in flight
 *                                  are applied (a copy write already under way lands before the
 *                                  client write, which then overwrites it).
 *
 * Lease ids are an engine's own counter: they mean something only within one epoch. A new epoch
 * (a new engine) starts with no lease revoked, and the old engine's copier is fenced by its epoch.
 * Kept in memory only: a restarted replica refuses the old epoch's requests anyway once a new
 * engine opened it, and an engine that opens it again after a restart starts a new epoch.
 */
import { assert, ZebuError, ErrorCode } from '../errors.ts';

/** Revoked lease ids kept per epoch. Revokes are rare (a copier that missed a recall deadline). */
const MAX_REVOKED = 100_000;

export class CopyLeases {
  private epoch = -1;
  private readonly revoked = new Set<number>();
  private readonly inflight = new Map<number, number>();
  private readonly drained = new Map<number, (() => void)[]>();

  private adopt(epoch: number): void {
    if (epoch === this.epoch) return;
    assert(epoch > this.epoch, 'copy leases: epochs only go up');
    this.epoch = epoch;
    this.revoked.clear();
  }

  /** A copy write with lease `id` starts (synchronously at its arrival). Throws LEASE_REVOKED. */
  begin(epoch: number, id: number): void {
    this.adopt(epoch);
    if (this.revoked.has(id)) throw new ZebuError(ErrorCode.LEASE_REVOKED, `lease ${id} was revoked: copy again from the last committed offset`);
    this.inflight.set(id, (this.inflight.get(id) ?? 0) + 1);
  }

  /** That copy write is applied (or failed). */
  end(id: number): void {
    const n = this.inflight.get(id);
    assert(n !== undefined && n > 0, 'copy leases: a copy write ended twice');
    if (n > 1) return void this.inflight.set(id, n - 1);
    this.inflight.delete(id);
    const waiters = this.drained.get(id);
    if (waiters === undefined) return;
    this.drained.delete(id);
    for (const wake of waiters) wake();
  }

  /** Revokes lease `id`; resolves once none of its copy writes is in flight. */
  revoke(epoch: number, id: number): Promise<void> {
    this.adopt(epoch);
    if (this.revoked.size >= MAX_REVOKED) {
      // The oldest revokes are forgotten (a Set keeps insertion order): an engine never hands an
      // id out again, and a copier's late write comes within a recall timeout, not 100,000 revokes on.
      const oldest = this.revoked.values().next().value!;
      this.revoked.delete(oldest);
    }
    this.revoked.add(id);
    if (!this.inflight.has(id)) return Promise.resolve();
    return new Promise((resolve) => {
      const list = this.drained.get(id) ?? [];
      list.push(resolve);
      this.drained.set(id, list);
    });
  }

  isRevoked(id: number): boolean {
    return this.revoked.has(id);
  }
}
