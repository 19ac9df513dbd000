/**
 * Constants and encoders of the NBD protocol (NetworkBlockDevice/nbd doc/proto.md):
 * fixed newstyle handshake, options, simple and structured replies.
 */

export const NBDMAGIC = Buffer.from('NBDMAGIC');
export const IHAVEOPT = Buffer.from('IHAVEOPT');
export const OPTION_REPLY_MAGIC_HI = 0x0003e889;
export const OPTION_REPLY_MAGIC_LO = 0x045565a9;
export const REQUEST_MAGIC = 0x25609513;
export const SIMPLE_REPLY_MAGIC = 0x67446698;
export const STRUCTURED_REPLY_MAGIC = 0x668e33ef;

export const HandshakeFlag = { FIXED_NEWSTYLE: 1, NO_ZEROES: 2 } as const;
export const ClientFlag = { FIXED_NEWSTYLE: 1, NO_ZEROES: 2 } as const;

export const Opt = {
  EXPORT_NAME: 1,
  ABORT: 2,
  LIST: 3,
  STARTTLS: 5,
  INFO: 6,
  GO: 7,
  STRUCTURED_REPLY: 8,
  LIST_META_CONTEXT: 9,
  SET_META_CONTEXT: 10,
  EXTENDED_HEADERS: 11,
} as const;

export const Rep = {
  ACK: 1,
  SERVER: 2,
  INFO: 3,
  META_CONTEXT: 4,
  ERR_UNSUP: 2 ** 31 + 1,
  ERR_POLICY: 2 ** 31 + 2,
  ERR_INVALID: 2 ** 31 + 3,
  ERR_PLATFORM: 2 ** 31 + 4,
  ERR_TLS_REQD: 2 ** 31 + 5,
  ERR_UNKNOWN: 2 ** 31 + 6,
  ERR_SHUTDOWN: 2 ** 31 + 7,
  ERR_BLOCK_SIZE_REQD: 2 ** 31 + 8,
  ERR_TOO_BIG: 2 ** 31 + 9,
} as const;

export const Info = { EXPORT: 0, NAME: 1, DESCRIPTION: 2, BLOCK_SIZE: 3 } as const;

export const TransmissionFlag = {
  HAS_FLAGS: 1,
  READ_ONLY: 2,
  SEND_FLUSH: 4,
  SEND_FUA: 8,
  ROTATIONAL: 16,
  SEND_TRIM: 32,
  SEND_WRITE_ZEROES: 64,
  SEND_DF: 128,
  CAN_MULTI_CONN: 256,
  SEND_RESIZE: 512,
  SEND_CACHE: 1024,
  SEND_FAST_ZERO: 2048,
} as const;

export const Cmd = {
  READ: 0,
  WRITE: 1,
  DISC: 2,
  FLUSH: 3,
  TRIM: 4,
  CACHE: 5,
  WRITE_ZEROES: 6,
  BLOCK_STATUS: 7,
  RESIZE: 8,
} as const;

export const CmdFlag = { FUA: 1, NO_HOLE: 2, DF: 4, REQ_ONE: 8, FAST_ZERO: 16, PAYLOAD_LEN: 32 } as const;

export const ReplyType = {
  NONE: 0,
  OFFSET_DATA: 1,
  OFFSET_HOLE: 2,
  BLOCK_STATUS: 5,
  ERROR: 2 ** 15 + 1,
  ERROR_OFFSET: 2 ** 15 + 2,
} as const;
export const ReplyFlag = { DONE: 1 } as const;

/** errno values on the wire. */
/** NBD carries Linux errno numbers: the one table of them is beside the error catalogue. */
export { Errno as NbdErrno } from '../error-status.ts';

export const BASE_ALLOCATION = 'base:allocation';
export const BASE_ALLOCATION_ID = 1;
export const AllocationFlag = { HOLE: 1, ZERO: 2 } as const;

export const REQUEST_HEADER_BYTES = 28;
export const MIN_BLOCK_BYTES = 512;
export const PREFERRED_BLOCK_BYTES = 4096;
export const MAX_BLOCK_BYTES = 32 * 1024 * 1024;
/** Options longer than this are refused (the handshake carries names, not data). */
export const MAX_OPTION_BYTES = 64 * 1024;

export function optionReply(option: number, type: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const buf = Buffer.allocUnsafe(20 + data.length);
  buf.writeUInt32BE(OPTION_REPLY_MAGIC_HI, 0);
  buf.writeUInt32BE(OPTION_REPLY_MAGIC_LO, 4);
  buf.writeUInt32BE(option, 8);
  buf.writeUInt32BE(type, 12);
  buf.writeUInt32BE(data.length, 16);
  data.copy(buf, 20);
  return buf;
}

export function simpleReplyHeader(errno: number, cookie: Buffer, extra = 0): Buffer {
  const buf = Buffer.allocUnsafe(16 + extra);
  buf.writeUInt32BE(SIMPLE_REPLY_MAGIC, 0);
  buf.writeUInt32BE(errno, 4);
  cookie.copy(buf, 8, 0, 8);
  return buf;
}

export function structuredHeader(buf: Buffer, flags: number, type: number, cookie: Buffer, length: number): void {
  buf.writeUInt32BE(STRUCTURED_REPLY_MAGIC, 0);
  buf.writeUInt16BE(flags, 4);
  buf.writeUInt16BE(type, 6);
  cookie.copy(buf, 8, 0, 8);
  buf.writeUInt32BE(length, 16);
}

export function structuredError(cookie: Buffer, errno: number, message: string): Buffer {
  const msg = Buffer.from(message.slice(0, 1000));
  const buf = Buffer.allocUnsafe(20 + 6 + msg.length);
  structuredHeader(buf, ReplyFlag.DONE, ReplyType.ERROR, cookie, 6 + msg.length);
  buf.writeUInt32BE(errno, 20);
  buf.writeUInt16BE(msg.length, 24);
  msg.copy(buf, 26);
  return buf;
}

export function structuredNone(cookie: Buffer): Buffer {
  const buf = Buffer.allocUnsafe(20);
  structuredHeader(buf, ReplyFlag.DONE, ReplyType.NONE, cookie, 0);
  return buf;
}
