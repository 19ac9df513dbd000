/**
 * The settings catalogue: every tunable of the manager, its type, range and default. A Setting
 * object in the store exists only once a user has changed it; absent means default.
 */
import { Cron } from 'croner';
import { invalid, ZebuError, ErrorCode } from '../errors.ts';
import { Kind, type Objects } from './objects.ts';
import type { SettingView } from './object-types.ts';

interface SettingDefinition {
  type: 'int' | 'bool' | 'string';
  default: string;
  min?: number;
  max?: number;
  description: string;
  /** Extra check of a string value; throws a message when it is wrong. */
  check?: (value: string) => void;
}

/** Longest cron expression accepted (a real one is a few dozen characters). */
const CRON_MAX_CHARS = 200;

/** "" (off) or a cron expression croner accepts (5 fields, or 6 with seconds first). */
export function checkCronExpression(value: string): void {
  if (value === '') return;
  if (value.length > CRON_MAX_CHARS) throw new Error(`at most ${CRON_MAX_CHARS} characters`);
  try {
    new Cron(value, { paused: true }).stop();
  } catch (err) {
    throw new Error(`not a cron expression: ${(err as Error).message}`);
  }
}

export const SETTINGS = {
  'default-replica-count': {
    type: 'int', default: '3', min: 1, max: 20,
    description: 'Replicas of a new volume when the request does not say.',
  },
  'replica-soft-anti-affinity': {
    type: 'bool', default: 'true',
    description: 'Allow replicas of one volume on the same node (on different disks) when no other node can take them. Replicas of a volume are never on the same disk.',
  },
  'storage-over-provisioning-percentage': {
    type: 'int', default: '100', min: 1, max: 10000,
    description: 'Volumes placed on a disk may add up to this percentage of its usable size (size minus reserved). Replicas are thin, so over 100 trades safety for room.',
  },
  'storage-minimal-available-percentage': {
    type: 'int', default: '10', min: 0, max: 100,
    description: 'No new replica goes to a disk whose free space is below this percentage of its size.',
  },
  'engine-replica-timeout-ms': {
    type: 'int', default: '8000', min: 1000, max: 120000,
    description: 'A replica that does not answer an engine request in this time is taken out of the volume (applies to engines started afterwards).',
  },
  'engine-replica-wait-seconds': {
    type: 'int', default: '30', min: 0, max: 600,
    description: 'A starting engine waits this long for replicas it cannot reach yet (they restart with it after a crash of the whole volume or node) before it starts without them; clients wait meanwhile. Replicas known to be failed are not waited for.',
  },
  'frontend-hold-timeout-seconds': {
    type: 'int', default: '300', min: 5, max: 86400,
    description: 'While a volume\'s engine is away (crashed, hung, restarting), the NBD frontend holds the clients\' requests; those still held after this long fail with EIO.',
  },
  'engine-hang-timeout-seconds': {
    type: 'int', default: '10', min: 2, max: 600,
    description: 'An engine that does not answer the frontend\'s heartbeat this long is hung: it is killed and restarted, and its requests re-issued to the new one.',
  },
  'engine-stall-timeout-seconds': {
    type: 'int', default: '60', min: 10, max: 3600,
    description: 'An engine that leaves a client request unanswered this long is hung (it answers heartbeats but makes no progress): it is killed and restarted, and its requests re-issued. Keep it well above engine-replica-timeout-ms.',
  },
  'rebuild-lease-recall-timeout-ms': {
    type: 'int', default: '4000', min: 0, max: 600000,
    description: 'A rebuild copies each region under a lease; a client write to the region recalls it, and the copy gives it back after its current chunk (256 KiB). A copy that has not given it back after this long (stuck, stopped) loses it: the write goes on, and the copy starts that region again from where it had got. 0: wait for ever. Keep it below engine-replica-timeout-ms (applies to engines started afterwards).',
  },
  'rebuild-max-region-retries': {
    type: 'int', default: '5', min: 0, max: 1000,
    description: 'How many times one region of a rebuild may lose its lease (see rebuild-lease-recall-timeout-ms) before the rebuild fails, naming the region and why (applies to engines started afterwards).',
  },
  'rebuild-max-mib-per-second': {
    type: 'int', default: '0', min: 0, max: 1048576,
    description: 'What a rebuild may write to its new replica per second, in MiB (per volume, averaged over a few 4 MiB regions), so that rebuilds leave the disks and the network to clients; 0: no limit. Applies at once, also to rebuilds under way.',
  },
  'replica-auto-balance': {
    type: 'string', default: 'disabled',
    description: 'Whether the manager moves replicas of healthy volumes to spread them (each move: a new replica rebuilt first, then the old one removed; a detached volume is attached without an NBD export for it, then detached). "disabled"; "least-effort": replicas of a volume sharing a node move to a node that holds none of them, when one can take them; "best-effort": also even out how many replicas each node, then each disk of a node, holds.',
    check: (value) => {
      if (value !== 'disabled' && value !== 'least-effort' && value !== 'best-effort') throw new Error('must be "disabled", "least-effort" or "best-effort"');
    },
  },
  'default-data-locality': {
    type: 'string', default: 'disabled',
    description: 'Data locality of a new volume when the request does not say. "disabled"; "best-effort": a volume attached on a node that holds none of its replicas gets one there (built first, then a remote one removed), when that node can take it, so that reads stay on the node. A recurring job\'s own attachment never moves a replica.',
    check: (value) => {
      if (value !== 'disabled' && value !== 'best-effort') throw new Error('must be "disabled" or "best-effort"');
    },
  },
  'replica-start-timeout-ms': {
    type: 'int', default: '30000', min: 1000, max: 600000,
    description: 'At attach, replicas not running after this long are left out (and replaced) if the others can serve.',
  },
  'write-intent-max-regions': {
    type: 'int', default: '256', min: 1, max: 65536,
    description: 'Regions (4 MiB each) an engine lets be written between flushes before it flushes by itself: bounds what recovery resyncs after a crash (applies to engines started afterwards).',
  },
  'auto-salvage': {
    type: 'bool', default: 'true',
    description: 'When every replica of an attached volume is out (faulted), restart its engine on them at once, as `zebu volume salvage` does.',
  },
  'replica-replenishment-wait-seconds': {
    type: 'int', default: '60', min: 0, max: 86400,
    description: 'A failed replica whose process comes back within this time is rebuilt by delta (only the regions written meanwhile); after it, or when no delta is possible, a new replica replaces it. 0: replace at once.',
  },
  'scrub-schedule': {
    type: 'string', default: '',
    description: 'Cron expression (5 fields, or 6 with seconds first) at which every attached volume is verified (replicas compared region by region; no repair); "" = never.',
    check: checkCronExpression,
  },
  'backup-concurrency': {
    type: 'int', default: '4', min: 1, max: 64,
    description: 'Blocks (2 MiB) a backup or a restore reads, compresses, hashes and transfers at once.',
  },
  'backup-compression': {
    type: 'string', default: 'zstd',
    description: 'How new backup blocks are compressed: "zstd" or "none" (a block that does not shrink is stored as is).',
    check: (value) => {
      if (value !== 'zstd' && value !== 'none') throw new Error('must be "zstd" or "none"');
    },
  },
  'allow-recurring-job-while-volume-detached': {
    type: 'bool', default: 'false',
    description: 'Whether recurring jobs run on detached volumes: the job attaches the volume without an NBD export on the node a workload last attached it on when that node is up (else on a node that holds a healthy replica), does its task and detaches it (a workload attach waits meanwhile). false: the jobs of a detached volume are suspended, and say so.',
  },
  'recurring-job-attach-timeout-seconds': {
    type: 'int', default: '300', min: 10, max: 86400,
    description: 'How long a recurring job waits for a volume it attached (or that is attaching) to be attached before its run fails for that volume.',
  },
  'backing-image-recovery-wait-seconds': {
    type: 'int', default: '300', min: 0, max: 86400,
    description: 'How long a file of a backing image may be unknown (its disk or node gone, unreachable or removed) before it counts as lost: when no file is ready and every file is failed or lost, the image is fetched again.',
  },
  'backup-target-poll-interval-seconds': {
    type: 'int', default: '300', min: 0, max: 86400,
    description: 'How often the catalog of backups is synced from the backup target (backups written by another cluster appear; DR standby volumes see new backups); 0 = only on `zebu backup-target sync`.',
  },
} as const satisfies Record<string, SettingDefinition>;

