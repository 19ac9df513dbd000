/**
 * A real etcd (Debian's etcd-server) for tests: one member on ports of its own (on loopback, or
 * on the address a multi-node test gives), its data in a directory of the test, killed when the
 * test ends.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import net from 'node:net';
import path from 'node:path';
import { freePort } from './volume-cluster.ts';

export interface EtcdServer {
  /** Its client URL, http://HOST:PORT. */
  endpoint: string;
  /** Its ports: start it again on the same ones (and the same directory) to restart it. */
  ports: { client: number; peer: number };
  child: ChildProcess;
  /** What it printed (its log), for a failure's message. */
  output(): string;
}

const START_TIMEOUT_MS = 30_000;

/** Client TLS for a member: its certificate and key (PEM files), and the CA its clients' certificates must be signed by. */
export interface EtcdTls {
  certFile: string;
  keyFile: string;
  caFile: string;
}

export async function startEtcd(t: { after: (fn: () => unknown) => void }, dir: string, name = 'etcd-test', ports?: { client: number; peer: number }, host = '127.0.0.1', tls?: EtcdTls): Promise<EtcdServer> {
  const member = { name, host, client: ports?.client ?? await freePort(), peer: ports?.peer ?? await freePort(), tls };
  const started = spawnMember(t, dir, member, `${name}=${peerUrl(member)}`);
  await started.healthy();
  return started.server;
}

export interface EtcdCluster {
  members: EtcdServer[];
  /** The client URLs of every member. */
  endpoints: string[];
  /** SIGKILLs member `i` and waits until it is gone. */
  kill(i: number): Promise<void>;
  /** Starts the stopped members again (same names, ports and data), and waits until each is healthy. */
  restart(which: number[]): Promise<void>;
}

/**
 * A cluster of `size` etcd members, each with its own ports and data under `dir`: on loopback, or
 * member i on `hosts[i]` (its address, inside its network namespace: a member on each node of a
 * multi-node test, cut off with it).
 */
export async function startEtcdCluster(t: { after: (fn: () => unknown) => void }, dir: string, size = 3, hosts?: { address: string; netns: string }[]): Promise<EtcdCluster> {
  const specs: MemberSpec[] = [];
  for (let i = 0; i < size; i++) {
    const host = hosts?.[i];
    // A member alone in its namespace has every port to itself.
    specs.push(host === undefined
      ? { name: `member-${i + 1}`, host: '127.0.0.1', client: await freePort(), peer: await freePort() }
      : { name: `member-${i + 1}`, host: host.address, client: 2379, peer: 2380, netns: host.netns });
  }
  const initial = specs.map((m) => `${m.name}=${peerUrl(m)}`).join(',');
  const start = async (which: number[]): Promise<void> => {
    // All first: a member is healthy only once a quorum elected a leader.
    const started = which.map((i) => ({ i, started: spawnMember(t, dir, specs[i], initial) }));
    for (const { i, started: s } of started) {
      await s.healthy();
      cluster.members[i] = s.server;
    }
  };
  const cluster: EtcdCluster = {
    members: [],
    endpoints: specs.map((m) => `http://${m.host}:${m.client}`),
    kill: async (i) => {
      const child = cluster.members[i].child;
      if (child.exitCode === null && child.signalCode === null) {
        const gone = new Promise((resolve) => child.once('exit', resolve));
        child.kill('SIGKILL');
        await gone;
      }
    },
    restart: start,
  };
  await start(specs.map((_, i) => i));
  return cluster;
}

interface MemberSpec {
  name: string;
  host: string;
  client: number;
  peer: number;
  netns?: string;
  /** Clients speak TLS and must show a certificate signed by the CA. */
  tls?: EtcdTls;
}

function peerUrl(m: MemberSpec): string {
  return `http://${m.host}:${m.peer}`;
}

function spawnMember(t: { after: (fn: () => unknown) => void }, dir: string, m: MemberSpec, initialCluster: string): { server: EtcdServer; healthy: () => Promise<void> } {
  const endpoint = `${m.tls === undefined ? 'http' : 'https'}://${m.host}:${m.client}`;
  const peer = peerUrl(m);
  const args = [
    '--name', m.name, '--data-dir', path.join(dir, `${m.name}.etcd`),
    '--listen-client-urls', endpoint, '--advertise-client-urls', endpoint,
    '--listen-peer-urls', peer, '--initial-advertise-peer-urls', peer,
    '--initial-cluster', initialCluster, '--initial-cluster-state', 'new',
    ...(m.tls === undefined ? [] : ['--cert-file', m.tls.certFile, '--key-file', m.tls.keyFile, '--trusted-ca-file', m.tls.caFile, '--client-cert-auth']),
  ];
  // `ip netns exec` execs etcd in place: the child's pid is etcd's own (a SIGKILL reaches it).
  const child = m.netns === undefined
    ? spawn('etcd', args, { stdio: ['ignore', 'pipe', 'pipe'] })
    : spawn('ip', ['netns', 'exec', m.netns, 'etcd', ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  t.after(() => child.kill('SIGKILL'));
  let log = '';
  const keep = (d: Buffer): void => {
    log = (log + d.toString()).slice(-20_000);
  };
  child.stdout!.on('data', keep);
  child.stderr!.on('data', keep);
  const exited = new Promise<never>((_, reject) => child.once('exit', (code, signal) => reject(new Error(`etcd ${m.name} exited (${code ?? signal}) before it served: ${log.slice(-2000)}`))));
  exited.catch(() => {});
  const healthy = async (): Promise<void> => {
    const deadline = Date.now() + START_TIMEOUT_MS;
    for (;;) {
      const ok = await Promise.race([m.tls === undefined
        ? fetch(`${endpoint}/health`, { signal: AbortSignal.timeout(2000) }).then(async (r) => r.ok && ((await r.json()) as { health?: string }).health === 'true', () => false)
        : listening(m.host, m.client), exited]);
      if (ok) return;
      if (Date.now() > deadline) throw new Error(`etcd ${m.name} not healthy after ${START_TIMEOUT_MS} ms: ${log.slice(-2000)}`);
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
  };
  return { server: { endpoint, ports: { client: m.client, peer: m.peer }, child, output: () => log }, healthy };
}

/** Whether a TCP port accepts connections (a TLS member's health needs a client certificate to ask). */
function listening(host: string, port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = net.connect({ host, port });
    socket.setTimeout(2000);
    socket.once('connect', () => {
      socket.destroy();
      resolve(true);
    });
    socket.once('error', () => resolve(false));
    socket.once('timeout', () => {
      socket.destroy();
      resolve(false);
    });
  });
}
