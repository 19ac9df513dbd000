/**
 * Waiting for the manager: the API returns at once and the controllers do the work, so the CLI
 * polls the volume until a condition holds or a deadline passes. On a terminal (stderr is a TTY)
 * a progress bar shows how far it got; otherwise nothing extra is written.
 */
import { ErrorCode, ZebuError } from '../../errors.ts';
import type { VolumeView } from '../../manager/types.ts';
import { type ApiClient, isNotFound } from './api-client.ts';

export const POLL_INTERVAL_MS = 250;

export interface Progress {
  /** 0..1 */
  fraction: number;
  label: string;
}

export interface WaitOptions {
  /** What is waited for, for the timeout message: "volume v1 to be attached". */
  what: string;
  timeoutMs: number;
  /** The volume is null once it no longer exists. */
  done: (volume: VolumeView | null) => boolean;
  progress?: (volume: VolumeView) => Progress;
}

export interface Bar {
  update(progress: Progress): void;
  stop(): void;
}

export async function progressBar(title: string): Promise<Bar | null> {
  if (process.stderr.isTTY !== true) return null;
  // Loaded only on a terminal: scripts and tests never pay for it.
  const { default: cliProgress } = await import('cli-progress');
  const bar = new cliProgress.SingleBar({
    stream: process.stderr,
    format: `${title} [{bar}] {percentage}% {label}`,
    clearOnComplete: true,
    hideCursor: true,
    barsize: 30,
  }, cliProgress.Presets.shades_classic);
  bar.start(100, 0, { label: '' });
  return {
    update: (p) => bar.update(Math.round(Math.max(0, Math.min(1, p.fraction)) * 100), { label: p.label }),
    stop: () => bar.stop(),
  };
}

async function getVolumeOrNull(client: ApiClient, name: string): Promise<VolumeView | null> {
  try {
    return await client.get<VolumeView>(`/v1/volumes/${encodeURIComponent(name)}`);
  } catch (err) {
    if (isNotFound(err)) return null;
    throw err;
  }
}

function describe(volume: VolumeView | null): string {
  if (volume === null) return 'it no longer exists';
  const message = volume.message !== null ? `: ${volume.message}` : '';
  return `it is ${volume.state}, ${volume.robustness}${message}`;
}

/** Polls the volume until `done`; returns its last view (null: gone). */
export async function waitForVolume(client: ApiClient, name: string, options: WaitOptions): Promise<VolumeView | null> {
  const deadline = Date.now() + options.timeoutMs;
  const bar = options.progress !== undefined ? await progressBar(`waiting for ${options.what}`) : null;
  try {
    for (;;) {
      const volume = await getVolumeOrNull(client, name);
      if (options.done(volume)) {
        if (volume !== null && options.progress !== undefined) bar?.update({ fraction: 1, label: volume.state });
        return volume;
      }
      if (volume !== null && options.progress !== undefined) bar?.update(options.progress(volume));
      if (Date.now() >= deadline) {
        throw new ZebuError(ErrorCode.TIMEOUT, `timed out after ${options.timeoutMs / 1000} s waiting for ${options.what} (${describe(volume)})`);
      }
      await new Promise((resolve) => setTimeout(resolve, Math.min(POLL_INTERVAL_MS, Math.max(0, deadline - Date.now()))));
    }
  } finally {
    bar?.stop();
  }
}

/** Attach progress: replicas running, then the engine serving; rebuilds by their copied share. */
export function attachProgress(volume: VolumeView): Progress {
  const total = Math.max(1, volume.replicas.length);
  const running = volume.replicas.filter((r) => r.state === 'running').length;
  const fraction = volume.state === 'attached' ? 1 : (running / total) * 0.9;
  return { fraction, label: `${volume.state}, ${running}/${volume.replicas.length} replicas running` };
}

/** Rebuild progress: the mean of the rebuilding replicas' progress. */
export function rebuildProgress(volume: VolumeView): Progress {
  const rebuilding = volume.replicas.filter((r) => r.rebuildProgress !== null);
  if (rebuilding.length === 0) {
    const rw = volume.replicas.filter((r) => r.mode === 'RW').length;
    return { fraction: volume.replicas.length === 0 ? 0 : rw / volume.replicas.length, label: `${volume.state}, ${volume.robustness}` };
  }
  const mean = rebuilding.reduce((sum, r) => sum + (r.rebuildProgress ?? 0), 0) / rebuilding.length;
  return { fraction: mean, label: `rebuilding ${rebuilding.map((r) => r.name).join(', ')}` };
}
