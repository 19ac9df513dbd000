/** Listening on a UNIX socket path: a stale socket file is replaced, the socket is mode 0600. */
import fs from 'node:fs';
import type net from 'node:net';

export function listenOnUnixSocket(server: net.Server, socketPath: string): Promise<void> {
  try {
    if (fs.statSync(socketPath).isSocket()) fs.unlinkSync(socketPath);
  } catch {
    // nothing there
  }
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen({ path: socketPath }, () => {
      server.off('error', reject);
      fs.chmodSync(socketPath, 0o600);
      resolve();
    });
  });
}
