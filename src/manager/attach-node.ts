/**
 * Where the manager itself attaches a detached volume for a while (a recurring job's run, replica
 * moves): a node that is up and already holds a healthy replica, so that the engine starts
 * without a rebuild.
 */
import { Kind, type Objects } from '../cluster/objects.ts';

/** A node that is up and holds a healthy replica of `volume` (`prefer` first when it does), or null. */
export async function nodeWithHealthyReplica(objects: Objects, volume: string, prefer: string | null): Promise<string | null> {
  const [replicas, leases] = await Promise.all([objects.list(Kind.Replica), objects.list(Kind.NodeLease)]);
  const up = new Set(leases.map((l) => l.name));
  const nodes = replicas
    .filter((r) => r.value.spec.volumeName === volume && r.value.deletionRequestedAt === null && r.value.spec.failedAt === null && r.value.spec.healthyAt !== null && up.has(r.value.spec.nodeId))
    .map((r) => r.value.spec.nodeId)
    .sort();
  if (prefer !== null && nodes.includes(prefer)) return prefer;
  return nodes[0] ?? null;
}
