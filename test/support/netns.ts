/**
 * Hosts for multi-node tests: network namespaces on one machine, each with its own address on a
 * bridge in the test's own namespace (where etcd and the CLI run). A host can be cut off (its
 * link down: packets are dropped, connections hang as over a dead network) and joined again.
 * Needs root and iproute2; everything is removed when the test ends.
 */
import { spawnSync } from 'node:child_process';
import assert from 'node:assert/strict';
import crypto from 'node:crypto';

export interface TestHost {
  /** The namespace to run its processes in (`ip netns exec NAME`). */
  netns: string;
  address: string;
  /** Takes its link down: nothing reaches it, nothing leaves it. */
  cut(): void;
  /** Brings its link back. */
  join(): void;
}

export interface TestNetwork {
  /** The bridge's address, in the test's namespace: etcd listens here. */
  hostAddress: string;
  hosts: TestHost[];
}

function ip(...args: string[]): void {
  const r = spawnSync('ip', args, { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`ip ${args.join(' ')}: ${r.stderr || r.error?.message || `exit ${r.status}`}`);
}

/** Why multi-node tests cannot run here (not root, no iproute2), or null when they can. */
export function netnsUnavailable(): string | null {
  if (process.getuid?.() !== 0) return 'network namespaces need root';
  const r = spawnSync('ip', ['netns', 'list'], { encoding: 'utf8' });
  return r.status === 0 ? null : `ip netns does not work here: ${r.stderr || r.error?.message}`;
}

export function makeNetwork(t: { after: (fn: () => unknown) => void }, count: number): TestNetwork {
  // Interface names are at most 15 characters; a random tag and subnet keep concurrent runs apart.
  const tag = crypto.randomBytes(3).toString('hex');
  // Not one a concurrent test's bridge already has.
  const taken = spawnSync('ip', ['-o', '-4', 'addr', 'show'], { encoding: 'utf8' }).stdout ?? '';
  let subnet = `10.213.${crypto.randomInt(1, 255)}`;
  while (taken.includes(` ${subnet}.`)) subnet = `10.213.${crypto.randomInt(1, 255)}`;
  const bridge = `zb${tag}`;
  const made: string[] = [];
  t.after(() => {
    for (const ns of made) spawnSync('ip', ['netns', 'del', ns]);
    spawnSync('ip', ['link', 'del', bridge]);
  });
  ip('link', 'add', bridge, 'type', 'bridge');
  ip('addr', 'add', `${subnet}.1/24`, 'dev', bridge);
  ip('link', 'set', bridge, 'up');
  const hosts: TestHost[] = [];
  for (let i = 1; i <= count; i++) {
    const netns = `zn${tag}${i}`;
    const outside = `zv${tag}${i}`;
    const inside = `zp${tag}${i}`;
    const address = `${subnet}.${10 + i}`;
    ip('netns', 'add', netns);
    made.push(netns);
    ip('link', 'add', outside, 'type', 'veth', 'peer', 'name', inside);
    ip('link', 'set', outside, 'master', bridge, 'up');
    ip('link', 'set', inside, 'netns', netns);
    ip('-n', netns, 'link', 'set', inside, 'name', 'eth0');
    ip('-n', netns, 'addr', 'add', `${address}/24`, 'dev', 'eth0');
    ip('-n', netns, 'link', 'set', 'eth0', 'up');
    ip('-n', netns, 'link', 'set', 'lo', 'up');
    hosts.push({ netns, address, cut: () => ip('link', 'set', outside, 'down'), join: () => ip('link', 'set', outside, 'up') });
  }
  return { hostAddress: `${subnet}.1`, hosts };
}

/** qemu-io on `host` (where a volume's client is), failing the test on any error or wrong byte. */
export function qemuIoOn(host: TestHost, uri: string, ...commands: string[]): void {
  const r = spawnSync('ip', ['netns', 'exec', host.netns, 'qemu-io', '-f', 'raw', ...commands.flatMap((c) => ['-c', c]), uri], { encoding: 'utf8', timeout: 120_000 });
  assert.equal(r.status, 0, `${r.stdout}${r.stderr}${r.error?.message ?? ''}`);
  assert.doesNotMatch(r.stdout + r.stderr, /verification failed|error/i);
}
