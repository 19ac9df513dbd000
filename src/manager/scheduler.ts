/**
 * Replica placement. Pure: nodes, disks and the volume's current replicas in, placements out.
 *
 * Rules, in order:
 * 1. Never two replicas of one volume on the same disk (hard).
 * 2. Prefer nodes that hold no replica of the volume. With soft anti-affinity off this is hard;
 *    with it on (the `zebu up` default) one machine may hold every replica on different disks.
 * 3. Only ready, schedulable nodes and disks.
 * 4. Space: the replicas placed on a disk (thin: their full size) may add up to
 *    `overProvisioningPercentage` of the disk's usable size (size minus reserved), and a disk
 *    whose free space is below `minimalAvailablePercentage` of its size takes nothing new.
 * 5. A volume on a backing image: only disks the image's selectors allow, and those that hold a
 *    ready file of it first (else the replica waits for a copy).
 * 6. Tags: a volume's node selector and disk selector (tags) allow only nodes and disks that
 *    carry every one of them.
 * Among the disks left, the one with the most schedulable room wins (ties: by name), which
 * spreads volumes over disks.
 */

export interface SchedulerNode {
  name: string;
  ready: boolean;
  allowScheduling: boolean;
  /** Its replicas are leaving it: it takes none. */
  evicting?: boolean;
  tags?: readonly string[];
}

export interface SchedulerDisk {
  name: string;
  nodeId: string;
  ready: boolean;
  allowScheduling: boolean;
  storageMaximumBytes: number;
  storageAvailableBytes: number;
  storageReservedBytes: number;
  /** Sum of the sizes of the replicas already placed on this disk. */
  storageScheduledBytes: number;
  /** Its replicas are leaving it: it takes none. */
  evicting?: boolean;
  tags?: readonly string[];
}

/** Tags a volume's replicas need: on their node, and on their disk (every one listed). */
export interface TagSelector {
  node: readonly string[];
  disk: readonly string[];
}

/** Why the volume's tag selector refuses this disk, or null. */
export function tagRefusal(disk: SchedulerDisk, node: SchedulerNode | undefined, selector: TagSelector | undefined): string | null {
  if (selector === undefined) return null;
  const nodeTags = node?.tags ?? [];
  const lackNode = selector.node.filter((t) => !nodeTags.includes(t));
  if (lackNode.length > 0) return `disk ${disk.name}: node ${disk.nodeId} lacks tag(s) ${lackNode.join(', ')} of the volume's node selector`;
  const diskTags = disk.tags ?? [];
  const lackDisk = selector.disk.filter((t) => !diskTags.includes(t));
  if (lackDisk.length > 0) return `disk ${disk.name} lacks tag(s) ${lackDisk.join(', ')} of the volume's disk selector`;
  return null;
}

export interface SchedulerPolicy {
  softAntiAffinity: boolean;
  overProvisioningPercentage: number;
  minimalAvailablePercentage: number;
}

/** A volume on a backing image: which disks its selectors refuse, and which hold a ready file. */
export interface ImageRules {
  refusal: (disk: string, node: string) => string | null;
  preferred: ReadonlySet<string>;
}

export interface Placement {
  nodeId: string;
  diskId: string;
}

export interface ScheduleResult {
  placements: Placement[];
  /** Why the rest could not be placed (empty when all were). */
  reasons: string[];
}

/** Why this disk cannot take a replica of `sizeBytes`, or null if it can. */
export function diskRefusal(disk: SchedulerDisk, node: SchedulerNode | undefined, sizeBytes: number, policy: SchedulerPolicy): string | null {
  if (node === undefined) return `disk ${disk.name}: its node ${disk.nodeId} is unknown`;
  if (!node.ready) return `disk ${disk.name}: node ${node.name} is down`;
  if (!node.allowScheduling) return `disk ${disk.name}: scheduling is off on node ${node.name}`;
  if (node.evicting === true) return `disk ${disk.name}: node ${node.name} is being evicted`;
  if (!disk.ready) return `disk ${disk.name} is not ready`;
  if (!disk.allowScheduling) return `disk ${disk.name}: scheduling is off`;
  if (disk.evicting === true) return `disk ${disk.name} is being evicted`;
  const usable = Math.max(0, disk.storageMaximumBytes - disk.storageReservedBytes);
  const limit = Math.floor((usable * policy.overProvisioningPercentage) / 100);
  if (disk.storageScheduledBytes + sizeBytes > limit) {
    return `disk ${disk.name}: ${disk.storageScheduledBytes + sizeBytes} bytes would be placed, over ${policy.overProvisioningPercentage}% of ${usable} usable bytes`;
  }
  const free = disk.storageAvailableBytes - disk.storageReservedBytes;
  if (free < (disk.storageMaximumBytes * policy.minimalAvailablePercentage) / 100) {
    return `disk ${disk.name}: only ${Math.max(0, free)} bytes free, under ${policy.minimalAvailablePercentage}% of its size`;
  }
  return null;
}

