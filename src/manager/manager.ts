/**
 * The manager: controllers over the store, and the service the API serves. Level-triggered:
 * every change to a volume, its engine or its replicas wakes the volume's reconcile, and a
 * periodic resync wakes every volume, so a missed event only delays work.
 */
import type { Store, Watch, WatchEvent } from '../store/store.ts';
import { Kind, Objects, type EngineValue, type ReplicaValue } from '../cluster/objects.ts';
import { Settings } from '../cluster/settings.ts';
import { EventRecorder } from './events.ts';
import { VolumeController } from './volume-controller.ts';
import { ManagerServiceImpl, type NodeAgents } from './service.ts';
import { WorkQueue } from '../cluster/work-queue.ts';
import { Scrubber } from './scrubber.ts';
import { BackupController, type EngineData } from './backup-controller.ts';
import { BackupServiceImpl } from './backup-service.ts';
import { RecurringJobServiceImpl } from './recurring-job-service.ts';
import { RecurringJobScheduler } from './recurring-job-scheduler.ts';
import { JobTasks } from './recurring-job-tasks.ts';
import { BackingImageController } from './backing-image-controller.ts';
import { BackingImageServiceImpl } from './backing-image-service.ts';
import { ImageWrites } from '../backing-image/writer.ts';
import { ZebuError, ErrorCode } from '../errors.ts';

export interface ManagerOptions {
  store: Store;
  agents: NodeAgents;
  /** How backups and restores reach a volume's engine (absent: they fail with UNSUPPORTED). */
  engineData?: EngineData;
  defaultNodeId: string;
  resyncMs?: number;
  /** How often the scrub schedule is looked at (default 1 s). */
  scrubPollMs?: number;
  /** How often recurring jobs are looked at (default 1 s). */
  recurringJobPollMs?: number;
  log?: (event: Record<string, unknown>) => void;
}

export class Manager {
  readonly objects: Objects;
  readonly settings: Settings;
  readonly events: EventRecorder;
  readonly service: ManagerServiceImpl;
  private readonly controller: VolumeController;
  private readonly queue: WorkQueue;
  readonly scrubber: Scrubber;
  readonly backupController: BackupController;
  readonly backups: BackupServiceImpl;
  readonly recurringJobs: RecurringJobServiceImpl;
  readonly recurringJobScheduler: RecurringJobScheduler;
  readonly backingImageController: BackingImageController;
  readonly backingImages: BackingImageServiceImpl;
  private readonly options: ManagerOptions;
  private readonly log: (event: Record<string, unknown>) => void;
  private watch: Watch | null = null;
  private resyncTimer: NodeJS.Timeout | null = null;
  private stopped = false;

  constructor(options: ManagerOptions) {
    this.options = options;
    this.log = options.log ?? (() => {});
    this.objects = new Objects(options.store);
    this.settings = new Settings(this.objects);
    this.events = new EventRecorder(this.objects, this.log);
    this.controller = new VolumeController(this.objects, this.settings, this.events, this.log);
    this.queue = new WorkQueue({ name: 'volume', reconcile: (name) => this.controller.reconcile(name), log: this.log });
    this.service = new ManagerServiceImpl({
      objects: this.objects,
      settings: this.settings,
      events: this.events,
      agents: options.agents,
      defaultNodeId: options.defaultNodeId,
      kick: (name) => this.queue.add(name),
      backupKick: () => this.backupController.kick(),
    });
    this.backupController = new BackupController({
      objects: this.objects,
      settings: this.settings,
      events: this.events,
      engines: options.engineData ?? { openEngineData: () => Promise.reject(new ZebuError(ErrorCode.UNSUPPORTED, 'this manager cannot reach engines for backups')) },
      deleteSnapshot: (volume, snapshot) => this.service.deleteSnapshot(volume, snapshot),
      defaultNodeId: options.defaultNodeId,
      log: this.log,
    });
    this.backups = new BackupServiceImpl({ objects: this.objects, events: this.events, controller: this.backupController, volumes: this.service });
    this.recurringJobs = new RecurringJobServiceImpl({ objects: this.objects, events: this.events, kick: () => this.recurringJobScheduler.kick() });
    this.recurringJobScheduler = new RecurringJobScheduler({
      objects: this.objects,
      events: this.events,
      pollMs: options.recurringJobPollMs,
      log: this.log,
      tasks: new JobTasks({
        objects: this.objects,
        settings: this.settings,
        events: this.events,
        volumes: this.service,
        backups: this.backups,
        checkTarget: () => this.backupController.check(),
        defaultNodeId: options.defaultNodeId,
        log: this.log,
      }),
    });
    const imageWrites = new ImageWrites();
    this.backingImageController = new BackingImageController({
      objects: this.objects, settings: this.settings, events: this.events, log: this.log, nodeId: options.defaultNodeId, writes: imageWrites,
      engines: options.engineData ?? { openEngineData: () => Promise.reject(new ZebuError(ErrorCode.UNSUPPORTED, 'this manager cannot reach engines')) },
      backups: { repository: () => this.backupController.repository() },
    });
    this.backingImages = new BackingImageServiceImpl({
      objects: this.objects, events: this.events, kick: () => void this.backingImageController.kick(), nodeId: options.defaultNodeId, writes: imageWrites,
      backupNow: (name) => this.backingImageController.backupNow(name),
    });
    this.scrubber = new Scrubber({
      objects: this.objects, settings: this.settings, events: this.events, service: this.service, pollMs: options.scrubPollMs, log: this.log,
    });
  }

