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
  const volume = group(program, 'volume', 'volumes');
  waiting(clientCommand(volume, 'create <NAME>', 'create a volume (replicas are placed now; it starts detached), or restore a backup into it'), 'for a restore to finish')
    .option('--size <SIZE>', 'size: bytes or with a unit (1GiB, 512MiB); a multiple of 4096 (with --from-backup: default the backup\'s size)')
    .option('--replicas <N>', 'number of replicas (default: the default-replica-count setting)')
    .option('--from-backup <BACKUP>', 'restore this backup into the new volume')
    .option('--standby', 'with --from-backup: a DR standby that keeps applying newer backups of the same volume until activated')
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

  const node = group(program, 'node', 'nodes');
  clientCommand(node, 'list', 'list nodes')
    .action((opts) => run((c) => c.nodeList(opts)));

  clientCommand(node, 'update <NAME>', 'change a node: whether new replicas may be placed on it')
    .option('--scheduling <on|off>', 'allow (on) or stop (off) placing new replicas on the node')
    .action((name: string, opts) => run((c) => c.nodeUpdate(name, opts)));

  const disk = group(program, 'disk', 'disks');
  clientCommand(disk, 'list', 'list disks')
    .action((opts) => run((c) => c.diskList(opts)));
  clientCommand(disk, 'update <NAME>', 'change a disk: scheduling on/off, space kept free')
    .option('--scheduling <on|off>', 'allow (on) or stop (off) placing new replicas on the disk')
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
