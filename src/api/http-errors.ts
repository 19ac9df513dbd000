/**
 * Errors on the wire: every failed request is answered with
 *   {"error": {"code": "EINVAL", "message": "...", "field": "sizeBytes"}}
 * where `code` is the ErrorCode without its ZEBU_ERR_ prefix and `field` (400 only) names the
 * request field at fault. Schema-validation failures are turned into the same shape, with a
 * message a person can act on.
 */
import { ErrorCode, ZebuError } from '../errors.ts';
import { httpStatusFor } from '../error-status.ts';

export interface ErrorBody {
  error: { code: string; message: string; field?: string };
}

/** The HTTP status of an error code (the one table, src/error-status.ts). */
export const statusForCode = httpStatusFor;

export function shortCode(code: ErrorCode): string {
  return code.replace(/^ZEBU_ERR_/, '');
}

export function errorBody(code: ErrorCode, message: string, field?: string): ErrorBody {
  return { error: field === undefined ? { code: shortCode(code), message } : { code: shortCode(code), message, field } };
}

/** One ajv error, as fastify hands it over (ajv runs with `verbose`, so data and parentSchema are set). */
export interface SchemaError {
  instancePath: string;
  keyword: string;
  params: Record<string, unknown>;
  message?: string;
  data?: unknown;
  parentSchema?: Record<string, unknown>;
}

const PART_NAMES: Record<string, string> = { body: 'request body', params: 'URL path', querystring: 'query string', headers: 'headers' };

function typeName(type: unknown): string {
  const names: Record<string, string> = {
    integer: 'a whole number', number: 'a number', string: 'a string', boolean: 'true or false', object: 'a JSON object', array: 'an array', null: 'null',
  };
  return Array.isArray(type) ? type.map(typeName).join(' or ') : names[String(type)] ?? String(type);
}

function shown(data: unknown): string {
  const text = JSON.stringify(data) ?? String(data);
  return text.length > 80 ? `${text.slice(0, 77)}...` : text;
}

/** What a number must be, from the keywords of its schema: "a multiple of 4096 between 4096 and 8192". */
function numberRule(schema: Record<string, unknown>): string {
  const parts: string[] = [schema.multipleOf !== undefined ? `a multiple of ${schema.multipleOf}` : schema.type === 'integer' ? 'a whole number' : 'a number'];
  const min = schema.minimum as number | undefined;
  const max = schema.maximum as number | undefined;
  if (min !== undefined && max !== undefined) parts.push(`between ${min} and ${max}`);
  else if (min !== undefined) parts.push(`>= ${min}`);
  else if (max !== undefined) parts.push(`<= ${max}`);
  return parts.join(' ');
}

/** A schema-validation failure as a ZebuError (EINVAL) naming the field. */
export function validationError(errors: SchemaError[], part: string): ZebuError {
  const e = errors[0];
  const pathField = e.instancePath.split('/').filter((s) => s !== '').join('.');
  const where = PART_NAMES[part] ?? part;
  const schema = e.parentSchema ?? {};
  const description = typeof schema.description === 'string' ? schema.description : undefined;
  const field = pathField === '' ? undefined : pathField;
  const subject = field ?? where;
  switch (e.keyword) {
    case 'required': {
      const missing = String(e.params.missingProperty);
      const full = field === undefined ? missing : `${field}.${missing}`;
      return invalidField(`${full} is required (${where})`, full);
    }
    case 'additionalProperties': {
      const extra = String(e.params.additionalProperty);
      const allowed = Object.keys((schema.properties as Record<string, unknown> | undefined) ?? {});
      const full = field === undefined ? extra : `${field}.${extra}`;
      return invalidField(`unknown field ${full} in the ${where}${allowed.length > 0 ? ` (allowed: ${allowed.join(', ')})` : ' (none allowed)'}`, full);
    }
    case 'type':
      return invalidField(`${subject} must be ${typeName(e.params.type)}, got ${shown(e.data)}`, field);
    case 'multipleOf':
    case 'minimum':
    case 'maximum':
    case 'exclusiveMinimum':
    case 'exclusiveMaximum':
      return invalidField(`${subject} must be ${numberRule(schema)}, got ${shown(e.data)}`, field);
    case 'pattern':
    case 'minLength':
    case 'maxLength':
    case 'format':
    case 'minItems':
    case 'maxItems':
      return invalidField(`${subject} must be ${description ?? e.message ?? 'valid'}, got ${shown(e.data)}`, field);
    case 'minProperties': {
      const allowed = Object.keys((schema.properties as Record<string, unknown> | undefined) ?? {});
      return invalidField(`nothing to change: the ${subject} names none of ${allowed.join(', ')}`, field);
    }
    case 'enum':
      return invalidField(`${subject} must be one of ${(e.params.allowedValues as unknown[]).map((v) => JSON.stringify(v)).join(', ')}, got ${shown(e.data)}`, field);
    default:
      return invalidField(`${subject} ${e.message ?? 'is not valid'}`, field);
  }
}

function invalidField(message: string, field: string | undefined): ZebuError {
  return new ZebuError(ErrorCode.EINVAL, message, { field });
}
