/**
 * Imported FIRST by tests that watch regions leave the write-intent log: confirmed regions leave
 * at once instead of after INTENT_IDLE_MS (src/replica/intent-log.ts). Replica and engine
 * processes these tests start inherit it.
 */
process.env.ZEBU_INTENT_IDLE_MS ??= '0';
