/**
 * `zebu up`: Zebu on a machine. The node agent runs in this process, and the manager (controllers
 * + REST API) while this node leads (leader-election.ts): over the embedded store (node:sqlite) on
 * one machine, where it always leads, or over etcd (`--store etcd://...`) shared by several
 * nodes, where one leads and the others take over when it goes. The agent runs the data-path
 * processes (replicas, engines, the NBD frontend) as separate processes that outlive this one: if
 * `zebu up` dies, attached volumes keep serving, and the next `zebu up` on the same data directory
 * re-adopts them. SIGINT/SIGTERM stop everything cleanly (the volumes stay attached in the
 * store and come back at the next start).
 *
 * Data directory:
 *   token            API bearer token (0600)      secret     data-protocol secret (0600)
 *   token-readonly   API token that may only look (GET; the web UI's read-only sign-in) (0600)
 *   store.db         the embedded store           disks/     disk-0 .. disk-N-1
 *   procs/ logs/     process records and logs     run/       UNIX sockets
 * With etcd, the tokens and the secret are the cluster's, kept in the store (the first node makes
 * them) and copied into these files for the CLI and the data-path processes.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import pino from 'pino';
import { ZebuError, ErrorCode } from '../errors.ts';
import { openStore, type StoreChoice } from '../store/open-store.ts';
import type { Store } from '../store/store.ts';
import { Kind, Objects } from '../cluster/objects.ts';
import { GuardedStore } from '../store/guarded-store.ts';
import { Manager } from '../manager/manager.ts';
import { LeaderElection, LEADER_NAME } from '../manager/leader-election.ts';
import { ApiForwarder } from '../api/forwarder.ts';
import { Agent } from '../agent/agent.ts';
import { AgentServer } from '../agent/agent-server.ts';
import { RemoteEngines } from '../agent/remote-engines.ts';
import { procStat } from '../os/process-identity.ts';
import { buildApiServer } from '../api/server.ts';
import { parseHostPort, parsePositiveInt } from './units.ts';
import { holePunchUnavailable } from '../replica/native-file-ops.ts';
import { memoryReleaseUnavailable } from '../os/memory-release.ts';
import { dataPathMain, DATA_PATH_NODE_FLAGS } from '../os/js-build.ts';

export interface UpArgs {
  dataDir: string;
  api: string;
  nbd: string;
  disks: string;
  node?: string;
  address?: string;
  store?: string;
  agentPort?: string;
  storePrefix?: string;
  storeCa?: string;
  storeCert?: string;
  storeKey?: string;
}

/** The Secret holding the cluster's API token and data-protocol secret (etcd only). */
const CLUSTER_SECRET = 'cluster';

/** Where other nodes reach this node's agent, on a shared store (--agent-port). */
const DEFAULT_AGENT_PORT = 9502;

function parsePort(text: string): number {
  if (!/^\d{1,5}$/.test(text) || Number(text) > 65535) throw new ZebuError(ErrorCode.EINVAL, `--agent-port must be a port number (0: any), got ${JSON.stringify(text)}`);
  return Number(text);
}

/** Room left in a UNIX socket path (107 bytes) for "engines/<63-char volume>.sock". */
const RUN_DIR_MAX_BYTES = 107 - '/engines/'.length - 63 - '.sock'.length;

/** A file holding a random secret, created (0600) on first start. */
function ensureSecretFile(file: string, bytes: number): void {
  if (fs.existsSync(file)) {
    const mode = fs.statSync(file).mode & 0o777;
    if ((mode & 0o077) !== 0) fs.chmodSync(file, 0o600);
    return;
  }
  const tmp = `${file}.tmp`;
  fs.writeFileSync(tmp, crypto.randomBytes(bytes).toString('hex') + '\n', { mode: 0o600 });
  fs.renameSync(tmp, file);
}

/** Writes `text` to a 0600 file unless it holds it already. */
function writeSecretFile(file: string, text: string): void {
  try {
    if (fs.readFileSync(file, 'utf8').trim() === text) return;
  } catch {
    // not there yet
  }
  const tmp = `${file}.tmp`;
  fs.writeFileSync(tmp, text + '\n', { mode: 0o600 });
  fs.renameSync(tmp, file);
}

