/** The fault suite's table of figures: one row per fault kind, printed with every test. */

export interface FaultFigures {
  fault: string;
  /** Faults injected (kills, injected errors, power losses, blackholes). */
  count: number;
  ackedWrites: number;
  /** Blocks whose content broke the contract (must be 0). */
  lostAcked: number;
  /** NBD error replies the client got (must be 0 while a healthy replica remained). */
  clientErrors: number;
  /** Blocks whose newest acknowledged (not yet flushed) write was gone after the fault (legal after a crash of every replica). */
  unflushedLost: number;
  /** Blocks found torn at 512-byte granularity between allowed writes (legal for unflushed writes). */
  torn: number;
  /** Client connections lost (a frontend kill drops them; the writer reconnects). */
  disconnects: number;
  /** Regions resynced by start-up recovery plus regions copied by delta rebuilds. */
  recoveryRegions: number;
  recoveryBytes: number;
  deltaRebuilds: number;
  fullRebuilds: number;
  /** Regions verify (or the offline comparer) found differing (must be 0). */
  differingRegions: number;
  /** Wall time spent in this fault kind, for the record. */
  seconds: number;
}

export function emptyFigures(fault: string): FaultFigures {
  return {
    fault, count: 0, ackedWrites: 0, lostAcked: 0, unflushedLost: 0, torn: 0, clientErrors: 0, disconnects: 0, recoveryRegions: 0, recoveryBytes: 0,
    deltaRebuilds: 0, fullRebuilds: 0, differingRegions: 0, seconds: 0,
  };
}

function bytes(n: number): string {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(0)} KiB`;
  if (n < 1024 * 1024 * 1024) return `${(n / 1024 / 1024).toFixed(1)} MiB`;
  return `${(n / 1024 / 1024 / 1024).toFixed(2)} GiB`;
}

/** Renders rows as an aligned text table (first column left-aligned, the rest right-aligned). */
export function renderTable(header: string[], rows: string[][]): string {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)));
  const line = (cells: string[]): string => cells.map((c, i) => (i === 0 ? c.padEnd(widths[i]) : c.padStart(widths[i]))).join(' | ');
  return [line(header), widths.map((w) => '-'.repeat(w)).join('-|-'), ...rows.map(line)].join('\n');
}

/** The figures table, with a title line naming the seed (to reproduce) and a totals row. */
export function figuresTable(title: string, seed: number, rows: FaultFigures[]): string {
  const total = emptyFigures('total');
  for (const r of rows) {
    for (const k of Object.keys(total) as (keyof FaultFigures)[]) {
      if (k !== 'fault') (total[k] as number) += r[k] as number;
    }
  }
  const header = ['fault', 'count', 'acked writes', 'lost acked', 'unflushed lost', 'torn', 'client errors', 'disconnects', 'recovery regions', 'recovery bytes', 'delta rebuilds', 'full rebuilds', 'differing regions', 'seconds'];
  const cells = (r: FaultFigures): string[] => [
    r.fault, String(r.count), String(r.ackedWrites), String(r.lostAcked), String(r.unflushedLost), String(r.torn), String(r.clientErrors), String(r.disconnects), String(r.recoveryRegions),
    bytes(r.recoveryBytes), String(r.deltaRebuilds), String(r.fullRebuilds), String(r.differingRegions), r.seconds.toFixed(1),
  ];
  return `${title} (ZEBU_FAULT_SEED=${seed})\n${renderTable(header, [...rows.map(cells), ...(rows.length > 1 ? [cells(total)] : [])])}`;
}

/** Prints the table to stdout (node --test shows it) and as test diagnostics. */
export function printFigures(t: { diagnostic: (message: string) => void }, title: string, seed: number, rows: FaultFigures[]): string {
  const text = figuresTable(title, seed, rows);
  process.stdout.write(`\n${text}\n\n`);
  for (const line of text.split('\n')) t.diagnostic(line);
  return text;
}