/**
 * Places `count` new replicas of a volume of `sizeBytes` next to `existing` ones.
 * Returns as many placements as possible and the reasons for any shortfall.
 */
export function scheduleReplicas(
  count: number,
  input: {
    sizeBytes: number; existing: Placement[]; nodes: SchedulerNode[]; disks: SchedulerDisk[]; policy: SchedulerPolicy; image?: ImageRules; selector?: TagSelector;
    /** Only this disk, or only disks of this node (a replica moved there by a user). */
    only?: { diskId: string | null; nodeId: string | null };
  },
): ScheduleResult {
  const nodes = new Map(input.nodes.map((n) => [n.name, n]));
  const usedDisks = new Set(input.existing.map((p) => p.diskId));
  const usedNodes = new Set(input.existing.map((p) => p.nodeId));
  // Placements made in this call take space too.
  const scheduled = new Map(input.disks.map((d) => [d.name, d.storageScheduledBytes]));
  const placements: Placement[] = [];
  let reasons: string[] = [];

  for (let i = 0; i < count; i++) {
    const refusals: string[] = [];
    const fit: SchedulerDisk[] = [];
    for (const disk of input.disks) {
      if (input.only?.diskId != null && disk.name !== input.only.diskId) continue;
      if (input.only?.nodeId != null && disk.nodeId !== input.only.nodeId) continue;
      if (usedDisks.has(disk.name)) {
        refusals.push(`disk ${disk.name} already holds a replica of this volume`);
        continue;
      }
      const why = tagRefusal(disk, nodes.get(disk.nodeId), input.selector) ?? input.image?.refusal(disk.name, disk.nodeId)
        ?? diskRefusal({ ...disk, storageScheduledBytes: scheduled.get(disk.name)! }, nodes.get(disk.nodeId), input.sizeBytes, input.policy);
      if (why !== null) refusals.push(why);
      else fit.push(disk);
    }
    const freshNode = fit.filter((d) => !usedNodes.has(d.nodeId));
    let candidates = freshNode;
    if (candidates.length === 0 && input.policy.softAntiAffinity) candidates = fit;
    if (candidates.length === 0) {
      if (fit.length > 0) refusals.push(`every fitting disk is on a node that already holds a replica (replica-soft-anti-affinity is off)`);
      reasons = refusals.length > 0 ? refusals
        : input.only?.diskId != null ? [`disk ${input.only.diskId} is not registered`]
          : input.only?.nodeId != null ? [`node ${input.only.nodeId} has no disk`] : ['no disks are registered'];
      break;
    }
    const room = (d: SchedulerDisk): number =>
      (Math.max(0, d.storageMaximumBytes - d.storageReservedBytes) * input.policy.overProvisioningPercentage) / 100 - scheduled.get(d.name)!;
    const hasImage = (d: SchedulerDisk): number => (input.image?.preferred.has(d.name) ? 1 : 0);
    candidates.sort((a, b) => hasImage(b) - hasImage(a) || room(b) - room(a) || (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
    const chosen = candidates[0];
    placements.push({ nodeId: chosen.nodeId, diskId: chosen.name });
    usedDisks.add(chosen.name);
    usedNodes.add(chosen.nodeId);
    scheduled.set(chosen.name, scheduled.get(chosen.name)! + input.sizeBytes);
  }
  return { placements, reasons: placements.length === count ? [] : reasons };
}

/** `replica-auto-balance`: how hard replicas are spread over nodes and disks. */
export type AutoBalance = 'disabled' | 'least-effort' | 'best-effort';

export interface BalanceMove {
  replica: string;
  diskId: string;
  why: string;
}

/**
 * One replica move of a volume that spreads replicas better, or null.
 *
 * - least-effort: replicas of the volume that share a node while another node, holding none of
 *   them, has a disk that can take one: one of them moves there.
 * - best-effort: that, then evening out: a replica of the volume on a node (or disk) holding at
 *   least two replicas (of all volumes) more than another node (or disk) that holds none of this
 *   volume's and can take one, moves there (disks: within the node). Each such move lowers the
 *   spread, so it ends.
 *
 * `counts`: replicas (of every volume, not being deleted) per disk.
 */
export function balanceMove(
  mode: AutoBalance,
  input: {
    sizeBytes: number; replicas: { name: string; nodeId: string; diskId: string }[]; nodes: SchedulerNode[]; disks: SchedulerDisk[];
    policy: SchedulerPolicy; counts: ReadonlyMap<string, number>; image?: ImageRules; selector?: TagSelector;
  },
): BalanceMove | null {
  if (mode === 'disabled' || input.replicas.length === 0) return null;
  const nodes = new Map(input.nodes.map((n) => [n.name, n]));
  const usedDisks = new Set(input.replicas.map((r) => r.diskId));
  const perNode = new Map<string, number>();
  for (const r of input.replicas) perNode.set(r.nodeId, (perNode.get(r.nodeId) ?? 0) + 1);
  const fits = (d: SchedulerDisk): boolean => !usedDisks.has(d.name)
    && (tagRefusal(d, nodes.get(d.nodeId), input.selector) ?? input.image?.refusal(d.name, d.nodeId) ?? diskRefusal(d, nodes.get(d.nodeId), input.sizeBytes, input.policy)) === null;
  const candidates = input.disks.filter(fits);
  const diskCount = (name: string): number => input.counts.get(name) ?? 0;
  const nodeCount = new Map<string, number>();
  for (const d of input.disks) nodeCount.set(d.nodeId, (nodeCount.get(d.nodeId) ?? 0) + diskCount(d.name));
  const byName = (a: { name: string }, b: { name: string }): number => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0);
  const emptiest = (list: SchedulerDisk[]): SchedulerDisk | null => [...list].sort((a, b) => diskCount(a.name) - diskCount(b.name) || byName(a, b))[0] ?? null;

  // Replicas of the volume sharing a node, while a node without any of them can take one.
  const crowded = input.replicas.filter((r) => (perNode.get(r.nodeId) ?? 0) > 1).sort(byName);
  if (crowded.length > 0) {
    const to = emptiest(candidates.filter((d) => !perNode.has(d.nodeId)));
    if (to !== null) return { replica: crowded[0].name, diskId: to.name, why: `replicas of the volume share node ${crowded[0].nodeId}; node ${to.nodeId} holds none` };
  }
  if (mode !== 'best-effort') return null;

  // Nodes: from the fullest node this volume is on to an emptier node it is not on.
  const mine = [...input.replicas].sort((a, b) => (nodeCount.get(b.nodeId) ?? 0) - (nodeCount.get(a.nodeId) ?? 0) || byName(a, b));
  for (const r of mine) {
    const to = emptiest(candidates.filter((d) => !perNode.has(d.nodeId) && (nodeCount.get(r.nodeId) ?? 0) - (nodeCount.get(d.nodeId) ?? 0) >= 2));
    if (to !== null) return { replica: r.name, diskId: to.name, why: `node ${r.nodeId} holds ${nodeCount.get(r.nodeId)} replicas, node ${to.nodeId} ${nodeCount.get(to.nodeId) ?? 0}` };
  }
  // Disks: from the fullest disk this volume is on to an emptier disk of the same node (nodes are
  // evened out above; a move within a node leaves the nodes' counts as they are, so the two
  // rules cannot undo each other).
  const byDisk = [...input.replicas].sort((a, b) => diskCount(b.diskId) - diskCount(a.diskId) || byName(a, b));
  for (const r of byDisk) {
    const to = emptiest(candidates.filter((d) => d.nodeId === r.nodeId && diskCount(r.diskId) - diskCount(d.name) >= 2));
    if (to !== null) return { replica: r.name, diskId: to.name, why: `disk ${r.diskId} holds ${diskCount(r.diskId)} replicas, disk ${to.name} ${diskCount(to.name)}` };
  }
  return null;
}
