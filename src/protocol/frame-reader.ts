/**
 * Accumulates stream chunks and hands out exact byte counts. A frame inside one chunk is a
 * view of that chunk (no copy); one that spans chunks is copied once.
 */
export class FrameReader {
  private chunks: Buffer[] = [];
  private head = 0; // read position in chunks[0]
  private total = 0;

  get available(): number {
    return this.total;
  }

  /** Bytes buffered in the first chunk (take() of at most this many is a view, not a copy). */
  get firstLength(): number {
    return this.chunks.length === 0 ? 0 : this.chunks[0].length - this.head;
  }

  push(chunk: Buffer): void {
    if (chunk.length === 0) return;
    this.chunks.push(chunk);
    this.total += chunk.length;
  }

  /** Returns exactly `n` bytes, or null when fewer are buffered. */
  take(n: number): Buffer | null {
    if (n > this.total) return null;
    if (n === 0) return Buffer.alloc(0);
    const first = this.chunks[0];
    if (first.length - this.head >= n) {
      const out = first.subarray(this.head, this.head + n);
      this.consume(n);
      return out;
    }
    const out = Buffer.allocUnsafe(n);
    let filled = 0;
    while (filled < n) {
      const chunk = this.chunks[0];
      const step = Math.min(n - filled, chunk.length - this.head);
      chunk.copy(out, filled, this.head, this.head + step);
      filled += step;
      this.consume(step);
    }
    return out;
  }

  /** Discards up to `n` bytes; returns how many were discarded. */
  skip(n: number): number {
    const step = Math.min(n, this.total);
    let left = step;
    while (left > 0) {
      const chunk = this.chunks[0];
      const here = Math.min(left, chunk.length - this.head);
      this.consume(here);
      left -= here;
    }
    return step;
  }

  private consume(n: number): void {
    this.head += n;
    this.total -= n;
    if (this.head === this.chunks[0].length) {
      this.chunks.shift();
      this.head = 0;
    }
  }
}
