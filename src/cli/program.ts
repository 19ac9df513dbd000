/** The `zebu` command's commands (main.ts is the entry). */
import { Command, Option } from 'commander';
import { ZebuError } from '../errors.ts';
import { replicaServe } from './replica-serve.ts';
import { engineServe } from './engine-serve.ts';
import { frontendServe } from './frontend-serve.ts';
import { volumeServe } from './volume-serve.ts';
import { controlRequest } from '../protocol/control-channel.ts';
import { registerClientCommands } from './client/register.ts';

function fail(err: unknown): never {
  const message = err instanceof ZebuError ? `${err.message} (${err.code})` : err instanceof Error ? err.message : String(err);
  process.stderr.write(`zebu: ${message}\n`);
  process.exit(1);
}

const program = new Command();
program.name('zebu').description('Zebu: replicated block storage served over NBD').showHelpAfterError();

const replica = program.command('replica').description('replica processes (data plane, no manager needed)');
replica
  .command('serve')
  .description('serve one replica directory over the data protocol')
  .requiredOption('--dir <DIR>', 'replica directory (created when empty)')
  .requiredOption('--size <BYTES>', 'volume size, e.g. 1073741824 or 1GiB (multiple of 4096)')
  .requiredOption('--listen <HOST:PORT>', 'address to listen on (port 0: any free port)')
  .requiredOption('--secret-file <FILE>', 'file holding the cluster secret (at least 16 bytes)')
  .option('--name <NAME>', 'the replica\'s name, reported to engines (an engine given NAME=HOST:PORT refuses another replica at that address)')
  .option('--backing <FILE>', 'raw image used as the read-only base layer (new replicas only)')
  .option('--max-layers <N>', 'maximum number of layers (new replicas only)', undefined)
  .option('--fault-injection', 'accept FAULT_INJECT requests (tests only)')
  .addOption(new Option('--disk-mode <MODE>', 'normal, or power-loss: simulated power failures via FAULT_INJECT (tests only)').hideHelp())
  .addOption(new Option('--no-intent-log', 'no write-intent log: benchmark baseline only').hideHelp())
  .action((opts) => replicaServe(opts).catch(fail));

const collect = (value: string, previous: string[] = []): string[] => [...previous, value];

const engine = program.command('engine').description('a volume engine (data plane, no manager needed)');
engine
  .command('serve')
  .description('run the engine of one volume over its replicas')
  .requiredOption('--name <NAME>', 'volume name')
  .requiredOption('--size <BYTES>', 'volume size')
  .requiredOption('--replica <[KEY=]HOST:PORT>', 'a replica (repeat for each); KEY names its missed-write maps (default: the address)', collect)
  .requiredOption('--socket <PATH>', 'UNIX socket for the frontend')
  .requiredOption('--control-socket <PATH>', 'UNIX socket of the control interface')
  .requiredOption('--secret-file <FILE>', 'cluster secret file')
  .requiredOption('--epoch <N>', 'this attachment\'s epoch (replicas fence lower ones)')
  .option('--request-timeout-ms <MS>', 'replica request timeout (default 8000)')
  .option('--max-active-regions <N>', 'bound on the 4 MiB regions written since their confirming flush (default 256)')
  .option('--replica-wait-ms <MS>', 'how long start-up waits for replicas not reachable yet (default 30000)')
  .option('--lease-recall-timeout-ms <MS>', 'how long a rebuild copy may keep a region lease a client write recalled before it is revoked; 0: wait for ever (default 4000)')
  .option('--max-region-retries <N>', 'revokes one region of a rebuild may take before the rebuild fails (default 5)')
  .option('--copy-chunk-bytes <BYTES>', 'what a rebuild copies at a time under a region lease: a multiple of 4KiB up to 4MiB (default 256KiB)')
  .option('--no-copy-pull', 'a rebuild copies through the engine (by default its target pulls each chunk from a source replica itself)')
  .option('--no-copier-process', 'a rebuild runs its copy loop in the engine (by default in a copier process of its own)')
  .option('--snapshot-copy-flush-ms <MS>', 'while a rebuild copies snapshots, how often at most its target is flushed, so that a stopped copy goes on over what it holds (default 1000)')
  .option('--rebuild-max-mib-per-second <N>', 'what a rebuild may write to its target per second, in MiB; 0: no limit (default 0)')
  .option('--replica-out <KEY>', 'a replica known to be out: start-up does not wait for it (repeat)', collect)
  .action((opts) => engineServe(opts).catch(fail));

