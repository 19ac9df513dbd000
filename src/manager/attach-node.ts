/**
 * Where the manager itself attaches a detached volume for a while (a recurring job's run, replica
 * moves). Only while a node that is up holds a healthy replica (the engine starts from it, without
 * a rebuild); replica moves attach there, a job where a workload last attached the volume when
 * that node is up (the engine reaches remote replicas over the network; nothing is built there).
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

/**
 * Where a recurring job attaches a detached volume: the node a workload last attached it on when
 * that node is up, else a node that is up with a healthy replica (`prefer` first). Null when no
 * node that is up holds a healthy replica (the engine would have nothing to start from).
 */
export async function nodeForJob(objects: Objects, volume: string, lastWorkloadNode: string | null, prefer: string | null): Promise<string | null> {
  const withReplica = await nodeWithHealthyReplica(objects, volume, lastWorkloadNode ?? prefer);
  if (withReplica === null || lastWorkloadNode === null || withReplica === lastWorkloadNode) return withReplica;
  return (await objects.get(Kind.NodeLease, lastWorkloadNode)) !== null ? lastWorkloadNode : await nodeWithHealthyReplica(objects, volume, prefer);
}
