/**
 * Mutual challenge-response with a shared cluster secret. The secret never crosses the wire;
 * each side proves it by an HMAC over both sides' fresh nonces.
 *
 *   server -> client  HELLO  "ZBHS" u32 | version u32 | serverNonce 32
 *   client -> server  AUTH   "ZBAU" u32 | clientNonce 32 | HMAC(secret, "zebu-client" serverNonce clientNonce) 32
 *   server -> client  RESULT "ZBOK" u32 | status u32 (0 ok) | HMAC(secret, "zebu-server" clientNonce serverNonce) 32
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import { ZebuError, ErrorCode } from '../errors.ts';

export const PROTOCOL_VERSION = 1;
export const HELLO_MAGIC = 0x5a424853;
export const AUTH_MAGIC = 0x5a424155;
export const RESULT_MAGIC = 0x5a424f4b;
export const HELLO_BYTES = 40;
export const AUTH_BYTES = 68;
export const RESULT_BYTES = 40;
const NONCE_BYTES = 32;

function mac(secret: Buffer, label: string, a: Buffer, b: Buffer): Buffer {
  return crypto.createHmac('sha256', secret).update(label).update(a).update(b).digest();
}

export function newNonce(): Buffer {
  return crypto.randomBytes(NONCE_BYTES);
}

export function encodeHello(serverNonce: Buffer): Buffer {
  const buf = Buffer.alloc(HELLO_BYTES);
  buf.writeUInt32BE(HELLO_MAGIC, 0);
  buf.writeUInt32BE(PROTOCOL_VERSION, 4);
  serverNonce.copy(buf, 8);
  return buf;
}

/** Client side: checks the hello, returns the AUTH message and the proof expected back. */
export function answerHello(secret: Buffer, hello: Buffer): { auth: Buffer; expectedServerProof: Buffer } {
  if (hello.readUInt32BE(0) !== HELLO_MAGIC) throw new ZebuError(ErrorCode.PROTOCOL, 'peer is not a Zebu replica (bad hello magic)');
  const version = hello.readUInt32BE(4);
  if (version !== PROTOCOL_VERSION) throw new ZebuError(ErrorCode.PROTOCOL, `replica speaks protocol version ${version}, this client ${PROTOCOL_VERSION}`);
  const serverNonce = hello.subarray(8, 8 + NONCE_BYTES);
  const clientNonce = newNonce();
  const auth = Buffer.alloc(AUTH_BYTES);
  auth.writeUInt32BE(AUTH_MAGIC, 0);
  clientNonce.copy(auth, 4);
  mac(secret, 'zebu-client', serverNonce, clientNonce).copy(auth, 36);
  return { auth, expectedServerProof: mac(secret, 'zebu-server', clientNonce, serverNonce) };
}

/** Server side: verifies AUTH; returns the RESULT message to send and whether the peer is in. */
export function checkAuth(secret: Buffer, serverNonce: Buffer, auth: Buffer): { ok: boolean; result: Buffer } {
  const result = Buffer.alloc(RESULT_BYTES);
  result.writeUInt32BE(RESULT_MAGIC, 0);
  const clientNonce = auth.subarray(4, 36);
  const proof = auth.subarray(36, 68);
  const ok = auth.readUInt32BE(0) === AUTH_MAGIC && crypto.timingSafeEqual(proof, mac(secret, 'zebu-client', serverNonce, clientNonce));
  if (ok) mac(secret, 'zebu-server', clientNonce, serverNonce).copy(result, 8);
  else result.writeUInt32BE(1, 4);
  return { ok, result };
}

/** Client side: verifies RESULT. */
export function checkResult(result: Buffer, expectedServerProof: Buffer): void {
  if (result.readUInt32BE(0) !== RESULT_MAGIC) throw new ZebuError(ErrorCode.PROTOCOL, 'bad auth result magic');
  if (result.readUInt32BE(4) !== 0) throw new ZebuError(ErrorCode.AUTH, 'replica rejected the cluster secret');
  if (!crypto.timingSafeEqual(result.subarray(8, 40), expectedServerProof)) {
    throw new ZebuError(ErrorCode.AUTH, 'replica failed to prove it knows the cluster secret');
  }
}

/** Reads a secret file: at least 16 bytes after trimming white space. */
export function readSecretFile(filePath: string): Buffer {
  let raw: string;
  try {
    raw = fs.readFileSync(filePath, 'utf8');
  } catch (err) {
    throw new ZebuError(ErrorCode.NOT_FOUND, `cannot read secret file ${filePath}: ${(err as Error).message}`);
  }
  const secret = Buffer.from(raw.trim(), 'utf8');
  if (secret.length < 16) throw new ZebuError(ErrorCode.EINVAL, `secret in ${filePath} is shorter than 16 bytes`);
  return secret;
}
