/**
 * qcow2 images: told by their magic, converted to raw with qemu-img (Debian's qemu-utils) —
 * replicas read a backing image as a raw file.
 */
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import { ZebuError, ErrorCode } from '../errors.ts';

/** A qcow2 file starts with "QFI\xfb". */
export async function isQcow2(file: string): Promise<boolean> {
  const fd = await fs.promises.open(file, 'r');
  try {
    const head = Buffer.alloc(4);
    const { bytesRead } = await fd.read(head, 0, 4, 0);
    return bytesRead === 4 && head.readUInt32BE(0) === 0x514649fb;
  } finally {
    await fd.close();
  }
}

/** qcow2 -> raw with qemu-img (qemu-utils): volumes read a raw image. */
export function convertQcow2(from: string, to: string, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    const child = spawn('qemu-img', ['convert', '-q', '-f', 'qcow2', '-O', 'raw', from, to], { stdio: ['ignore', 'ignore', 'pipe'], signal });
    let stderr = '';
    child.stderr.on('data', (d) => (stderr += d));
    child.on('error', (err) => {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') reject(new ZebuError(ErrorCode.UNSUPPORTED, 'the image is qcow2; converting it to raw needs qemu-img (apt-get install qemu-utils)'));
      else reject(err);
    });
    child.on('exit', (code) => (code === 0 ? resolve() : reject(new ZebuError(ErrorCode.EINVAL, `the image looks like qcow2 but qemu-img cannot convert it: ${stderr.trim() || `exit ${code}`}`))));
  });
}
