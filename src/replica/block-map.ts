/**
 * Presence map of one layer: two bits per 4 KiB block (ABSENT, DATA, ZERO), kept in 4 KiB
 * pages that exist only where the layer has something, so a sparse layer costs little memory.
 * On disk a map file holds page i at byte offset i * MAP_PAGE_BYTES (a sparse file).
 */
import { assert } from '../errors.ts';

export const BLOCK_SIZE = 4096;
export const BLOCK_SHIFT = 12;
export const MAP_PAGE_BYTES = 4096;
export const BLOCKS_PER_PAGE = MAP_PAGE_BYTES * 4;
const PAGE_SHIFT = 14;

export const BlockState = { ABSENT: 0, DATA: 1, ZERO: 2 } as const;
export type BlockState = (typeof BlockState)[keyof typeof BlockState];

export class BlockMap {
  /** Grows with the volume (grow()); never shrinks. */
  blockCount: number;
  private readonly pages = new Map<number, Uint8Array>();

  constructor(blockCount: number) {
    assert(Number.isSafeInteger(blockCount) && blockCount >= 0, 'block count');
    this.blockCount = blockCount;
  }

  /** A volume expansion: the new blocks are ABSENT (no page holds them yet, or they are 0 bits). */
  grow(blockCount: number): void {
    assert(Number.isSafeInteger(blockCount) && blockCount >= this.blockCount, `grow a block map from ${this.blockCount} to ${blockCount}`);
    this.blockCount = blockCount;
  }

  get pageCount(): number {
    return Math.ceil(this.blockCount / BLOCKS_PER_PAGE);
  }

  get(block: number): BlockState {
    const page = this.pages.get(block >>> PAGE_SHIFT);
    if (page === undefined) return BlockState.ABSENT;
    const i = block & (BLOCKS_PER_PAGE - 1);
    return ((page[i >>> 2] >>> ((i & 3) << 1)) & 3) as BlockState;
  }

  /** Sets `count` blocks from `start` to `state`; calls `onPage` once per page touched. */
  setRange(start: number, count: number, state: BlockState, onPage?: (pageIndex: number) => void): void {
    assert(start >= 0 && count >= 0 && start + count <= this.blockCount, `block range ${start}+${count}`);
    let block = start;
    const end = start + count;
    while (block < end) {
      const pageIndex = block >>> PAGE_SHIFT;
      const pageEnd = Math.min(end, (pageIndex + 1) * BLOCKS_PER_PAGE);
      let page = this.pages.get(pageIndex);
      if (page === undefined) {
        if (state === BlockState.ABSENT) {
          block = pageEnd;
          continue;
        }
        page = new Uint8Array(MAP_PAGE_BYTES);
        this.pages.set(pageIndex, page);
      }
      for (; block < pageEnd; block++) {
        const i = block & (BLOCKS_PER_PAGE - 1);
        const byte = i >>> 2;
        const shift = (i & 3) << 1;
        page[byte] = (page[byte] & ~(3 << shift)) | (state << shift);
      }
      onPage?.(pageIndex);
    }
  }

  /** Length of the run of blocks from `start` (at most `limit`) that share one state. */
  runLength(start: number, limit: number): number {
    const state = this.get(start);
    let n = 1;
    while (n < limit) {
      const block = start + n;
      // Whole absent pages are skipped at once.
      if (state === BlockState.ABSENT && (block & (BLOCKS_PER_PAGE - 1)) === 0 && !this.pages.has(block >>> PAGE_SHIFT)) {
        n = Math.min(limit, n + BLOCKS_PER_PAGE);
        continue;
      }
      if (this.get(block) !== state) break;
      n++;
    }
    return n;
  }

  /** Calls `fn` for every maximal run of non-absent blocks, in order. */
  forEachPresentRun(fn: (start: number, count: number, state: BlockState) => void): void {
    const pageIndexes = [...this.pages.keys()].sort((a, b) => a - b);
    let runStart = -1;
    let runState: BlockState = BlockState.ABSENT;
    let runEnd = -1;
    for (const pageIndex of pageIndexes) {
      const first = pageIndex * BLOCKS_PER_PAGE;
      const last = Math.min(this.blockCount, first + BLOCKS_PER_PAGE);
      for (let block = first; block < last; block++) {
        const state = this.get(block);
        if (state === BlockState.ABSENT) continue;
        if (runStart >= 0 && state === runState && block === runEnd) {
          runEnd++;
          continue;
        }
        if (runStart >= 0) fn(runStart, runEnd - runStart, runState);
        runStart = block;
        runEnd = block + 1;
        runState = state;
      }
    }
    if (runStart >= 0) fn(runStart, runEnd - runStart, runState);
  }

  /** The page's bytes, or undefined when the page holds only ABSENT blocks. Not a copy. */
  page(pageIndex: number): Uint8Array | undefined {
    return this.pages.get(pageIndex);
  }

  /** Replaces a page with a copy of `bytes` (all-zero bytes drop the page). */
  loadPage(pageIndex: number, bytes: Uint8Array): void {
    assert(bytes.length === MAP_PAGE_BYTES, 'map page size');
    assert(pageIndex >= 0 && pageIndex < Math.max(1, this.pageCount), `map page ${pageIndex}`);
    if (bytes.every((b) => b === 0)) {
      this.pages.delete(pageIndex);
      return;
    }
    this.pages.set(pageIndex, Uint8Array.from(bytes));
  }

  pageIndexes(): number[] {
    return [...this.pages.keys()].sort((a, b) => a - b);
  }
}
