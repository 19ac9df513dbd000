/**
 * /metrics: Prometheus text built at scrape time from ManagerService.metrics(), in a registry
 * private to one API server (two servers in one process, as in tests, never share series).
 *
 * States are exported the Prometheus "state set" way: one series per possible value, 1 for the
 * current one, so `zebu_volume_state{state="attached"} == 1` selects attached volumes. I/O figures
 * are the engines' counters since the engine started (a restarted engine resets them, which
 * Prometheus' rate() handles as a counter reset).
 *
 * Crash consistency: the running engine's write-intent log (active regions and their bound) and
 * whether a newer epoch fenced it (superseded), both absent while detached; the last start-up
 * recovery and the last verify, kept across detach, absent before the first.
 *
 * The frontend's link to each engine (state set, reopens, re-issued requests, hangs, held
 * requests, longest hold), while the volume is attached with a frontend; counters are the
 * frontend's since it began serving the volume.
 */
import { Counter, Gauge, Registry } from 'prom-client';
import type { ManagerService, VolumeMetrics } from '../manager/types.ts';
import type { BackupMetrics, BackupService } from '../manager/backup-types.ts';

const VOLUME_STATES = ['creating', 'detached', 'attaching', 'attached', 'detaching', 'deleting'] as const;
const ROBUSTNESS = ['healthy', 'degraded', 'faulted', 'unknown'] as const;
const REPLICA_MODES = ['RW', 'WO', 'ERR'] as const;
const LINK_STATES = ['OPEN', 'CLOSE', 'REOPENING'] as const;

type IoField = keyof NonNullable<VolumeMetrics['io']>;

export interface MetricsExporter {
  contentType: string;
  /** Asks the service once and renders every series. */
  scrape(): Promise<string>;
}