/**
 * A shared store: the cluster's token and secret come from it; the first node to start puts its
 * own (or new ones) there. The local files then hold the cluster's.
 */
async function clusterSecrets(store: Store, tokenFile: string, secretFile: string, readOnlyTokenFile: string, log: pino.Logger): Promise<void> {
  const objects = new Objects(store);
  let held = await objects.get(Kind.Secret, CLUSTER_SECRET);
  if (held === null) {
    ensureSecretFile(tokenFile, 32);
    ensureSecretFile(secretFile, 32);
    ensureSecretFile(readOnlyTokenFile, 32);
    const data = {
      apiToken: fs.readFileSync(tokenFile, 'utf8').trim(), dataSecret: fs.readFileSync(secretFile, 'utf8').trim(),
      readOnlyToken: fs.readFileSync(readOnlyTokenFile, 'utf8').trim(),
    };
    try {
      held = await objects.create(Kind.Secret, CLUSTER_SECRET, { data });
    } catch (err) {
      if ((err as ZebuError).code !== ErrorCode.EXISTS) throw err;
      held = await objects.get(Kind.Secret, CLUSTER_SECRET);
    }
  }
  const apiToken = held?.value.data.apiToken;
  const dataSecret = held?.value.data.dataSecret;
  if (typeof apiToken !== 'string' || typeof dataSecret !== 'string') throw new ZebuError(ErrorCode.EIO, `the store's Secret ${CLUSTER_SECRET} lacks the API token or the data secret`);
  // A cluster made before read-only tokens existed gets one now (the first node to start adds it).
  if (typeof held!.value.data.readOnlyToken !== 'string') {
    const made = crypto.randomBytes(32).toString('hex');
    held = await objects.mutate(Kind.Secret, CLUSTER_SECRET, (x) => {
      if (typeof x.data.readOnlyToken === 'string') return false;
      x.data.readOnlyToken = made;
    }) ?? held;
  }
  const readOnlyToken = held!.value.data.readOnlyToken;
  if (typeof readOnlyToken === 'string') writeSecretFile(readOnlyTokenFile, readOnlyToken);
  const before = fs.existsSync(secretFile) ? fs.readFileSync(secretFile, 'utf8').trim() : null;
  if (before !== null && before !== dataSecret) log.warn('this node had another data-protocol secret than the cluster: it takes the cluster\'s (processes it runs from before cannot be reached with it)');
  writeSecretFile(tokenFile, apiToken);
  writeSecretFile(secretFile, dataSecret);
}

/** One `zebu up` per data directory: a lock file naming the running one. */
function takeLock(dataDir: string): string {
  const lockFile = path.join(dataDir, 'zebu-up.pid');
  try {
    const held = JSON.parse(fs.readFileSync(lockFile, 'utf8')) as { pid: number; startTime: string };
    const stat = procStat(held.pid);
    if (stat !== null && stat.startTime === held.startTime && held.pid !== process.pid) {
      throw new ZebuError(ErrorCode.BUSY, `another zebu up (pid ${held.pid}) is running on ${dataDir}`);
    }
  } catch (err) {
    if (err instanceof ZebuError) throw err;
  }
  fs.writeFileSync(lockFile, JSON.stringify({ pid: process.pid, startTime: procStat(process.pid)?.startTime ?? '' }));
  return lockFile;
}

function runDirFor(dataDir: string): string {
  const preferred = path.join(dataDir, 'run');
  if (Buffer.byteLength(preferred) <= RUN_DIR_MAX_BYTES) return preferred;
  const hash = crypto.createHash('sha256').update(dataDir).digest('hex').slice(0, 12);
  return path.join(os.tmpdir(), `zebu-run-${hash}`);
}

function defaultNodeName(): string {
  const name = os.hostname().toLowerCase().replace(/[^a-z0-9._-]/g, '-').replace(/^[^a-z0-9]+/, '');
  return name.slice(0, 63) || 'node-1';
}

