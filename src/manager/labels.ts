/** Labels users put on objects (backups, recurring jobs): one rule for all of them. */
import { invalid } from '../errors.ts';

const LABEL_KEY = /^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}$/;
const MAX_LABELS = 32;
const MAX_LABEL_VALUE = 256;

/** The labels of a request (absent: none), or EINVAL on field `labels` saying what is wrong. */
export function checkLabels(input: unknown): Record<string, string> {
  const labels = input ?? {};
  if (typeof labels !== 'object' || labels === null || Array.isArray(labels)) throw invalid('labels must be an object of strings', 'labels');
  const entries = Object.entries(labels);
  if (entries.length > MAX_LABELS) throw invalid(`at most ${MAX_LABELS} labels`, 'labels');
  for (const [k, v] of entries) {
    if (!LABEL_KEY.test(k)) throw invalid(`label key ${JSON.stringify(k)} must be 1-63 characters of [A-Za-z0-9._/-]`, 'labels');
    if (typeof v !== 'string' || v.length > MAX_LABEL_VALUE) throw invalid(`label ${k} must be a string of at most ${MAX_LABEL_VALUE} characters`, 'labels');
  }
  return Object.fromEntries(entries) as Record<string, string>;
}
