/**
 * Zebu on an etcd as a careful user runs it (issue: a real cluster): clients must speak TLS and
 * show a certificate signed by the cluster's CA, and etcd's auth is on (a user with read and
 * write on Zebu's prefix only). The store works with the right credentials and says plainly what
 * is wrong with each bad one; `zebu up --store etcds://… --store-ca … --store-cert … --store-key …`
 * with ZEBU_ETCD_USERNAME/ZEBU_ETCD_PASSWORD runs on it and serves a volume to qemu-io.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { spawnSync } from 'node:child_process';
import { Etcd3, Range } from 'etcd3';
import { ErrorCode, ZebuError } from '../../src/errors.ts';
import { EtcdStore } from '../../src/store/etcd-store.ts';
import { startEtcd } from '../support/etcd-server.ts';
import { tempDir } from '../support/tmp.ts';
import { run } from '../support/volume-cluster.ts';
import { startZebuUp, stopZebuUp, mustZebu, mustZebuJson, zebuDataDir, waitFor } from '../support/zebu-up.ts';

function openssl(cwd: string, ...args: string[]): void {
  const r = spawnSync('openssl', args, { cwd, encoding: 'utf8' });
  assert.equal(r.status, 0, `openssl ${args.join(' ')}: ${r.stderr}`);
}

/** A CA, a certificate for etcd on 127.0.0.1, and client certificates: one signed by the CA, one not. */
function makeCertificates(dir: string): void {
  const ca = (name: string): void => openssl(dir, 'req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '2', '-subj', `/CN=${name}`, '-keyout', `${name}-key.pem`, '-out', `${name}.pem`);
  ca('ca');
  ca('other-ca');
  const sign = (name: string, by: string, extensions: string): void => {
    openssl(dir, 'req', '-newkey', 'rsa:2048', '-nodes', '-subj', `/CN=${name}`, '-keyout', `${name}-key.pem`, '-out', `${name}.csr`);
    fs.writeFileSync(path.join(dir, `${name}.ext`), extensions);
    openssl(dir, 'x509', '-req', '-in', `${name}.csr`, '-CA', `${by}.pem`, '-CAkey', `${by}-key.pem`, '-CAcreateserial', '-days', '2', '-extfile', `${name}.ext`, '-out', `${name}.pem`);
  };
  sign('server', 'ca', 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n');
  sign('client', 'ca', 'extendedKeyUsage=clientAuth\n');
  sign('stranger', 'other-ca', 'extendedKeyUsage=clientAuth\n');
}

function codeOf(err: unknown): string | undefined {
  return err instanceof ZebuError ? err.code : undefined;
}

test('an etcd asking for TLS client certificates and a password: the store works with the right ones and names each wrong one; zebu up serves a volume on it', { timeout: 300_000 }, async (t) => {
  const dir = tempDir(t, 'zebu-etcd-tls-');
  makeCertificates(dir);
  const file = (name: string): string => path.join(dir, name);
  const read = (name: string): Buffer => fs.readFileSync(file(name));
  const etcd = await startEtcd(t, dir, 'etcd-tls', undefined, '127.0.0.1', { certFile: file('server.pem'), keyFile: file('server-key.pem'), caFile: file('ca.pem') });
  assert.ok(etcd.endpoint.startsWith('https://'));
  const clientTls = { ca: read('ca.pem'), cert: read('client.pem'), key: read('client-key.pem') };

  // Auth on: root for the set-up, and a user "zebu" with read and write on Zebu's prefix only.
  const admin = new Etcd3({ hosts: etcd.endpoint, credentials: { rootCertificate: clientTls.ca, certChain: clientTls.cert, privateKey: clientTls.key } });
  await waitFor('etcd elected itself', () => admin.get('probe').then(() => true, () => undefined), 30_000, 200);
  await admin.user('root').create('root-secret');
  await admin.user('root').addRole('root');
  const role = await admin.role('zebu-rw').create();
  await role.grant({ permission: 'Readwrite', range: Range.prefix('zebu/') });
  await (await admin.user('zebu').create('zebu-secret')).addRole('zebu-rw');
  await admin.auth.authEnable();
  admin.close();

  const endpoints = [etcd.endpoint];
  const auth = { username: 'zebu', password: 'zebu-secret' };
  // Right credentials: the store works (a lease, a write under it, a watch that sees it).
  const store = await EtcdStore.open({ endpoints, tls: clientTls, auth });
  t.after(() => store.close());
  const seen: string[] = [];
  const watch = store.watch({ afterRevision: await store.revision() }, { onEvent: (e) => void seen.push(`${e.type} ${e.kind}/${e.name}`), onError: () => {} });
  t.after(() => watch.close());
  const lease = await store.grantLease(10_000);
  await store.create('Thing', 'a', { n: 1 }, { leaseId: lease.id });
  await store.keepAlive(lease.id);
  assert.deepEqual((await store.get('Thing', 'a'))?.value, { n: 1 });
  await waitFor('the watch to see it', () => seen.includes('put Thing/a') || undefined, 10_000, 50);

  // Each wrong credential refused in words that say which.
  const refused = async (options: Parameters<typeof EtcdStore.open>[0], code: string, message: RegExp): Promise<void> => {
    await assert.rejects(EtcdStore.open({ ...options, callTimeoutMs: 3000 }), (err) => {
      assert.equal(codeOf(err), code, String(err));
      assert.match((err as Error).message, message);
      return true;
    });
  };
  await refused({ endpoints, tls: clientTls, auth: { username: 'zebu', password: 'wrong' } }, ErrorCode.AUTH, /etcd refused the credentials.*(authentication failed|invalid user ID or password)/);
  await refused({ endpoints, tls: clientTls, auth: { username: 'nobody', password: 'x' } }, ErrorCode.AUTH, /etcd refused the credentials/);
  // Outside its prefix, the user has no rights: a store there is refused at its first read.
  await refused({ endpoints, tls: clientTls, auth, prefix: 'other/' }, ErrorCode.AUTH, /etcd refused the credentials.*permission denied/);
  // No certificate, or one signed by another CA: etcd ends the TLS handshake.
  await refused({ endpoints, tls: { ca: clientTls.ca }, auth }, ErrorCode.AUTH, /etcd refused this node's TLS client certificate/);
  await refused({ endpoints, tls: { ca: clientTls.ca, cert: read('stranger.pem'), key: read('stranger-key.pem') }, auth }, ErrorCode.AUTH, /etcd refused this node's TLS client certificate/);
  // etcd's certificate checked against the wrong CA: this side ends it.
  await refused({ endpoints, tls: { ...clientTls, ca: read('other-ca.pem') }, auth }, ErrorCode.AUTH, /etcd's TLS certificate is not trusted/);

  // zebu up on it, as a user starts it; a volume served to qemu-io.
  const up = await startZebuUp({
    dataDir: zebuDataDir(t), store: `etcds://127.0.0.1:${etcd.ports.client}`, node: 'secure-1', disks: 2,
    extraArgs: ['--store-ca', file('ca.pem'), '--store-cert', file('client.pem'), '--store-key', file('client-key.pem')],
    env: { ZEBU_ETCD_USERNAME: 'zebu', ZEBU_ETCD_PASSWORD: 'zebu-secret' },
  });
  t.after(() => stopZebuUp(up));
  assert.equal(up.leader, true);
  mustZebu(up, ['volume', 'create', 'sv', '--size', '32MiB', '--replicas', '2']);
  const uri = mustZebu(up, ['volume', 'attach', 'sv']).trim();
  const io = run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 0 8M', '-c', 'flush', '-c', 'read -P 0x5a 0 8M', uri], { timeoutMs: 60_000 });
  assert.equal(io.status, 0, io.stdout + io.stderr);
  assert.doesNotMatch(io.stdout + io.stderr, /verification failed|error/i);
  mustZebu(up, ['snapshot', 'create', 'sv', 'on-secure-etcd']);
  assert.equal(mustZebuJson(up, ['volume', 'get', 'sv']).robustness, 'healthy');
  // What it wrote is under its prefix, where only its user may read.
  assert.ok((await store.list('Volume')).items.some((v) => v.name === 'sv'));
});