export type SettingName = keyof typeof SETTINGS;

function definition(name: string): SettingDefinition {
  const def = (SETTINGS as Record<string, SettingDefinition>)[name];
  if (def === undefined) throw new ZebuError(ErrorCode.NOT_FOUND, `setting ${name} not found (known: ${Object.keys(SETTINGS).join(', ')})`);
  return def;
}

/** Checks a value against its setting; returns it normalised. */
export function validateSetting(name: string, value: string): string {
  const def = definition(name);
  const text = value.trim();
  if (def.type === 'bool') {
    if (text !== 'true' && text !== 'false') throw invalid(`setting ${name} must be true or false, got ${JSON.stringify(value)}`, 'value');
    return text;
  }
  if (def.type === 'int') {
    if (!/^-?\d+$/.test(text)) throw invalid(`setting ${name} must be a whole number, got ${JSON.stringify(value)}`, 'value');
    const n = Number(text);
    if ((def.min !== undefined && n < def.min) || (def.max !== undefined && n > def.max)) {
      throw invalid(`setting ${name} must be between ${def.min} and ${def.max}, got ${n}`, 'value');
    }
    return String(n);
  }
  const trimmed = value.trim();
  if (def.check !== undefined) {
    try {
      def.check(trimmed);
    } catch (err) {
      throw invalid(`setting ${name}: ${(err as Error).message}, got ${JSON.stringify(value)}`, 'value');
    }
  }
  return trimmed;
}

