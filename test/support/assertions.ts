/**
 * Checks that `fn` fails one of the code's own assertions. An assertion failure stops the process
 * (src/errors.ts); here the failure is caught instead, to be checked.
 */
import assert from 'node:assert/strict';
import { onAssertionFailure, ZebuError, type AssertionFailure, type ErrorCode } from '../../src/errors.ts';

export function assertInvariantFails(fn: () => unknown, message: RegExp): void {
  const failures: AssertionFailure[] = [];
  const previous = onAssertionFailure((err) => failures.push(err));
  try {
    assert.throws(fn, message);
  } finally {
    onAssertionFailure(previous);
  }
  assert.equal(failures.length, 1, 'reported as an assertion failure (the process would stop)');
}

/** As assertInvariantFails, for a promise. */
export async function assertInvariantRejects(run: () => Promise<unknown>, message: RegExp): Promise<void> {
  const failures: AssertionFailure[] = [];
  const previous = onAssertionFailure((err) => failures.push(err));
  try {
    await assert.rejects(run(), message);
  } finally {
    onAssertionFailure(previous);
  }
  assert.equal(failures.length, 1, 'reported as an assertion failure (the process would stop)');
}

/** For assert.rejects/throws: a ZebuError with this code (and a message matching `match`). */
export function rejectsWith(code: ErrorCode, match?: RegExp): (err: unknown) => boolean {
  return (err) => {
    assert.ok(err instanceof ZebuError, String(err));
    assert.equal(err.code, code, err.message);
    if (match) assert.match(err.message, match);
    return true;
  };
}
