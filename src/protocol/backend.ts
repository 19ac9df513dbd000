/** What a data-protocol server serves: a Replica, or an Engine (for its frontend). */

export interface BackendExtent {
  offset: number;
  length: number;
  data: boolean;
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
  /** TRIM and WRITE_ZEROES: the range reads back as zeros. */
  zero(offset: number, length: number): Promise<void>;
  flush(): Promise<void>;
  blockStatus(offset: number, length: number): Promise<BackendExtent[]>;
  info(): unknown;
  snapshotCreate(name: string): Promise<unknown>;
  snapshotList(): unknown;
  snapshotDelete(name: string): Promise<void>;
  snapshotRevert(name: string): Promise<void>;
  /** Replicas: online expansion (EXPAND) and the end of a rebuild (SET_REVISION). */
  expand?(sizeBytes: number): Promise<unknown>;
  setRevision?(revision: number): Promise<unknown>;
  setRebuilding?(rebuilding: boolean): Promise<unknown>;
}