const printJson = (value: unknown): void => {
  process.stdout.write(JSON.stringify(value, null, 2) + '\n');
};
engine
  .command('replicas')
  .description('replicas of a running volume and their modes')
  .requiredOption('--control <SOCKET>', 'the volume\'s control socket')
  .option('--json', 'print JSON')
  .action(async (opts) => {
    const list = (await controlRequest(opts.control, 'GET', '/v1/replicas').catch(fail)) as { address: string; mode: string; reason: string | null }[];
    if (opts.json) return printJson(list);
    for (const r of list) process.stdout.write(`${r.address.padEnd(24)} ${r.mode.padEnd(4)} ${r.reason ?? ''}\n`);
  });
engine
  .command('stats')
  .description('I/O counters of a running volume')
  .requiredOption('--control <SOCKET>', 'the volume\'s control socket')
  .option('--json', 'print JSON')
  .action(async (opts) => printJson(await controlRequest(opts.control, 'GET', '/v1/stats').catch(fail)));
const engineSnapshot = engine.command('snapshot').description('snapshots of a running volume');
engineSnapshot
  .command('create <NAME>')
  .requiredOption('--control <SOCKET>', 'the volume\'s control socket')
  .action(async (name, opts) => printJson(await controlRequest(opts.control, 'POST', '/v1/snapshots', { name }).catch(fail)));
engineSnapshot
  .command('list')
  .requiredOption('--control <SOCKET>', 'the volume\'s control socket')
  .option('--json', 'print JSON')
  .action(async (opts) => {
    const list = (await controlRequest(opts.control, 'GET', '/v1/snapshots').catch(fail)) as { name: string; createdAt: string; sizeBytesUsed: number }[];
    if (opts.json) return printJson(list);
    for (const s of list) process.stdout.write(`${s.name.padEnd(32)} ${s.createdAt} ${s.sizeBytesUsed}\n`);
  });
engineSnapshot
  .command('delete <NAME>')
  .requiredOption('--control <SOCKET>', 'the volume\'s control socket')
  .action(async (name, opts) => printJson(await controlRequest(opts.control, 'DELETE', `/v1/snapshots/${encodeURIComponent(name)}`).catch(fail)));

const frontend = program.command('frontend').description('an NBD frontend (data plane)');
frontend
  .command('serve')
  .description('serve volumes over NBD by export name, each forwarding to its engine')
  .requiredOption('--secret-file <FILE>', 'cluster secret file')
  .option('--nbd <HOST:PORT>', 'NBD over TCP (port 0: any free port)')
  .option('--nbd-socket <PATH>', 'NBD over a UNIX socket')
  .option('--nbd-fd <N>', 'NBD over an inherited, bound TCP socket (its keeper restarts the frontend on it)')
  .option('--nbd-socket-fd <N>', 'with --nbd-socket: the inherited socket bound at that path')
  .option('--control-socket <PATH>', 'UNIX socket of the control interface (add/remove exports at run time)')
  .option('--hold-timeout-ms <MS>', 'requests held with no engine fail with EIO after this long (default 300000)')
  .option('--hang-timeout-ms <MS>', 'an engine that does not answer a heartbeat this long is killed and replaced (default 10000)')
  .option('--stall-timeout-ms <MS>', 'an engine that leaves a request unanswered this long is killed and replaced (default 60000)')
  .option('--name <NAME>', 'a static export: volume (export) name, with --engine-socket')
  .option('--engine-socket <PATH>', 'a static export: the engine\'s UNIX socket, with --name')
  .option('--state-file <FILE>', 'keep the export table here; a restarted frontend serves the same exports at once')
  .action((opts) => frontendServe(opts).catch(fail));