export async function up(args: UpArgs): Promise<void> {
  const log = pino({ name: 'zebu-up', base: { pid: process.pid } }, pino.destination(2));
  const dataDir = path.resolve(args.dataDir);
  const apiAddress = parseHostPort(args.api);
  const nbdAddress = parseHostPort(args.nbd);
  const diskCount = parsePositiveInt(args.disks, '--disks');
  if (diskCount < 1 || diskCount > 64) throw new ZebuError(ErrorCode.EINVAL, `--disks must be between 1 and 64, got ${diskCount}`);
  const nodeId = args.node ?? defaultNodeName();
  if (!/^[a-z0-9][a-z0-9._-]{0,62}$/.test(nodeId)) throw new ZebuError(ErrorCode.EINVAL, `node name ${JSON.stringify(nodeId)} must be 1-63 of [a-z0-9._-]`);

  if (args.agentPort !== undefined && (args.store === undefined || args.store === '')) throw new ZebuError(ErrorCode.EINVAL, '--agent-port is for a cluster store (--store etcd://...)');
  const storeChoice: StoreChoice = { spec: args.store, prefix: args.storePrefix, caFile: args.storeCa, certFile: args.storeCert, keyFile: args.storeKey };

  fs.mkdirSync(dataDir, { recursive: true, mode: 0o700 });
  const lockFile = takeLock(dataDir);
  const tokenFile = path.join(dataDir, 'token');
  const secretFile = path.join(dataDir, 'secret');
  const readOnlyTokenFile = path.join(dataDir, 'token-readonly');
  let opened;
  try {
    opened = await openStore(storeChoice, dataDir, (message) => log.warn(message));
    if (opened.shared) await clusterSecrets(opened.store, tokenFile, secretFile, readOnlyTokenFile, log);
  } catch (err) {
    await opened?.store.close().catch(() => {});
    fs.rmSync(lockFile, { force: true });
    throw err;
  }
  const store = opened.store;
  ensureSecretFile(tokenFile, 32);
  ensureSecretFile(secretFile, 32);
  ensureSecretFile(readOnlyTokenFile, 32);
  const token = fs.readFileSync(tokenFile, 'utf8').trim();
  const readOnlyToken = fs.readFileSync(readOnlyTokenFile, 'utf8').trim();
  const runDir = runDirFor(dataDir);
  fs.mkdirSync(runDir, { recursive: true, mode: 0o700 });
  const disks = Array.from({ length: diskCount }, (_, i) => path.join(dataDir, 'disks', `disk-${i}`));

  // On a shared store, the leader on another node reaches this node's engines through its agent.
  const address = args.address ?? '127.0.0.1';
  let agentServer: AgentServer | null = null;
  let agentEndpoint: string | null = null;
  let agentRef: Agent | null = null;
  if (opened.shared) {
    const port = args.agentPort !== undefined ? parsePort(args.agentPort) : DEFAULT_AGENT_PORT;
    agentServer = new AgentServer({
      nodeId, token,
      engineRequest: (volume, method, pathName, body) => agentRef === null
        ? Promise.reject(new ZebuError(ErrorCode.BUSY, `the agent of node ${nodeId} is starting`))
        : agentRef.engineRequest(volume, method, pathName, body),
      engineDataSocket: (volume) => {
        if (agentRef === null) throw new ZebuError(ErrorCode.BUSY, `the agent of node ${nodeId} is starting`);
        return agentRef.engineDataSocket(volume);
      },
    });
    try {
      const bound = await agentServer.listen(address, port);
      agentEndpoint = `${address.includes(':') ? `[${address}]` : address}:${bound}`;
    } catch (err) {
      await store.close();
      fs.rmSync(lockFile, { force: true });
      throw new ZebuError(ErrorCode.EINVAL, `cannot listen on ${address}:${port} for the agent: ${(err as Error).message}`);
    }
  }

  const { main, compiledUnavailable } = dataPathMain();
  if (compiledUnavailable !== null) log.info({ reason: compiledUnavailable }, 'data-path processes run from the TypeScript sources (about 10 MiB more memory each)');
  const agent = new Agent({
    store,
    nodeId,
    address,
    agentEndpoint,
    nbdHost: nbdAddress.host,
    nbdPort: nbdAddress.port,
    disks,
    stateDir: dataDir,
    runDir,
    secretFile,
    main,
    nodeFlags: [...DATA_PATH_NODE_FLAGS],
    // Tests only: e.g. "--disk-mode power-loss", to simulate a power loss of the whole machine.
    replicaArgs: (process.env.ZEBU_TEST_REPLICA_ARGS ?? '').split(' ').filter((a) => a !== ''),
    log: (event) => log.info(event, String(event.event)),
  });
  agentRef = agent;
  const objects = new Objects(store);
  // Volumes attached on other nodes: their engines through those nodes' agents.
  const remote = new RemoteEngines(objects, token, secretFile);
  // The manager and the API run while this node leads: a new pair each term.
  let term: { manager: Manager; api: Awaited<ReturnType<typeof buildApiServer>>; started: boolean } | null = null;
  let agentStarted = false;
  const shownHost = apiAddress.host.includes(':') ? `[${apiAddress.host}]` : apiAddress.host;
  let apiUrl: string | null = null;
  /** How other nodes reach an API bound to every address: at this node's --address. */
  const advertised = (port: number): string => {
    const host = apiAddress.host === '0.0.0.0' || apiAddress.host === '::' ? address : apiAddress.host;
    return `http://${host.includes(':') ? `[${host}]` : host}:${port}`;
  };
  // On a shared store, a node that does not lead passes API requests on to the leader's API.
  let forwarder: ApiForwarder | null = null;
  const startForwarder = async (): Promise<void> => {
    const f = new ApiForwarder({
      nodeId,
      leaderApi: async () => {
        const leader = await objects.get(Kind.Leader, LEADER_NAME);
        return leader === null || leader.value.nodeId === nodeId ? null : leader.value.api ?? null;
      },
    });
    try {
      const port = await f.listen(apiAddress.host, apiAddress.port);
      apiUrl = `http://${shownHost}:${port}`;
    } catch (err) {
      throw new ZebuError(ErrorCode.EINVAL, `cannot listen on ${args.api} for the API: ${(err as Error).message}`);
    }
    forwarder = f;
  };
  const stopForwarder = async (): Promise<void> => {
    const f = forwarder;
    forwarder = null;
    await f?.close();
  };
  const beginTerm = async (): Promise<void> => {
    await stopForwarder();
    const manager = new Manager({
      // Every write of this term checks that the term still stands (its Leader object): a write
      // that reaches the store after another node took over is refused, not applied.
      store: new GuardedStore(store, election.guard),
      defaultNodeId: nodeId,
      agents: {
        engineRequest: (node, volume, method, pathName, body) =>
          node === agent.nodeId ? agent.engineRequest(volume, method, pathName, body) : remote.request(node, volume, method, pathName, body),
      },
      engineData: {
        openEngineData: (node, volume) => (node === agent.nodeId ? agent.openEngineData(volume) : remote.openData(node, volume)),
        openReplicaData: (address, epoch) => agent.openReplicaData(address, epoch),
      },
      log: (event) => log.info(event, String(event.event)),
    });
    const api = await buildApiServer({ service: manager.service, backups: manager.backups, recurringJobs: manager.recurringJobs, backingImages: manager.backingImages, token, readOnlyToken });
    try {
      await api.listen({ host: apiAddress.host, port: apiAddress.port });
    } catch (err) {
      await api.close().catch(() => {});
      throw new ZebuError(ErrorCode.EINVAL, `cannot listen on ${args.api} for the API: ${(err as Error).message}`);
    }
    const bound = api.server.address();
    const boundPort = typeof bound === 'object' && bound !== null ? bound.port : apiAddress.port;
    apiUrl = `http://${shownHost}:${boundPort}`;
    term = { manager, api, started: false };
    if (opened.shared) await election.announce(advertised(boundPort));
    await manager.events.record({ type: 'Normal', reason: 'LeaderElected', message: `node ${nodeId} runs the cluster's controllers and serves the API at ${apiUrl}`, kind: Kind.Node, object: nodeId, volume: null });
    if (agentStarted) {
      term.started = true;
      await manager.start();
      // A node that took over: say so where `zebu up` said it was ready.
      process.stdout.write(JSON.stringify({ leader: true, api: apiUrl, node: nodeId }) + '\n');
    }
  };
  const endTerm = async (): Promise<void> => {
    const ending = term;
    term = null;
    apiUrl = null;
    if (ending === null) return;
    await ending.api.close().catch(() => {});
    await ending.manager.stop();
    if (opened.shared && !stopping) await startForwarder().catch((err) => log.error({ err: (err as Error).message }, 'the API address cannot be served while this node does not lead'));
  };
  const election = new LeaderElection({
    store, nodeId, onElected: beginTerm, onDeposed: endTerm, log: (event) => log.info(event, String(event.event)),
  });

  let stopping = false;
  const stop = async (signal: string): Promise<void> => {
    if (stopping) return;
    stopping = true;
    log.info({ signal }, 'stopping: API, controllers, then the data path');
    try {
      await election.stop();
      await stopForwarder();
      await agentServer?.close();
      await agent.stop({ stopProcesses: true });
      await store.close();
    } catch (err) {
      log.error({ err: (err as Error).message }, 'unclean stop');
    }
    fs.rmSync(lockFile, { force: true });
    log.info('stopped');
    log.flush();
    process.exit(0);
  };
  process.on('SIGTERM', () => void stop('SIGTERM'));
  process.on('SIGINT', () => void stop('SIGINT'));

  // Leading (always, on the embedded store), the API address first: a taken port must fail
  // before any process is started or adopted.
  if (opened.shared) {
    // Any node's API address answers (passed on to the leader) until this node leads itself.
    try {
      await startForwarder();
    } catch (err) {
      await agentServer?.close();
      await store.close();
      fs.rmSync(lockFile, { force: true });
      throw err;
    }
  }
  const leading = await election.start();
  if (!leading && !opened.shared) {
    await election.stop();
    await agentServer?.close();
    await store.close();
    fs.rmSync(lockFile, { force: true });
    throw election.lastStartError ?? new ZebuError(ErrorCode.BUSY, 'this node could not take the lead of its own store');
  }
  await agent.start();
  agentStarted = true;
  const current = term as { manager: Manager; started: boolean } | null;
  if (current !== null && !current.started) {
    current.started = true;
    await current.manager.start();
  }
  try {
    await agent.frontendReady(30_000);
  } catch (err) {
    // Without its NBD listener the node serves nothing: stop what was started, leave nothing behind.
    log.error({ err: (err as Error).message }, 'the NBD frontend does not start: stopping');
    await election.stop();
    await agentServer?.close();
    await agent.stop({ stopProcesses: true });
    await store.close();
    fs.rmSync(lockFile, { force: true });
    throw err;
  }
  const nativeMissing = holePunchUnavailable();
  if (nativeMissing !== null) {
    log.warn({ reason: nativeMissing }, 'TRIM and WRITE_ZEROES will not give disk space back, and replica reads all take the thread pool: the native addon is missing (run scripts/build-native.sh, which needs gcc)');
  }
  const memoryAddonMissing = memoryReleaseUnavailable();
  if (memoryAddonMissing !== null) {
    log.warn({ reason: memoryAddonMissing }, 'data-path processes will give back only the large buffers a load made them take, not malloc\'s freed small chunks: the native memory addon is missing (run scripts/build-native.sh, which needs gcc)');
  }
  process.stdout.write(
    JSON.stringify({
      ready: true,
      api: apiUrl,
      leader: election.isLeader,
      store: opened.describe,
      tokenFile,
      readOnlyTokenFile,
      dataDir,
      node: nodeId,
      nbd: agent.nbdAddress,
      pid: process.pid,
    }) + '\n',
  );
}
