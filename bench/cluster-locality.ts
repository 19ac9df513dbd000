/**
 * Replicas on other nodes against replicas on the attach node (issue: a real cluster). Three
 * nodes, each a network namespace with its own address on a bridge, each running `zebu up
 * --store etcd://` against one etcd; two volumes of 2 replicas attached on node-1: "local" with
 * both replicas on node-1, "remote" with them on node-2 and node-3. fio's nbd engine runs on
 * node-1 (where a workload would) against each, in one run; the local volume is the baseline.
 * A veth between namespaces costs about what loopback does; BENCH_NET_DELAY_US adds a one-way
 * delay on every node's link (tc netem) to stand for a real network.
 * Needs root and iproute2. Run on demand: `npm run bench:locality`.
 *   BENCH_SECONDS (default 10), BENCH_SIZE_MIB (default 256), BENCH_NET_DELAY_US (default 0)
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { makeNetwork, netnsUnavailable } from '../test/support/netns.ts';
import { startEtcd } from '../test/support/etcd-server.ts';
import { startZebuUp, stopZebuUp, mustZebu, mustZebuJson, killAllUnder, type ZebuUp } from '../test/support/zebu-up.ts';

const SECONDS = Number(process.env.BENCH_SECONDS ?? 10);
const SIZE_MIB = Number(process.env.BENCH_SIZE_MIB ?? 256);
const DELAY_US = Number(process.env.BENCH_NET_DELAY_US ?? 0);
const PATTERNS = [
  { name: '4k randwrite QD16', rw: 'randwrite', bs: '4k', depth: 16, unit: 'IOPS' },
  { name: '4k randread QD16', rw: 'randread', bs: '4k', depth: 16, unit: 'IOPS' },
  { name: '1M seq write QD16', rw: 'write', bs: '1M', depth: 16, unit: 'MiB/s' },
  { name: '1M seq read QD16', rw: 'read', bs: '1M', depth: 16, unit: 'MiB/s' },
  { name: '4k randwrite QD1', rw: 'randwrite', bs: '4k', depth: 1, unit: 'p50 us' },
  { name: '4k randread QD1', rw: 'randread', bs: '4k', depth: 1, unit: 'p50 us' },
] as const;

/** Clean-ups, run at the end (the test helpers register theirs here). */
const cleanups: (() => unknown)[] = [];
const scope = { after: (fn: () => unknown) => cleanups.push(fn) };

interface Result { iops: number; mibps: number; p50us: number; p99us: number }

function fio(netns: string, uri: string, rw: string, bs: string, depth: number, seconds: number | null): Result {
  const args = ['netns', 'exec', netns, 'fio', '--name=bench', '--ioengine=nbd', `--uri=${uri}`, `--rw=${rw}`, `--bs=${bs}`, `--iodepth=${depth}`, `--size=${SIZE_MIB}M`, '--output-format=json'];
  if (seconds !== null) args.push('--time_based', `--runtime=${seconds}`);
  const r = spawnSync('ip', args, { maxBuffer: 16 * 1024 * 1024 });
  if (r.status !== 0) throw new Error(`fio failed: ${r.stderr}`);
  const out = r.stdout.toString();
  const job = JSON.parse(out.slice(out.indexOf('{'))).jobs[0];
  const side = rw.includes('write') ? job.write : job.read;
  const pct = side.clat_ns?.percentile ?? {};
  return { iops: side.iops, mibps: side.bw_bytes / 1024 / 1024, p50us: (pct['50.000000'] ?? 0) / 1000, p99us: (pct['99.000000'] ?? 0) / 1000 };
}

function value(r: Result, unit: string): number {
  return unit === 'IOPS' ? r.iops : unit === 'MiB/s' ? r.mibps : r.p50us;
}

