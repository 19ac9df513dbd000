/**
 * Scheduled verify ("scrub"): at the times of the `scrub-schedule` setting (a cron expression;
 * "" = never) every attached volume is verified — its replicas compared region by region, no
 * repair — one volume after the other. The outcome is the volume's `lastVerify` and a VerifyDone
 * event (a warning when regions differ). A run still going when the next time comes delays it.
 */
import { Cron } from 'croner';
import { Kind, type Objects } from '../cluster/objects.ts';
import type { Settings } from '../cluster/settings.ts';
import type { EventRecorder } from './events.ts';
import type { ManagerServiceImpl } from './service.ts';

export interface ScrubberOptions {
  objects: Objects;
  settings: Settings;
  events: EventRecorder;
  service: Pick<ManagerServiceImpl, 'verifyVolume'>;
  /** How often the setting and the clock are looked at; a schedule finer than this is coarsened. */
  pollMs?: number;
  log?: (event: Record<string, unknown>) => void;
}

export class Scrubber {
  private readonly options: Required<ScrubberOptions>;
  private timer: NodeJS.Timeout | null = null;
  private pattern: string | null = null;
  private cron: Cron | null = null;
  private nextAtMs: number | null = null;
  private run: Promise<void> | null = null;
  private stopped = false;
  /** Runs completed (tests). */
  runs = 0;

  constructor(options: ScrubberOptions) {
    this.options = { ...options, pollMs: options.pollMs ?? 1000, log: options.log ?? (() => {}) };
  }

  start(): void {
    this.timer = setInterval(() => {
      this.tick().catch((err) => this.options.log({ event: 'scrub-tick-failed', error: (err as Error).message }));
    }, this.options.pollMs);
    this.timer.unref();
  }

  async stop(): Promise<void> {
    this.stopped = true;
    if (this.timer !== null) clearInterval(this.timer);
    this.cron?.stop();
    await this.run;
  }

  /** Looks at the setting and the clock; starts a run when one is due. */
  async tick(nowMs = Date.now()): Promise<void> {
    const pattern = await this.options.settings.string('scrub-schedule');
    if (pattern !== this.pattern) {
      this.pattern = pattern;
      this.cron?.stop();
      this.cron = null;
      this.nextAtMs = null;
      if (pattern !== '') {
        try {
          this.cron = new Cron(pattern, { paused: true });
          this.nextAtMs = this.cron.nextRun(new Date(nowMs))?.getTime() ?? null;
        } catch (err) {
          this.options.log({ event: 'scrub-schedule-invalid', pattern, error: (err as Error).message });
        }
      }
    }
    if (this.cron === null || this.nextAtMs === null || nowMs < this.nextAtMs || this.run !== null || this.stopped) return;
    this.nextAtMs = this.cron.nextRun(new Date(nowMs))?.getTime() ?? null;
    this.run = this.scrubAll().finally(() => {
      this.run = null;
      this.runs++;
    });
    await this.run;
  }

  /** Verifies every attached volume, one at a time. */
  async scrubAll(): Promise<void> {
    const volumes = await this.options.objects.list(Kind.Volume);
    for (const v of volumes) {
      if (this.stopped) return;
      if (v.value.status.state !== 'attached' || v.value.deletionRequestedAt !== null) continue;
      try {
        await this.options.service.verifyVolume(v.name, { repair: false });
      } catch (err) {
        await this.options.events.record({
          type: 'Warning', reason: 'VerifyFailed', message: `scheduled verify of volume ${v.name} failed: ${(err as Error).message}`,
          kind: Kind.Volume, object: v.name, volume: v.name,
        });
      }
    }
  }
}