export function settingView(name: string, stored: string | null): SettingView {
  const def = definition(name);
  return { name, value: stored ?? def.default, default: def.default, type: def.type, description: def.description };
}

/** Current values of every setting. */
export class Settings {
  private readonly objects: Objects;

  constructor(objects: Objects) {
    this.objects = objects;
  }

  async raw(name: SettingName): Promise<string> {
    const obj = await this.objects.get(Kind.Setting, name);
    return obj?.value.value ?? SETTINGS[name].default;
  }

  async int(name: SettingName): Promise<number> {
    return Number(await this.raw(name));
  }

  async string(name: SettingName): Promise<string> {
    return this.raw(name);
  }

  async bool(name: SettingName): Promise<boolean> {
    return (await this.raw(name)) === 'true';
  }

  async list(): Promise<SettingView[]> {
    const stored = new Map((await this.objects.list(Kind.Setting)).map((o) => [o.name, o.value.value]));
    return Object.keys(SETTINGS).map((name) => settingView(name, stored.get(name) ?? null));
  }

  async get(name: string): Promise<SettingView> {
    definition(name);
    const obj = await this.objects.get(Kind.Setting, name);
    return settingView(name, obj?.value.value ?? null);
  }

  async set(name: string, value: string): Promise<SettingView> {
    const normalised = validateSetting(name, value);
    const updated = await this.objects.mutate(Kind.Setting, name, (v) => {
      v.value = normalised;
    });
    if (updated === null) {
      try {
        await this.objects.create(Kind.Setting, name, { value: normalised });
      } catch (err) {
        if ((err as ZebuError).code !== ErrorCode.EXISTS) throw err;
        await this.objects.mutate(Kind.Setting, name, (v) => {
          v.value = normalised;
        });
      }
    }
    return settingView(name, normalised);
  }
}
