/**
 * /metrics: Prometheus text built at scrape time from ManagerService.metrics(), in a registry
 * private to one API server (two servers in one process, as in tests, never share series).
 *
 * States are exported the Prometheus "state set" way: one series per possible value, 1 for the
 * current one, so `zebu_volume_state{state="attached"} == 1` selects attached volumes. I/O figures
 * are the engines' counters since the engine started (a restarted engine resets them, which
 * Prometheus' rate() handles as a counter reset).
 */
import { Counter, Gauge, Registry } from 'prom-client';
import type { ManagerService, VolumeMetrics } from '../manager/types.ts';

const VOLUME_STATES = ['creating', 'detached', 'attaching', 'attached', 'detaching', 'deleting'] as const;
const ROBUSTNESS = ['healthy', 'degraded', 'faulted', 'unknown'] as const;
const REPLICA_MODES = ['RW', 'WO', 'ERR'] as const;

type IoField = keyof NonNullable<VolumeMetrics['io']>;

export interface MetricsExporter {
  contentType: string;
  /** Asks the service once and renders every series. */
  scrape(): Promise<string>;
}

export function createMetricsExporter(service: ManagerService): MetricsExporter {
  const registry = new Registry();
  const registers = [registry];
  const volumeLabel = ['volume'] as const;

  const volumes = new Gauge({ name: 'zebu_volumes', help: 'Volumes known to the manager.', registers });
  const state = new Gauge({ name: 'zebu_volume_state', help: 'Volume state: 1 for the current state, 0 for the others.', labelNames: ['volume', 'state'], registers });
  const robustness = new Gauge({ name: 'zebu_volume_robustness', help: 'Volume robustness: 1 for the current value, 0 for the others.', labelNames: ['volume', 'robustness'], registers });
  const size = new Gauge({ name: 'zebu_volume_size_bytes', help: 'Volume size in bytes.', labelNames: volumeLabel, registers });
  const replicaMode = new Gauge({
    name: 'zebu_replica_mode',
    help: 'Replica mode in its engine: 1 for the current mode (all 0 while the volume is detached).',
    labelNames: ['volume', 'replica', 'mode'],
    registers,
  });
  const io: [IoField, Counter<string>][] = [
    ['reads', new Counter({ name: 'zebu_volume_reads_total', help: 'Read requests completed by the engine.', labelNames: volumeLabel, registers })],
    ['writes', new Counter({ name: 'zebu_volume_writes_total', help: 'Write requests completed by the engine.', labelNames: volumeLabel, registers })],
    ['readBytes', new Counter({ name: 'zebu_volume_read_bytes_total', help: 'Bytes read.', labelNames: volumeLabel, registers })],
    ['writeBytes', new Counter({ name: 'zebu_volume_write_bytes_total', help: 'Bytes written.', labelNames: volumeLabel, registers })],
    ['readLatencySecondsTotal', new Counter({ name: 'zebu_volume_read_latency_seconds_total', help: 'Sum of read latencies; divide by reads for the mean.', labelNames: volumeLabel, registers })],
    ['writeLatencySecondsTotal', new Counter({ name: 'zebu_volume_write_latency_seconds_total', help: 'Sum of write latencies; divide by writes for the mean.', labelNames: volumeLabel, registers })],
    ['errors', new Counter({ name: 'zebu_volume_io_errors_total', help: 'Requests answered with an error.', labelNames: volumeLabel, registers })],
  ];

  const render = (list: VolumeMetrics[]): Promise<string> => {
    // Rebuilt from scratch: a deleted volume or replica must not linger as a stale series.
    registry.resetMetrics();
    volumes.set(list.length);
    for (const v of list) {
      for (const s of VOLUME_STATES) state.set({ volume: v.name, state: s }, v.state === s ? 1 : 0);
      for (const r of ROBUSTNESS) robustness.set({ volume: v.name, robustness: r }, v.robustness === r ? 1 : 0);
      size.set({ volume: v.name }, v.sizeBytes);
      for (const replica of v.replicas) {
        for (const m of REPLICA_MODES) replicaMode.set({ volume: v.name, replica: replica.name, mode: m }, replica.mode === m ? 1 : 0);
      }
      if (v.io !== null) {
        for (const [field, counter] of io) counter.inc({ volume: v.name }, Math.max(0, v.io[field]));
      }
    }
    return registry.metrics();
  };

  // One scrape at a time: the series are shared state between reset and render.
  let chain: Promise<unknown> = Promise.resolve();
  return {
    contentType: registry.contentType,
    scrape(): Promise<string> {
      const next = chain.then(async () => render(await service.metrics()));
      chain = next.catch(() => {});
      return next;
    },
  };
}
