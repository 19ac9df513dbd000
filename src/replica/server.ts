/** The replica process serves its Replica with the generic data-protocol server. */
export { DataServer as ReplicaServer, type DataServerOptions as ReplicaServerOptions } from '../protocol/server.ts';