async function main(): Promise<void> {
  const why = netnsUnavailable();
  if (why !== null) throw new Error(`bench:locality: ${why}`);
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'zl-'));
  // Run last to first: the nodes stop, what they left is killed, then etcd and the network go.
  cleanups.push(() => fs.rmSync(root, { recursive: true, force: true }));
  const network = makeNetwork(scope, 3);
  if (DELAY_US > 0) {
    for (const h of network.hosts) {
      const r = spawnSync('ip', ['netns', 'exec', h.netns, 'tc', 'qdisc', 'add', 'dev', 'eth0', 'root', 'netem', 'delay', `${DELAY_US}us`]);
      if (r.status !== 0) throw new Error(`tc netem: ${r.stderr}`);
    }
  }
  const etcdDir = path.join(root, 'etcd');
  fs.mkdirSync(etcdDir);
  const etcd = await startEtcd(scope, etcdDir, 'etcd-bench', undefined, network.hostAddress);
  const store = `etcd://${new URL(etcd.endpoint).host}`;
  const ups: ZebuUp[] = [];
  for (let i = 0; i < 3; i++) {
    const host = network.hosts[i];
    const up = await startZebuUp({ dataDir: path.join(root, `node-${i + 1}`, 'data'), store, node: `node-${i + 1}`, netns: host.netns, address: host.address, disks: 2, apiPort: 9500, nbdPort: 10809 });
    ups.push(up);
  }
  cleanups.push(() => killAllUnder(root));
  for (const up of ups) cleanups.push(() => stopZebuUp(up));
  const cli = ups[0];
  const size = `${SIZE_MIB}MiB`;
  // "local": both replicas on node-1 (the others take none while it is placed); "remote": none there.
  for (const n of ['node-2', 'node-3']) mustZebu(cli, ['node', 'update', n, '--scheduling', 'off']);
  mustZebu(cli, ['volume', 'create', 'local', '--size', size, '--replicas', '2']);
  for (const n of ['node-2', 'node-3']) mustZebu(cli, ['node', 'update', n, '--scheduling', 'on']);
  mustZebu(cli, ['node', 'update', 'node-1', '--scheduling', 'off']);
  mustZebu(cli, ['volume', 'create', 'remote', '--size', size, '--replicas', '2']);
  mustZebu(cli, ['node', 'update', 'node-1', '--scheduling', 'on']);
  const placement = (v: string): string => (mustZebuJson(cli, ['replica', 'list', '--volume', v]) as { nodeId: string }[]).map((r) => r.nodeId).sort().join('+');
  const uris: Record<string, string> = {};
  for (const v of ['local', 'remote']) {
    uris[v] = mustZebu(cli, ['volume', 'attach', v, '--node', 'node-1']).trim();
    fio(network.hosts[0].netns, uris[v], 'write', '1M', 8, null);
  }
  const h1 = network.hosts[0].netns;
  const rows: string[][] = [];
  for (const p of PATTERNS) {
    const local = fio(h1, uris.local, p.rw, p.bs, p.depth, SECONDS);
    const remote = fio(h1, uris.remote, p.rw, p.bs, p.depth, SECONDS);
    const l = value(local, p.unit);
    const r = value(remote, p.unit);
    const extra = p.unit === 'p50 us' ? ` (p99 ${local.p99us.toFixed(0)} / ${remote.p99us.toFixed(0)})` : '';
    rows.push([p.name, p.unit, l.toFixed(p.unit === 'IOPS' ? 0 : 1), r.toFixed(p.unit === 'IOPS' ? 0 : 1), (r / l).toFixed(2) + extra]);
  }
  const head = ['pattern', 'unit', `local (${placement('local')})`, `remote (${placement('remote')})`, 'remote/local'];
  const widths = head.map((h, i) => Math.max(h.length, ...rows.map((row) => row[i].length)));
  const line = (cells: string[]): string => `| ${cells.map((c, i) => c.padEnd(widths[i])).join(' | ')} |`;
  console.log(`bench:locality — fio nbd on node-1, ${SIZE_MIB} MiB volumes of 2 replicas, ${SECONDS} s per pattern, one-way link delay ${DELAY_US} us, ${os.cpus().length} cores`);
  console.log(line(head));
  console.log(`|${widths.map((w) => '-'.repeat(w + 2)).join('|')}|`);
  for (const row of rows) console.log(line(row));
}

main().then(async () => {
  for (const fn of cleanups.reverse()) await fn();
}, async (err) => {
  console.error(err);
  for (const fn of cleanups.reverse()) await Promise.resolve(fn()).catch(() => {});
  process.exit(1);
});
