/**
 * Registers the client commands (they talk to `zebu up` over the REST API) on the `zebu` program.
 * Only commander is loaded here: the implementations (commands.ts, fetch, cli-progress) are
 * imported when a client command runs, so data-path commands never load them.
 *
 * Every client command takes --api URL (or ZEBU_API; default http://127.0.0.1:9500) and
 * --token TOKEN / --token-file FILE (or ZEBU_TOKEN; default ./zebu-data/token). A failure prints
 * one line, `zebu: <message>`, on stderr and exits with status 1.
 */
import type { Command } from 'commander';

type Commands = typeof import('./commands.ts');
type BackupCommands = typeof import('./backup-commands.ts');
type RecurringJobCommands = typeof import('./recurring-job-commands.ts');
type BackingImageCommands = typeof import('./backing-image-commands.ts');

function failOneLine(err: unknown): never {
  const message = err instanceof Error ? err.message : String(err);
  process.stderr.write(`zebu: ${message.replace(/\s*\n\s*/g, ' ').trim()}\n`);
  process.exit(1);
}

/** Runs one client command: loads the implementations, then exits 0 (open keep-alive sockets must not hold the process). */
function run(action: (commands: Commands) => Promise<void>): Promise<void> {
  return import('./commands.ts')
    .then(action)
    .then(() => process.exit(0), failOneLine);
}

function runBackup(action: (commands: BackupCommands) => Promise<void>): Promise<void> {
  return import('./backup-commands.ts')
    .then(action)
    .then(() => process.exit(0), failOneLine);
}

function runRecurringJob(action: (commands: RecurringJobCommands) => Promise<void>): Promise<void> {
  return import('./recurring-job-commands.ts')
    .then(action)
    .then(() => process.exit(0), failOneLine);
}

function runBackingImage(action: (commands: BackingImageCommands) => Promise<void>): Promise<void> {
  return import('./backing-image-commands.ts')
    .then(action)
    .then(() => process.exit(0), failOneLine);
}

/** A usage error (missing option, unknown flag) in the same one-line form as every other error. */
function oneLineUsageErrors(cmd: Command): Command {
  return cmd
    .showHelpAfterError(false)
    .configureOutput({
      outputError: (text, write) => write(`zebu: ${text.replace(/^error: /, '').replace(/\s*\n\s*/g, ' ').trim()}\n`),
    });
}

function clientCommand(parent: Command, nameAndArgs: string, description: string, options: { json?: boolean } = {}): Command {
  const cmd = oneLineUsageErrors(parent.command(nameAndArgs).description(description))
    .option('--api <URL>', 'API URL (default: $ZEBU_API or http://127.0.0.1:9500)')
    .option('--token <TOKEN>', 'API token (default: $ZEBU_TOKEN or the file ./zebu-data/token)')
    .option('--token-file <FILE>', 'file holding the API token');
  if (options.json !== false) cmd.option('--json', 'print JSON as the API returns it');
  return cmd;
}

function waiting(cmd: Command, what: string): Command {
  return cmd
    .option('--no-wait', `return at once instead of waiting ${what}`)
    .option('--timeout <SECONDS>', 'how long to wait (default 300)');
}

/** The group `name` of the program (created if main.ts has none yet). */
function group(program: Command, name: string, description: string): Command {
  return program.commands.find((c) => c.name() === name) ?? oneLineUsageErrors(program.command(name).description(description));
}

