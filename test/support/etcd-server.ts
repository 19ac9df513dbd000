/**
 * A real etcd (Debian's etcd-server) for tests: one member on ports of its own (on loopback, or
 * on the address a multi-node test gives), its data in a directory of the test, killed when the
 * test ends.
 */
import { spawn, type ChildProcess } from 'node:child_process';
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

export async function startEtcd(t: { after: (fn: () => unknown) => void }, dir: string, name = 'etcd-test', ports?: { client: number; peer: number }, host = '127.0.0.1'): Promise<EtcdServer> {
  const clientPort = ports?.client ?? await freePort();
  const peerPort = ports?.peer ?? await freePort();
  const endpoint = `http://${host}:${clientPort}`;
  const peer = `http://${host}:${peerPort}`;
  const child = spawn('etcd', [
    '--name', name, '--data-dir', path.join(dir, `${name}.etcd`),
    '--listen-client-urls', endpoint, '--advertise-client-urls', endpoint,
    '--listen-peer-urls', peer, '--initial-advertise-peer-urls', peer,
    '--initial-cluster', `${name}=${peer}`, '--initial-cluster-state', 'new',
  ], { stdio: ['ignore', 'pipe', 'pipe'] });
  t.after(() => child.kill('SIGKILL'));
  let log = '';
  const keep = (d: Buffer): void => {
    log = (log + d.toString()).slice(-20_000);
  };
  child.stdout!.on('data', keep);
  child.stderr!.on('data', keep);
  const exited = new Promise<never>((_, reject) => child.once('exit', (code, signal) => reject(new Error(`etcd exited (${code ?? signal}) before it served: ${log.slice(-2000)}`))));
  exited.catch(() => {});
  const deadline = Date.now() + START_TIMEOUT_MS;
  for (;;) {
    const healthy = await Promise.race([
      fetch(`${endpoint}/health`).then(async (r) => r.ok && ((await r.json()) as { health?: string }).health === 'true', () => false),
      exited,
    ]);
    if (healthy) break;
    if (Date.now() > deadline) throw new Error(`etcd not healthy after ${START_TIMEOUT_MS} ms: ${log.slice(-2000)}`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  return { endpoint, ports: { client: clientPort, peer: peerPort }, child, output: () => log };
}
