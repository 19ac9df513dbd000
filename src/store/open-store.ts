/**
 * Which store `zebu up` uses, from its --store option: none (the embedded store in the data
 * directory, one machine) or etcd://HOST:PORT[,HOST:PORT...] (a cluster store shared by every
 * node; etcds:// for TLS). etcd credentials come from the environment (ZEBU_ETCD_USERNAME,
 * ZEBU_ETCD_PASSWORD), never the command line, where every user of the machine could read them.
 */
import fs from 'node:fs';
import path from 'node:path';
import { invalid } from '../errors.ts';
import type { Store } from './store.ts';
import { SqliteStore } from './sqlite-store.ts';
import type { EtcdStoreOptions } from './etcd-store.ts';

export interface StoreChoice {
  /** --store: absent for the embedded store. */
  spec?: string;
  /** Key prefix in etcd (several clusters may share one etcd). */
  prefix?: string;
  /** PEM files for etcds://: the CA, and a client certificate and key if etcd asks for one. */
  caFile?: string;
  certFile?: string;
  keyFile?: string;
}

export interface OpenedStore {
  store: Store;
  /** "embedded" or the etcd endpoints, for logs and the ready line. */
  describe: string;
  /** Whether other nodes share it (the cluster secrets then live in it). */
  shared: boolean;
}

const ENDPOINT = /^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):([0-9]{1,5})$/;

/** The etcd client URLs in an etcd:// or etcds:// store spec. */
export function parseEtcdSpec(spec: string): { endpoints: string[]; tls: boolean } {
  const m = /^(etcds?):\/\/(.+)$/.exec(spec);
  if (m === null) throw invalid(`--store ${JSON.stringify(spec)}: etcd://HOST:PORT[,HOST:PORT...] (etcds:// for TLS), or leave it out for the embedded store`, 'store');
  const tls = m[1] === 'etcds';
  const endpoints = m[2].split(',').map((part) => {
    const hostPort = ENDPOINT.exec(part);
    if (hostPort === null || Number(hostPort[2]) < 1 || Number(hostPort[2]) > 65535) throw invalid(`--store: ${JSON.stringify(part)} is not HOST:PORT`, 'store');
    return `${tls ? 'https' : 'http'}://${part}`;
  });
  return { endpoints, tls };
}

export async function openStore(choice: StoreChoice, dataDir: string, log?: (message: string) => void): Promise<OpenedStore> {
  if (choice.spec === undefined || choice.spec === '') {
    for (const [flag, value] of [['--store-prefix', choice.prefix], ['--store-ca', choice.caFile], ['--store-cert', choice.certFile], ['--store-key', choice.keyFile]] as const) {
      if (value !== undefined) throw invalid(`${flag} is for an etcd store (--store etcd://...)`, 'store');
    }
    return { store: SqliteStore.open(path.join(dataDir, 'store.db')), describe: 'embedded', shared: false };
  }
  const { endpoints, tls } = parseEtcdSpec(choice.spec);
  const options: EtcdStoreOptions = { endpoints, prefix: choice.prefix, log };
  const read = (file: string, flag: string): Buffer => {
    try {
      return fs.readFileSync(file);
    } catch (err) {
      throw invalid(`${flag} ${file}: ${(err as Error).message}`, 'store');
    }
  };
  if (tls) {
    if (choice.caFile === undefined) throw invalid('etcds:// needs --store-ca FILE (the CA that signed the etcd members\' certificates)', 'store');
    if ((choice.certFile === undefined) !== (choice.keyFile === undefined)) throw invalid('--store-cert and --store-key go together', 'store');
    options.tls = {
      ca: read(choice.caFile, '--store-ca'),
      cert: choice.certFile !== undefined ? read(choice.certFile, '--store-cert') : undefined,
      key: choice.keyFile !== undefined ? read(choice.keyFile, '--store-key') : undefined,
    };
  } else if (choice.caFile !== undefined || choice.certFile !== undefined || choice.keyFile !== undefined) {
    throw invalid('--store-ca, --store-cert and --store-key are for etcds:// (TLS)', 'store');
  }
  const username = process.env.ZEBU_ETCD_USERNAME;
  const password = process.env.ZEBU_ETCD_PASSWORD;
  if ((username === undefined) !== (password === undefined)) throw invalid('set both ZEBU_ETCD_USERNAME and ZEBU_ETCD_PASSWORD, or neither', 'store');
  if (username !== undefined) options.auth = { username, password: password! };
  // Loaded only here: the etcd client (gRPC) costs the embedded store's users nothing.
  const { EtcdStore } = await import('./etcd-store.ts');
  return { store: await EtcdStore.open(options), describe: endpoints.join(','), shared: true };
}
