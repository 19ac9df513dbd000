/**
 * The fault suite's reader: reads random blocks of the writer's hot regions over its own NBD
 * connection (reconnecting after a connection loss, as a client with reconnect does) and holds
 * every block read to the ledger (fault-writer.ts): it must hold a write issued to that block no
 * older than the newest one acknowledged when the read was sent. A read that sees older data
 * (an acknowledged write lost, even for a moment), foreign or torn bytes, or an NBD error is
 * recorded.
 */
import { NbdConnectionLost, type NbdClient } from './nbd-client.ts';
import { PausableLoad } from './nbd-session.ts';
import { BLOCK_BYTES, identifyBlock, type Ledger } from './fault-writer.ts';
import type { Prng } from './fault-prng.ts';
import { sectorsFromCandidates } from './fault-checker.ts';

export interface ReaderOptions {
  connect: () => Promise<NbdClient>;
  ledger: Ledger;
  prng: Prng;
  hotRegions: number[];
  regionBytes: number;
  depth?: number;
}

export class FaultReader extends PausableLoad {
  private readonly options: Required<ReaderOptions>;
  reads = 0;
  /** NBD error replies. */
  errors = 0;
  /** Blocks that held something the ledger does not allow. */
  wrong = 0;
  /**
   * Set across a power loss, until the next check rebases the ledger: a write no flush confirmed
   * may then be torn on disk (its sectors from different writes since the last flush), as the
   * check allows in 'contract' mode. A process kill never tears a block.
   */
  allowTorn = false;
  /** Torn blocks read while allowed. */
  torn = 0;
  readonly log: string[] = [];

  constructor(options: ReaderOptions) {
    super(options.connect, 'reader');
    this.options = { depth: 2, ...options };
  }

  setHotRegions(regions: number[]): void {
    this.options.hotRegions = regions;
  }

  private note(what: string): void {
    if (this.log.length < 50) this.log.push(what);
  }

  start(): Promise<void> {
    return this.session.start();
  }

  protected pump(): void {
    const o = this.options;
    const ledger = o.ledger;
    while (this.session.running && !this.paused && this.session.client !== null && this.inflight < o.depth) {
      const client = this.session.client;
      const regionBlocks = o.regionBytes / BLOCK_BYTES;
      const count = 1 + o.prng.int(16);
      let first = o.prng.pick(o.hotRegions) * regionBlocks + o.prng.int(regionBlocks);
      if (first + count > ledger.blocks) first = ledger.blocks - count;
      // The oldest write each block may show: the newest acknowledged before this read was sent.
      const floors = Array.from({ length: count }, (_, i) => ledger.lastAcked[first + i]);
      this.inflight++;
      client.read(first * BLOCK_BYTES, count * BLOCK_BYTES).then(
        ({ errno, data }) => {
          this.reads++;
          if (errno !== 0) {
            this.errors++;
            this.note(`READ ${first * BLOCK_BYTES}+${count * BLOCK_BYTES} errno ${errno}`);
            return;
          }
          for (let i = 0; i < count; i++) this.check(first + i, floors[i], data, i * BLOCK_BYTES);
        },
        (err) => {
          if (!(err instanceof NbdConnectionLost)) this.note(`read failed: ${(err as Error).message}`);
        },
      ).finally(() => this.settled());
    }
  }

  private check(block: number, floorIndex: number, data: Buffer, at: number): void {
    const ledger = this.options.ledger;
    const history = ledger.history[block];
    const id = identifyBlock(data, at, block);
    let index = -1;
    if (id.kind === 'write') index = history.lastIndexOf(id.seq);
    else if (id.kind === 'zero') {
      for (let i = history.length - 1; i >= 0; i--) if (ledger.isZeroContent(history[i])) {
        index = i;
        break;
      }
    } else {
      // Torn bytes kept from an earlier check are allowed while they are the block's history.
      for (let i = history.length - 1; i >= 0; i--) if (history[i] < 0 && ledger.contentOf(history[i], block).equals(data.subarray(at, at + BLOCK_BYTES))) {
        index = i;
        break;
      }
    }
    if (index < 0 && id.kind === 'other' && this.allowTorn && sectorsFromCandidates(ledger, block, data.subarray(at, at + BLOCK_BYTES), history.slice(ledger.floor[block]))) {
      this.torn++;
      return;
    }
    if (index < 0 || index < floorIndex) {
      this.wrong++;
      this.note(`block ${block}: read ${id.kind === 'write' ? `write ${id.seq}` : id.kind} (history index ${index}), the newest acknowledged at the read was index ${floorIndex}`);
    }
  }
}
