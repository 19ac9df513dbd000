/**
 * What one process knows of a target's blocks, and the coordination that makes garbage
 * collection safe against backups running at the same time.
 *
 * - `known`: blocks some manifest (completed or partial) on the target refers to. A backup
 *   uploads a block only when it is not known; nothing is ever listed to find out.
 * - Claims: a running backup claims every block it will refer to (those it carries over from
 *   the previous backup and those it finds already stored) before it relies on them. The sweep
 *   never removes a claimed block.
 * - Sweeping: a block the sweep is removing right now. A backup that needs it waits for the
 *   removal to finish and then stores it again; the sweep, for its part, checks the claims and
 *   marks the block in one synchronous step, so there is no moment where both think they own it.
 *
 * Both run in the manager's process (one per cluster), so this coordination is in memory; after
 * a crash the partial manifests on the target protect what a backup under way had stored.
 */
export class BlockIndex {
  readonly known = new Set<string>();
  private readonly claims = new Map<string, number>();
  private readonly sweeping = new Map<string, Promise<void>>();

  /** Claims `hash` for the caller until release(); then waits for a removal under way, if any. */
  async claim(hash: string): Promise<void> {
    this.claims.set(hash, (this.claims.get(hash) ?? 0) + 1);
    const removal = this.sweeping.get(hash);
    if (removal !== undefined) await removal.catch(() => {});
  }

  release(hash: string): void {
    const n = this.claims.get(hash) ?? 0;
    if (n <= 1) this.claims.delete(hash);
    else this.claims.set(hash, n - 1);
  }

  claimed(hash: string): boolean {
    return this.claims.has(hash);
  }

  /**
   * The sweep's removal of `hash`: refused (false) when a backup claims it; otherwise `remove`
   * runs with the block marked as being removed and no longer known.
   */
  async sweep(hash: string, remove: () => Promise<void>): Promise<boolean> {
    if (this.claims.has(hash) || this.sweeping.has(hash)) return false;
    this.known.delete(hash);
    const removal = remove();
    this.sweeping.set(hash, removal);
    try {
      await removal;
      return true;
    } catch (err) {
      // Not removed: the block is still there.
      this.known.add(hash);
      throw err;
    } finally {
      this.sweeping.delete(hash);
    }
  }
}
