/** What a data-protocol server serves: a Replica, or an Engine (for its frontend). */

import type { RebuildKind } from '../replica/meta.ts';
import type { IntentSummary } from '../replica/intent-log.ts';

export interface BackendExtent {
  offset: number;
  length: number;
  data: boolean;
}

/**
 * The replicas a frontend may read from without passing through the engine (READ_VIEW): every
 * RW replica at `generation`, each pinned to the server process the engine holds open
 * (`instance`). Empty while the engine serves no reads itself (starting, faulted, superseded).
 */
export interface ReadView {
  generation: number;
  /** The engine's epoch: direct reads carry it, so a newer engine fences them. */
  epoch: number;
  /** The engine's replica request timeout: a direct read unanswered this long goes through the engine. */
  timeoutMs: number;
  replicas: ReadViewReplica[];
}

export interface ReadViewReplica {
  host: string;
  port: number;
  /** The replica server's process instance (INFO `instance`): a restarted replica is another one. */
  instance: string;
  /** On the engine's node (read first). */
  local: boolean;
}

export interface BlockBackend {
  readonly sizeBytes: number;
  readonly epoch: number;
  /** Rejects lower epochs (FENCED); adopts higher ones durably before serving them. */
  checkEpoch(epoch: number): Promise<void>;
  read(offset: number, length: number, out: Buffer, outOffset: number): Promise<void>;
  /** Reads the volume as it was at snapshot `name`. */
  readSnapshot(name: string, offset: number, length: number, out: Buffer, outOffset: number): Promise<void>;
  write(offset: number, data: Buffer): Promise<void>;
  /**
   * As write, with `data` lent from ioBuffers: the backend gives it back (release) once nothing
   * holds it, which may be after the answer (an engine's replica connections). Used by a server
   * with `lendsWritePayloads`.
   */
  writeLent?(offset: number, data: Buffer): Promise<void>;
  /** TRIM and WRITE_ZEROES: the range reads back as zeros (`noHole`: its space is not given back). */
  zero(offset: number, length: number, options?: { noHole?: boolean }): Promise<void>;
  flush(): Promise<void>;
  blockStatus(offset: number, length: number): Promise<BackendExtent[]>;
  info(): unknown;
  snapshotCreate(name: string): Promise<unknown>;
  snapshotList(): unknown;
  snapshotDelete(name: string): Promise<void>;
  snapshotRevert(name: string): Promise<void>;
  /** Where snapshot `name` may differ from its ancestor `base` (extents, data = changed). */
  snapshotChanges?(name: string | null, base: string | null, offset: number, length: number, aboveImage?: boolean): Promise<BackendExtent[]>;
  /** Replicas: online expansion (EXPAND) and the end of a rebuild (SET_REVISION). */
  expand?(sizeBytes: number): Promise<unknown>;
  setRevision?(revision: number): Promise<unknown>;
  setRebuilding?(kind: RebuildKind | null): Promise<unknown>;

  // ---- write-intent log (replicas; a backend without these answers UNSUPPORTED) ---------------
  /**
   * FLUSH bookkeeping, called synchronously when the FLUSH arrives (before anything is awaited,
   * so that it is ordered with the writes of the same connection): `seq` = the engine's flush
   * number (0: unnumbered), `confirmed` = every FLUSH <= it completed on every replica.
   */
  flushArrived?(seq: number, confirmed: number, evict: boolean): void;
  /** A new engine opened the replica (OPEN, after its epoch was adopted). */
  engineOpened?(): void;
  intentGet?(): IntentSummary;
  /** Synchronous at arrival (ordered with FLUSH); the promise resolves once it is durable. */
  missedStart?(key: string): Promise<void>;
  /** The regions of key's missed-write map; throws NOT_FOUND when there is none. */
  missedGet?(key: string): number[];
  /** Regions of key's map a rebuild copied in part: [region, bytes copied from its start]. */
  missedPartial?(key: string): [number, number][];
  missedDrop?(key: string): Promise<void>;
  /** Adds regions to key's map, or marks it invalid (a rebuild hands the source's maps over). */
  missedMerge?(key: string, regions: number[], invalid: boolean): Promise<void>;
  /** Takes copied regions out of key's map (not the active ones); in memory at the call, durable when it resolves. */
  missedClear?(key: string, regions: number[], progress?: [number, number][]): Promise<void>;
  missedPrune?(keep: string[]): Promise<void>;
  /** Regions known the same and durable everywhere leave the write-intent log (no write in flight, not pinned). */
  intentRelease?(regions: number[]): Promise<void>;
  /** A rebuild's copy write under a lease (data null: zeros); LEASE_REVOKED once the lease is revoked. */
  copyWrite?(leaseId: number, offset: number, data: Buffer | null, length: number): Promise<void>;
  /**
   * A copy pulled from the source (COPY_FROM): under the lease (refused as copyWrite is once it
   * is revoked, held by a revoke while under way), `read` fetches the chunk, which is then
   * written as copyWrite does — or, with `zeros` and a chunk that reads as zeros, marked zero.
   * Once it settles the backend holds no reference to the chunk: the server reuses its buffer.
   */
  copyPull?(leaseId: number, offset: number, length: number, zeros: boolean, read: () => Promise<Buffer>): Promise<void>;
  /** Revokes a lease; resolves once its copy writes in flight landed. */
  leaseRevoke?(leaseId: number): Promise<void>;
  // ---- read views (the engine, for its frontend) ------------------------------------------------
  /**
   * Calls `answer` once, synchronously at the change (so its reply is written before the reply of
   * any write acknowledged after it), when the view's generation is not `known`, or after
   * `holdMs`. Returns a cancel function (the connection closed).
   */
  watchReadView?(known: number, holdMs: number, answer: (view: ReadView) => void): () => void;
  /** A replica of the read view failed a direct read (READ_FAILED): taken out when still the same RW replica. */
  readFailed?(replica: { host: string; port: number; instance: string }, error: string): void;
  /** Reads the frontend served from its read view, for the engine's counters. */
  reportReads?(reads: number, bytes: number, micros: number): void;
  /** SHA-256 of the live volume's bytes in the range (holes hash as zeros). */
  regionHash?(offset: number, length: number, snapshot?: string | null): Promise<Buffer>;
}

/** INTENT_GET's reply (JSON): the replica's write-intent summary, as the replica defines it. */
export type { IntentSummary } from '../replica/intent-log.ts';