export function createMetricsExporter(service: ManagerService, backupService?: BackupService): MetricsExporter {
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
    ['rebuildLeaseRecalls', new Counter({ name: 'zebu_volume_rebuild_lease_recalls_total', help: 'Region leases of a rebuild\'s copy that a client write recalled.', labelNames: volumeLabel, registers })],
    ['rebuildLeaseRevokes', new Counter({ name: 'zebu_volume_rebuild_lease_revokes_total', help: 'Region leases revoked because the copy did not give them back within rebuild-lease-recall-timeout-ms.', labelNames: volumeLabel, registers })],
    ['rebuildLeaseReplays', new Counter({ name: 'zebu_volume_rebuild_lease_replays_total', help: 'Times a rebuild\'s copy started a region again from its committed offset after its lease was revoked.', labelNames: volumeLabel, registers })],
    ['rebuildCopiersLost', new Counter({ name: 'zebu_volume_rebuild_copiers_lost_total', help: 'Rebuild copier processes that died while they copied (their regions were copied again by a new one).', labelNames: volumeLabel, registers })],
    ['claimWaits', new Counter({ name: 'zebu_volume_claim_waits_total', help: 'Client writes that waited for a rebuild\'s region lease (recalled for them) or a verify\'s claim on their range.', labelNames: volumeLabel, registers })],
  ];
  const claimWaitLongest = new Gauge({ name: 'zebu_volume_claim_wait_longest_seconds', help: 'The longest a client write waited for a rebuild\'s region lease or a verify\'s claim since the engine started.', labelNames: volumeLabel, registers });
  const activeRegions = new Gauge({ name: 'zebu_volume_active_regions', help: 'Regions (4 MiB) in the engine\'s write-intent log: what a crash now would resync.', labelNames: volumeLabel, registers });
  const activeRegionsMax = new Gauge({ name: 'zebu_volume_active_regions_max', help: 'Bound on the active regions (write-intent-max-regions when the engine started).', labelNames: volumeLabel, registers });
  const superseded = new Gauge({ name: 'zebu_volume_superseded', help: 'Whether a newer engine (epoch) fenced the running engine: 1 when it serves nothing.', labelNames: volumeLabel, registers });
  const recoveryBytes = new Gauge({ name: 'zebu_volume_last_recovery_bytes', help: 'Bytes the engine resynced in its last start-up recovery.', labelNames: volumeLabel, registers });
  const recoveryRegions = new Gauge({ name: 'zebu_volume_last_recovery_regions', help: 'Regions the engine resynced in its last start-up recovery.', labelNames: volumeLabel, registers });
  const recoveryDuration = new Gauge({ name: 'zebu_volume_last_recovery_duration_seconds', help: 'Duration of the engine\'s last start-up recovery.', labelNames: volumeLabel, registers });
  const verifyDiffering = new Gauge({ name: 'zebu_volume_last_verify_differing_regions', help: 'Regions found differing between replicas by the last verify (repaired or not).', labelNames: volumeLabel, registers });
  const linkState = new Gauge({ name: 'zebu_volume_engine_link_state', help: 'The NBD frontend\'s link to the engine: OPEN (forwarding), CLOSE (no engine: requests held), REOPENING (held requests re-issued to a new engine); 1 for the current state.', labelNames: ['volume', 'state'], registers });
  const linkReopens = new Counter({ name: 'zebu_volume_engine_link_reopens_total', help: 'Times the frontend reached a new engine after losing one (crash, kill, hang).', labelNames: volumeLabel, registers });
  const linkReissued = new Counter({ name: 'zebu_volume_engine_link_reissued_requests_total', help: 'Client requests the frontend held and re-issued to a new engine.', labelNames: volumeLabel, registers });
  const linkHangs = new Counter({ name: 'zebu_volume_engine_link_hangs_total', help: 'Engines the frontend found hung (no heartbeat, or a request stalled) and killed.', labelNames: volumeLabel, registers });
  const linkHeld = new Gauge({ name: 'zebu_volume_engine_link_held_requests', help: 'Client requests held now for want of an engine.', labelNames: volumeLabel, registers });
  const linkLongestHold = new Gauge({ name: 'zebu_volume_engine_link_longest_hold_seconds', help: 'Longest a re-issued client request waited, from when it was first sent to its answer.', labelNames: volumeLabel, registers });
  const lastBackupTimestamp = new Gauge({ name: 'zebu_volume_last_backup_timestamp_seconds', help: 'When the newest completed backup of the volume completed, in seconds since the Unix epoch (absent: no backup).', labelNames: volumeLabel, registers });
  const recoveryPointTimestamp = new Gauge({ name: 'zebu_volume_recovery_point_timestamp_seconds', help: 'The newest moment whose data a backup of the volume holds (a backup job that found nothing changed moves it on), in seconds since the Unix epoch.', labelNames: volumeLabel, registers });
  const verifyTimestamp = new Gauge({ name: 'zebu_volume_last_verify_timestamp_seconds', help: 'When the last verify ran, in seconds since the Unix epoch.', labelNames: volumeLabel, registers });

  const backupUploaded = new Counter({ name: 'zebu_backup_uploaded_bytes_total', help: 'Bytes the completed backups of a volume in the catalog uploaded (compressed, new blocks only).', labelNames: volumeLabel, registers });
  const backupReused = new Counter({ name: 'zebu_backup_reused_bytes_total', help: 'Bytes the completed backups of a volume in the catalog did not upload: blocks carried over or already on the target.', labelNames: volumeLabel, registers });
  const backupDuration = new Gauge({ name: 'zebu_backup_last_duration_seconds', help: 'Duration of the newest completed backup of the volume.', labelNames: volumeLabel, registers });
  const backupLastSuccess = new Gauge({ name: 'zebu_backup_last_success_timestamp_seconds', help: 'When the newest completed backup of the volume completed, in seconds since the Unix epoch.', labelNames: volumeLabel, registers });
  const backupCount = new Gauge({ name: 'zebu_backups', help: 'Backups of the volume in the catalog by state.', labelNames: ['volume', 'state'], registers });

  const renderBackups = (list: BackupMetrics[]): void => {
    for (const b of list) {
      const labels = { volume: b.volume };
      backupUploaded.inc(labels, b.uploadedBytes);
      backupReused.inc(labels, b.reusedBytes);
      if (b.lastDurationSeconds !== null) backupDuration.set(labels, b.lastDurationSeconds);
      if (b.lastSuccessSeconds !== null) backupLastSuccess.set(labels, b.lastSuccessSeconds);
      backupCount.set({ volume: b.volume, state: 'completed' }, b.completed);
      backupCount.set({ volume: b.volume, state: 'in-progress' }, b.inProgress);
      backupCount.set({ volume: b.volume, state: 'error' }, b.failed);
    }
  };

  const render = (list: VolumeMetrics[], backups: BackupMetrics[]): Promise<string> => {
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
        claimWaitLongest.set({ volume: v.name }, v.io.claimWaitLongestSeconds);
      }
      const labels = { volume: v.name };
      if (v.intent !== null) {
        activeRegions.set(labels, v.intent.activeRegions);
        activeRegionsMax.set(labels, v.intent.maxActiveRegions);
      }
      if (v.superseded !== null) superseded.set(labels, v.superseded ? 1 : 0);
      if (v.lastRecovery !== null) {
        recoveryBytes.set(labels, v.lastRecovery.bytes);
        recoveryRegions.set(labels, v.lastRecovery.regions);
        recoveryDuration.set(labels, v.lastRecovery.durationSeconds);
      }
      if (v.lastVerify !== null) {
        verifyDiffering.set(labels, v.lastVerify.differingRegions);
        verifyTimestamp.set(labels, v.lastVerify.timestampSeconds);
      }
      if (v.lastBackupSeconds !== null) lastBackupTimestamp.set(labels, v.lastBackupSeconds);
      if (v.recoveryPointSeconds !== null) recoveryPointTimestamp.set(labels, v.recoveryPointSeconds);
      if (v.engineLink !== null) {
        for (const st of LINK_STATES) linkState.set({ volume: v.name, state: st }, v.engineLink.state === st ? 1 : 0);
        linkReopens.inc(labels, v.engineLink.reopens);
        linkReissued.inc(labels, v.engineLink.reissued);
        linkHangs.inc(labels, v.engineLink.hangs);
        linkHeld.set(labels, v.engineLink.held);
        linkLongestHold.set(labels, v.engineLink.longestHoldMs / 1000);
      }
    }
    renderBackups(backups);
    return registry.metrics();
  };

  // One scrape at a time: the series are shared state between reset and render.
  let chain: Promise<unknown> = Promise.resolve();
  return {
    contentType: registry.contentType,
    scrape(): Promise<string> {
      const next = chain.then(async () => render(await service.metrics(), backupService !== undefined ? await backupService.backupMetrics() : []));
      chain = next.catch(() => {});
      return next;
    },
  };
}