export function registerClientCommands(program: Command): void {
  const collect = (value: string, previous: string[] = []): string[] => [...previous, value];
  const volume = group(program, 'volume', 'volumes');
  waiting(clientCommand(volume, 'create <NAME>', 'create a volume (replicas are placed now; it starts detached), or restore a backup into it'), 'for a restore to finish')
    .option('--size <SIZE>', 'size: bytes or with a unit (1GiB, 512MiB); a multiple of 4096 (with --from-backup: default the backup\'s size)')
    .option('--replicas <N>', 'number of replicas (default: the default-replica-count setting)')
    .option('--from-backup <BACKUP>', 'restore this backup into the new volume')
    .option('--standby', 'with --from-backup: a DR standby that keeps applying newer backups of the same volume until activated')
    .option('--backing-image <IMAGE>', 'create the volume on this backing image (its base; --size then defaults to the image\'s size)')
    .option('--data-locality <MODE>', 'disabled or best-effort: keep a replica on the node the volume is attached on (default: the default-data-locality setting)')
    .option('--node-selector <TAG>', 'a tag every node holding a replica must carry (repeat for more)', collect)
    .option('--disk-selector <TAG>', 'a tag every disk holding a replica must carry (repeat for more)', collect)
    .action((name: string, opts) => (opts.fromBackup !== undefined ? runBackup((c) => c.volumeCreateFromBackup(name, opts)) : run((c) => c.volumeCreate(name, opts))));
  waiting(clientCommand(volume, 'activate <NAME>', 'activate a DR standby volume: apply the newest backup, then allow attaching it'), 'until it is activated')
    .action((name: string, opts) => runBackup((c) => c.volumeActivate(name, opts)));
  clientCommand(volume, 'list', 'list volumes')
    .action((opts) => run((c) => c.volumeList(opts)));
  clientCommand(volume, 'get <NAME>', 'show a volume and its replicas')
    .action((name: string, opts) => run((c) => c.volumeGet(name, opts)));
  waiting(clientCommand(volume, 'attach <NAME>', 'attach a volume; prints its NBD URI once it is served'), 'until it is attached')
    .option('--node <NODE>', 'node to attach to (default: the manager\'s own node)')
    .option('--maintenance', 'attach without an NBD export (for snapshot revert)')
    .action((name: string, opts) => run((c) => c.volumeAttach(name, opts)));
  waiting(clientCommand(volume, 'detach <NAME>', 'detach a volume (stops its engine and replicas)'), 'until it is detached')
    .action((name: string, opts) => run((c) => c.volumeDetach(name, opts)));
  waiting(clientCommand(volume, 'delete <NAME>', 'delete a detached volume and its replicas', { json: false }), 'until it is gone')
    .action((name: string, opts) => run((c) => c.volumeDelete(name, opts)));
  waiting(clientCommand(volume, 'expand <NAME>', 'grow a volume (online when attached)'), 'for the new size')
    .requiredOption('--size <SIZE>', 'the new size (larger than the current one)')
    .action((name: string, opts) => run((c) => c.volumeExpand(name, opts)));
  clientCommand(volume, 'salvage <NAME>', 'bring a faulted volume back: a new engine starts on its replicas and picks the best one as source')
    .option('--replica <REPLICA>', 'a replica to salvage from (repeat for more; default: all replicas of the volume)', (value: string, previous: string[] = []) => [...previous, value])
    .action((name: string, opts) => run((c) => c.volumeSalvage(name, opts)));
  clientCommand(volume, 'verify <NAME>', 'compare the replicas of an attached volume region by region; exit status 1 when regions differ')
    .option('--repair', 'copy differing regions from the source replica into the others')
    .action((name: string, opts) => run((c) => c.volumeVerify(name, opts)));
  clientCommand(volume, 'wait <NAME>', 'wait until a volume reaches a state and/or robustness')
    .option('--state <STATE>', 'creating, detached, attaching, attached, detaching, deleting or deleted')
    .option('--robustness <R>', 'healthy, degraded, faulted or unknown')
    .option('--timeout <SECONDS>', 'how long to wait (default 300)')
    .action((name: string, opts) => run((c) => c.volumeWait(name, opts)));

  clientCommand(volume, 'update <NAME>', 'change a volume: its data locality, which recurring jobs cover it (by name and by group; with neither, the group default)')
    .option('--data-locality <MODE>', 'disabled or best-effort: keep a replica on the node the volume is attached on')
    .option('--node-selector <TAG>', 'a tag every node of a new replica must carry (repeat; replaces the list; replicas in place stay)', collect)
    .option('--disk-selector <TAG>', 'a tag every disk of a new replica must carry (repeat; replaces the list; replicas in place stay)', collect)
    .option('--clear-selectors', 'no node or disk selector')
    .option('--recurring-job <JOB>', 'a job the volume joins by name (repeat for more; replaces the list)', collect)
    .option('--recurring-job-group <GROUP>', 'a group the volume joins (repeat for more; replaces the list)', collect)
    .option('--clear-recurring-jobs', 'name no job and no group (the volume is then in the group default)')
    .action((name: string, opts) => {
      const jobs = opts.recurringJob !== undefined || opts.recurringJobGroup !== undefined || opts.clearRecurringJobs === true;
      if (opts.dataLocality === undefined && opts.nodeSelector === undefined && opts.diskSelector === undefined && opts.clearSelectors !== true) {
        return runRecurringJob((c) => c.volumeUpdateJobs(name, opts));
      }
      return run(async (c) => {
        await c.volumeUpdate(name, opts);
        if (jobs) await (await import('./recurring-job-commands.ts')).volumeUpdateJobs(name, opts);
      });
    });

  const images = group(program, 'backing-image', 'base images kept as files on disks, for volumes to start from');
  waiting(clientCommand(images, 'create <NAME>', 'create a backing image: downloaded from a URL, uploaded from a file, or exported from a volume\'s snapshot'), 'until its first file is ready')
    .option('--url <URL>', 'download the image (raw) from this http:// or https:// URL')
    .option('--upload <FILE>', 'upload this file (raw) through the API')
    .option('--from-volume <VOLUME>', 'export the image from a snapshot of this attached volume (with --snapshot)')
    .option('--snapshot <SNAPSHOT>', 'with --from-volume: the snapshot')
    .option('--from-backup <BACKUP>', 'restore the image from this backup (its volume\'s bytes at the backup)')
    .option('--checksum <SHA512>', 'SHA-512 the image must have (hex); absent: fixed at the first download')
    .option('--min-copies <N>', 'ready files wanted on different disks (default 2)')
    .option('--node <NODE>', 'a node the files may be on (repeat for more; default any)', collect)
    .option('--disk <DISK>', 'a disk the files may be on (repeat for more; default any)', collect)
    .action((name: string, opts) => runBackingImage((c) => c.backingImageCreate(name, opts)));
  waiting(clientCommand(images, 'upload <NAME> <FILE>', 'send the bytes of an upload image (again, after a failed upload)'), 'until they are written and verified')
    .action((name: string, file: string, opts) => runBackingImage((c) => c.backingImageUpload(name, file, opts)));
  waiting(clientCommand(images, 'backup <NAME>', 'store the image in the backup target (uploads and exports get one by themselves)'), 'until it is stored')
    .action((name: string, opts) => runBackingImage((c) => c.backingImageBackup(name, opts)));
  clientCommand(images, 'list', 'list backing images')
    .action((opts) => runBackingImage((c) => c.backingImageList(opts)));
  clientCommand(images, 'get <NAME>', 'show a backing image and its files')
    .action((name: string, opts) => runBackingImage((c) => c.backingImageGet(name, opts)));
  waiting(clientCommand(images, 'delete <NAME>', 'delete a backing image and its files', { json: false }), 'until its files are removed')
    .action((name: string, opts) => runBackingImage((c) => c.backingImageDelete(name, opts)));

  const recurring = group(program, 'recurring-job', 'scheduled snapshots, backups and cleanups of volumes');
  const jobOptions = (cmd: ReturnType<typeof clientCommand>, creating: boolean) => cmd
    .option('--task <TASK>', `snapshot, snapshot-cleanup, snapshot-delete, backup or backup-force-create${creating ? ' (required)' : ''}`)
    .option('--cron <CRON>', `schedule: 5 cron fields, or 6 with seconds first, e.g. "0 2 * * *"${creating ? ' (required)' : ''}`)
    .option('--timezone <TZ>', 'IANA time zone the schedule is read in (default UTC)')
    .option('--retain <N>', 'snapshots or backups kept per volume, 1-250 (default 1)')
    .option('--retain-max-age <AGE>', 'also remove what is older (90m, 12h, 30d; never the newest); "none": no limit')
    .option('--concurrency <N>', 'volumes processed at once (default 1)')
    .option('--group <GROUP>', 'a group the job runs for (repeat for more; "default": volumes that name no job)', collect)
    .option('--label <KEY=VALUE>', 'a label (repeat for more)', collect);
  jobOptions(clientCommand(recurring, 'create <NAME>', 'create a recurring job'), true)
    .action((name: string, opts) => runRecurringJob((c) => c.recurringJobCreate(name, opts)));
  jobOptions(clientCommand(recurring, 'update <NAME>', 'change a recurring job (the fields given; a new schedule starts from now)'), false)
    .action((name: string, opts) => runRecurringJob((c) => c.recurringJobUpdate(name, opts)));
  clientCommand(recurring, 'list', 'list recurring jobs: schedule, next and last run, results per volume')
    .action((opts) => runRecurringJob((c) => c.recurringJobList(opts)));
  clientCommand(recurring, 'get <NAME>', 'show a recurring job')
    .action((name: string, opts) => runRecurringJob((c) => c.recurringJobGet(name, opts)));
  clientCommand(recurring, 'delete <NAME>', 'delete a recurring job (what it made is kept)', { json: false })
    .action((name: string, opts) => runRecurringJob((c) => c.recurringJobDelete(name, opts)));

  const snapshot = group(program, 'snapshot', 'snapshots of volumes');
  clientCommand(snapshot, 'create <VOLUME> [NAME]', 'snapshot an attached volume (name generated when absent)')
    .action((volumeName: string, name: string | undefined, opts) => run((c) => c.snapshotCreate(volumeName, name, opts)));
  clientCommand(snapshot, 'list <VOLUME>', 'list the snapshots of a volume')
    .action((volumeName: string, opts) => run((c) => c.snapshotList(volumeName, opts)));
  clientCommand(snapshot, 'delete <VOLUME> <NAME>', 'delete a snapshot of an attached volume', { json: false })
    .action((volumeName: string, name: string, opts) => run((c) => c.snapshotDelete(volumeName, name, opts)));
  clientCommand(snapshot, 'revert <VOLUME> <NAME>', 'revert a volume attached with --maintenance to a snapshot', { json: false })
    .action((volumeName: string, name: string, opts) => run((c) => c.snapshotRevert(volumeName, name, opts)));

  const replica = group(program, 'replica', 'replicas');
  clientCommand(replica, 'list', 'list replicas')
    .option('--volume <VOLUME>', 'only the replicas of this volume')
    .action((opts) => run((c) => c.replicaList(opts)));
  clientCommand(replica, 'get <NAME>', 'show a replica')
    .action((name: string, opts) => run((c) => c.replicaGet(name, opts)));
  clientCommand(replica, 'move <NAME>', 'move a replica to another disk or node with no downtime: a new replica is rebuilt while this one serves, then this one is removed (the volume must be attached)')
    .option('--disk <DISK>', 'the disk to move to')
    .option('--node <NODE>', 'the node to move to (any of its disks)')
    .action((name: string, opts) => run((c) => c.replicaMove(name, opts)));

  const node = group(program, 'node', 'nodes');
  clientCommand(node, 'list', 'list nodes')
    .action((opts) => run((c) => c.nodeList(opts)));

  clientCommand(node, 'update <NAME>', 'change a node: whether new replicas may be placed on it, eviction')
    .option('--scheduling <on|off>', 'allow (on) or stop (off) placing new replicas on the node')
    .option('--evict', 'move every replica off the node (each is rebuilt on another node first)')
    .option('--tag <TAG>', 'a tag of the node, which volumes select nodes by (repeat for more; replaces its tags)', collect)
    .option('--clear-tags', 'remove every tag of the node')
    .option('--no-evict', 'stop evicting the node')
    .action((name: string, opts) => run((c) => c.nodeUpdate(name, opts)));

  const disk = group(program, 'disk', 'disks');
  clientCommand(disk, 'list', 'list disks')
    .action((opts) => run((c) => c.diskList(opts)));
  clientCommand(disk, 'update <NAME>', 'change a disk: scheduling on/off, space kept free, eviction')
    .option('--scheduling <on|off>', 'allow (on) or stop (off) placing new replicas on the disk')
    .option('--evict', 'move every replica off the disk (each is rebuilt on another disk first)')
    .option('--tag <TAG>', 'a tag of the disk, which volumes select disks by (repeat for more; replaces its tags)', collect)
    .option('--clear-tags', 'remove every tag of the disk')
    .option('--no-evict', 'stop evicting the disk')
    .option('--reserved <SIZE>', 'space the scheduler keeps free on the disk, e.g. 10GiB')
    .action((name: string, opts) => run((c) => c.diskUpdate(name, opts)));

  const setting = group(program, 'setting', 'settings of the manager');
  clientCommand(setting, 'list', 'list settings')
    .action((opts) => run((c) => c.settingList(opts)));
  clientCommand(setting, 'get <NAME>', 'show a setting')
    .action((name: string, opts) => run((c) => c.settingGet(name, opts)));
  clientCommand(setting, 'set <NAME> <VALUE>', 'change a setting')
    .action((name: string, value: string, opts) => run((c) => c.settingSet(name, value, opts)));

  const target = group(program, 'backup-target', 'where backups are kept');
  clientCommand(target, 'set <URL>', 'set the backup target: file:///DIR or s3://BUCKET/PREFIX; it is checked at once')
    .option('--endpoint <URL>', 'S3: http(s)://HOST[:PORT] of an S3-compatible server')
    .option('--region <REGION>', 'S3 region (default us-east-1)')
    .option('--credential-file <FILE>', 'S3 credentials: JSON {"accessKeyId","secretAccessKey"} or AWS_ACCESS_KEY_ID=/AWS_SECRET_ACCESS_KEY= lines (stored, never shown)')
    .action((url: string, opts) => runBackup((c) => c.backupTargetSet(url, opts)));
  clientCommand(target, 'get', 'show the backup target and whether it is reachable')
    .action((opts) => runBackup((c) => c.backupTargetGet(opts)));
  clientCommand(target, 'check', 'check that the target is reachable and writable; exit status 1 when not')
    .action((opts) => runBackup((c) => c.backupTargetCheck(opts)));
  clientCommand(target, 'sync', 'rebuild the catalog of backups from the target')
    .action((opts) => runBackup((c) => c.backupTargetSync(opts)));
  clientCommand(target, 'verify', 'read every block of every backup and check its hash; exit status 1 when one is missing or corrupt')
    .option('--volume <VOLUME>', 'only the backups of this volume')
    .action((opts) => runBackup((c) => c.backupTargetVerify(opts)));
  clientCommand(target, 'gc', 'remove blocks no backup refers to (runs by itself after deletes)')
    .action((opts) => runBackup((c) => c.backupTargetGc(opts)));

  const backup = group(program, 'backup', 'backups of volumes');
  waiting(clientCommand(backup, 'create <VOLUME>', 'back up an attached volume (a snapshot is taken first unless --snapshot names one)'), 'for the backup to complete')
    .option('--snapshot <SNAPSHOT>', 'back up this existing snapshot')
    .option('--label <KEY=VALUE>', 'a label kept with the backup (repeat for more)', (value: string, previous: string[] = []) => [...previous, value])
    .action((volumeName: string, opts) => runBackup((c) => c.backupCreate(volumeName, opts)));
  clientCommand(backup, 'list', 'list backups')
    .option('--volume <VOLUME>', 'only the backups of this volume')
    .action((opts) => runBackup((c) => c.backupList(opts)));
  clientCommand(backup, 'get <NAME>', 'show a backup')
    .action((name: string, opts) => runBackup((c) => c.backupGet(name, opts)));
  waiting(clientCommand(backup, 'delete <NAME>', 'delete a backup (its blocks no other backup uses are collected)', { json: false }), 'until it is gone')
    .action((name: string, opts) => runBackup((c) => c.backupDelete(name, opts)));
  waiting(clientCommand(backup, 'restore <BACKUP>', 'restore a backup into a new volume'), 'for the restore to finish')
    .requiredOption('--to <NEWVOL>', 'the new volume')
    .option('--replicas <N>', 'number of replicas (default: the default-replica-count setting)')
    .option('--size <SIZE>', 'size of the new volume (default: the backup\'s)')
    .option('--standby', 'a DR standby: keeps applying newer backups of the same volume until activated')
    .action((backupName: string, opts) => runBackup((c) => c.backupRestore(backupName, opts)));

  clientCommand(program, 'events', 'events, newest first')
    .option('--volume <VOLUME>', 'only the events of this volume')
    .option('--limit <N>', 'at most N events (1-1000)')
    .action((opts) => run((c) => c.events(opts)));
}
