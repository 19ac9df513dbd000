/**
 * Events: what the controllers did and why, for users (`zebu events`). Kept in the store,
 * bounded: the oldest are dropped beyond MAX_EVENTS.
 */
import crypto from 'node:crypto';
import { Kind, type EventValue, type Objects } from '../cluster/objects.ts';
import type { EventView } from './types.ts';

const MAX_EVENTS = 1000;
const PRUNE_EVERY = 50;

export class EventRecorder {
  private readonly objects: Objects;
  private readonly log: (event: Record<string, unknown>) => void;
  private sincePrune = 0;
  private seq = 0;

  constructor(objects: Objects, log: (event: Record<string, unknown>) => void = () => {}) {
    this.objects = objects;
    this.log = log;
  }

  /** Records an event; never throws (an event lost is better than a controller stuck). */
  async record(event: Omit<EventValue, 'time'>): Promise<void> {
    const time = new Date().toISOString();
    // Sortable by time, unique within and across processes.
    const name = `${time.replace(/[:.]/g, '-')}-${String(this.seq++ % 1e6).padStart(6, '0')}-${crypto.randomBytes(3).toString('hex')}`;
    this.log({ event: 'event', ...event });
    try {
      await this.objects.create(Kind.Event, name, { time, ...event });
      if (++this.sincePrune >= PRUNE_EVERY) {
        this.sincePrune = 0;
        await this.prune();
      }
    } catch (err) {
      this.log({ event: 'event-record-failed', error: (err as Error).message });
    }
  }

  private async prune(): Promise<void> {
    const all = await this.objects.list(Kind.Event);
    const excess = all.length - MAX_EVENTS;
    for (let i = 0; i < excess; i++) await this.objects.remove(Kind.Event, all[i].name);
  }

  async list(filter: { volume?: string; limit?: number } = {}): Promise<EventView[]> {
    const all = await this.objects.list(Kind.Event);
    const out: EventView[] = [];
    for (let i = all.length - 1; i >= 0 && out.length < (filter.limit ?? 100); i--) {
      const e = all[i].value;
      if (filter.volume !== undefined && e.volume !== filter.volume) continue;
      out.push({ ...e });
    }
    return out;
  }
}