  async start(): Promise<void> {
    const revision = await this.resync();
    this.watchFrom(revision);
    this.resyncTimer = setInterval(() => {
      this.resync().catch((err) => this.log({ event: 'resync-failed', error: (err as Error).message }));
    }, this.options.resyncMs ?? 10_000);
    this.resyncTimer.unref();
    this.scrubber.start();
    this.backupController.start();
    this.recurringJobScheduler.start();
    this.backingImageController.start();
  }

  /** Enqueues every volume (and every volume named by an engine or replica: orphans too). */
  private async resync(): Promise<number> {
    const revision = await this.options.store.revision();
    await this.noteNodeLiveness().catch((e) => this.log({ event: 'node-liveness-failed', error: (e as Error).message }));
    const names = new Set<string>();
    for (const v of await this.objects.list(Kind.Volume)) names.add(v.name);
    for (const e of await this.objects.list(Kind.Engine)) names.add(e.value.spec.volumeName);
    for (const r of await this.objects.list(Kind.Replica)) names.add(r.value.spec.volumeName);
    for (const name of names) this.queue.add(name);
    return revision;
  }

  private watchFrom(revision: number): void {
    if (this.stopped) return;
    this.watch = this.options.store.watch(
      { afterRevision: revision },
      {
        onEvent: (event: WatchEvent) => this.onChange(event),
        onError: (err) => {
          if (this.stopped) return;
          this.log({ event: 'watch-ended', error: err.message });
          // Start over: list everything, watch from there.
          setTimeout(() => {
            this.resync().then((rev) => this.watchFrom(rev), (e) => this.log({ event: 'resync-failed', error: (e as Error).message }));
          }, 500).unref();
        },
      },
    );
  }

  private onChange(event: WatchEvent): void {
    switch (event.kind) {
      case Kind.Volume:
        this.queue.add(event.name);
        break;
      case Kind.Engine:
        this.queue.add((event.object.value as EngineValue).spec.volumeName);
        break;
      case Kind.Replica:
        this.queue.add((event.object.value as ReplicaValue).spec.volumeName);
        break;
      case Kind.NodeLease:
        void this.noteNodeLiveness().catch((e) => this.log({ event: 'node-liveness-failed', error: (e as Error).message }));
        void this.resync().catch(() => {});
        break;
      case Kind.Disk:
      case Kind.Setting:
        // Placement may be possible now.
        void this.resync().catch(() => {});
        break;
      case Kind.Backup:
      case Kind.BackupTarget:
        this.backupController.kick();
        break;
      case Kind.BackingImage: {
        void this.backingImageController.kick();
        // Volumes on the image: a file ready (a replica may start) or failed (its replica goes).
        const image = event.name;
        void this.objects.list(Kind.Volume).then((volumes) => {
          for (const v of volumes) if (v.value.spec.backingImage?.name === image) this.queue.add(v.name);
        }, () => {});
        break;
      }
    }
    // Files follow disks, and the disks replicas of volumes on an image are placed on.
    if (event.kind === Kind.Disk || event.kind === Kind.NodeLease || event.kind === Kind.Replica) void this.backingImageController.kick();
    // A volume being restored moves on as it attaches and detaches.
    if (event.kind === Kind.Volume || event.kind === Kind.Engine) this.backupController.kick();
  }

  /**
   * A node's lease is its liveness: gone (expired: the node died or is cut off; or its agent
   * stopped) is down, held is up. Each change is noted in the Node object and is an event, once —
   * also when it happened while no manager ran (a leader cut off, the next one not yet elected).
   */
  private async noteNodeLiveness(): Promise<void> {
    const [nodes, leases] = await Promise.all([this.objects.list(Kind.Node), this.objects.list(Kind.NodeLease)]);
    const up = new Set(leases.map((l) => l.name));
    for (const n of nodes) {
      const isUp = up.has(n.name);
      if (n.value.liveness?.up === isUp) continue;
      let changed = false;
      await this.objects.mutate(Kind.Node, n.name, (x) => {
        if (x.liveness?.up === isUp) return false;
        x.liveness = { up: isUp, since: new Date().toISOString() };
        changed = true;
      });
      if (!changed) continue;
      await this.events.record(isUp
        ? { type: 'Normal', reason: 'NodeUp', kind: Kind.Node, object: n.name, volume: null, message: `node ${n.name} is up: its agent holds a lease` }
        : { type: 'Warning', reason: 'NodeDown', kind: Kind.Node, object: n.name, volume: null, message: `node ${n.name} is down: its agent's lease ended (the node died, is cut off from the store, or its agent stopped)` });
    }
  }

  /** Resolves when no reconcile is running or queued (tests). */
  idle(): Promise<void> {
    return this.queue.idle();
  }

  async stop(): Promise<void> {
    this.stopped = true;
    if (this.resyncTimer !== null) clearInterval(this.resyncTimer);
    this.watch?.close();
    await this.recurringJobScheduler.stop();
    await this.backingImageController.stop();
    await this.scrubber.stop();
    await this.backupController.stop();
    await this.queue.stop();
  }
}