const volume = program.command('volume').description('volumes');
volume
  .command('serve')
  .description('run one volume (engine + NBD frontend) over replicas that are already running')
  .requiredOption('--name <NAME>', 'volume name (the NBD export name)')
  .requiredOption('--size <BYTES>', 'volume size')
  .requiredOption('--replica <HOST:PORT>', 'a replica (repeat for each)', collect)
  .option('--nbd <HOST:PORT>', 'NBD over TCP')
  .option('--nbd-socket <PATH>', 'NBD over a UNIX socket')
  .requiredOption('--secret-file <FILE>', 'cluster secret file')
  .requiredOption('--epoch <N>', 'the first engine\'s epoch (each restarted engine gets the next one)')
  .option('--run-dir <DIR>', 'directory for the internal sockets')
  .option('--request-timeout-ms <MS>', 'replica request timeout (default 8000)')
  .option('--max-active-regions <N>', 'bound on the 4 MiB regions written since their confirming flush (default 256)')
  .option('--replica-wait-ms <MS>', 'how long an engine start waits for replicas not reachable yet (default 30000)')
  .option('--lease-recall-timeout-ms <MS>', 'how long a rebuild copy may keep a region lease a client write recalled before it is revoked; 0: wait for ever (default 4000)')
  .option('--max-region-retries <N>', 'revokes one region of a rebuild may take before the rebuild fails (default 5)')
  .option('--copy-chunk-bytes <BYTES>', 'what a rebuild copies at a time under a region lease: a multiple of 4KiB up to 4MiB (default 256KiB)')
  .option('--no-copy-pull', 'a rebuild copies through the engine (by default its target pulls each chunk from a source replica itself)')
  .option('--no-copier-process', 'a rebuild runs its copy loop in the engine (by default in a copier process of its own)')
  .option('--rebuild-max-mib-per-second <N>', 'what a rebuild may write to its target per second, in MiB; 0: no limit (default 0)')
  .option('--hold-timeout-ms <MS>', 'client requests held with no engine fail after this long (default 300000)')
  .option('--hang-timeout-ms <MS>', 'an engine that does not answer a heartbeat this long is killed and replaced (default 10000)')
  .option('--stall-timeout-ms <MS>', 'an engine that leaves a request unanswered this long is killed and replaced (default 60000)')
  .action((opts) => volumeServe(opts).catch(fail));

program
  .command('up')
  .description('run Zebu on this machine: node agent, and (while this node leads) manager and REST API; over the embedded store, or etcd shared by every node')
  .option('--data-dir <DIR>', 'where Zebu keeps its state, disks and logs', 'zebu-data')
  .option('--api <HOST:PORT>', 'REST API address', '127.0.0.1:9500')
  .option('--nbd <HOST:PORT>', 'NBD address shared by all attached volumes', '127.0.0.1:10809')
  .option('--disks <N>', 'disks to create as directories under the data dir', '3')
  .option('--node <NAME>', 'this node\'s name (default: the host name)')
  .option('--address <HOST>', 'address replicas listen on', '127.0.0.1')
  .option('--store <URL>', 'etcd://HOST:PORT[,HOST:PORT...] (etcds:// for TLS): the cluster store every node shares (default: an embedded store in the data dir; credentials from ZEBU_ETCD_USERNAME and ZEBU_ETCD_PASSWORD)')
  .option('--agent-port <PORT>', 'with --store: where the leader on another node reaches this node\'s agent, on --address (default 9502; 0: any)')
  .option('--store-prefix <PREFIX>', 'key prefix of this cluster in etcd (default zebu/)')
  .option('--store-ca <FILE>', 'etcds://: the CA certificate (PEM) of the etcd members')
  .option('--store-cert <FILE>', 'etcds://: a client certificate (PEM), when etcd asks for one')
  .option('--store-key <FILE>', 'etcds://: the client certificate\'s key (PEM)')
  // Loaded on demand: data-path processes (replica, engine, frontend) need none of it.
  .action(async (opts) => (await import('./up.ts')).up(opts).catch(fail));

// Client commands (volume create|list|…, snapshot, replica list, node, disk, setting, events): REST API of `zebu up`.
registerClientCommands(program);

program.parseAsync(process.argv).catch(fail);
