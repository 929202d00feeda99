#!/usr/bin/env bash
# Starts a three-node raftyard cluster on 127.0.0.1: registry ports 5001-5003, peer ports
# 5101-5103. Idempotent: only nodes that are not running are started (so it also restarts a
# killed node). Returns once every node answers /v2/ and all agree on a leader.
#
#   RAFTYARD_BIN        binary to run (default: target/release/raftyard)
#   RAFTYARD_LOCAL_DIR  where node<N>/{config.toml,data,log,pid} live (default: target/cluster-local)
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=${RAFTYARD_BIN:-target/release/raftyard}
dir=${RAFTYARD_LOCAL_DIR:-target/cluster-local}
nodes=(1 2 3)

[ -x "$bin" ] || { echo "no binary at $bin (cargo build --release -p raftyard, or set RAFTYARD_BIN)" >&2; exit 1; }
command -v curl >/dev/null || { echo "curl is needed" >&2; exit 1; }

# A node runs if its pid is alive and not a zombie waiting to be reaped.
running() {
    [ -f "$1/pid" ] || return 1
    local st
    st=$(ps -o stat= -p "$(cat "$1/pid")" 2>/dev/null) || return 1
    [[ "$st" != Z* ]]
}

for n in "${nodes[@]}"; do
    d="$dir/node$n"
    mkdir -p "$d/data"
    cat > "$d/config.toml" <<TOML
# Written by cluster/local/up.sh
[node]
id = $n
data_dir = "$(realpath "$d")/data"

[registry]
listen = "127.0.0.1:500$n"

[cluster]
listen = "127.0.0.1:510$n"
$(for m in "${nodes[@]}"; do printf '\n[[cluster.members]]\nid = %s\npeer = "127.0.0.1:510%s"\nregistry = "127.0.0.1:500%s"\n' "$m" "$m" "$m"; done)
TOML
    if running "$d"; then
        echo "node$n already running (pid $(cat "$d/pid"))"
        continue
    fi
    setsid nohup "$bin" serve --config "$d/config.toml" >>"$d/log" 2>&1 < /dev/null &
    echo $! > "$d/pid"
    echo "node$n started (pid $!, registry 127.0.0.1:500$n, peer 127.0.0.1:510$n)"
done

if leader=$(cluster/wait-for-leader.sh 30 http://127.0.0.1:5001 http://127.0.0.1:5002 http://127.0.0.1:5003); then
    echo "cluster up: leader is node $leader"
else
    echo "logs in $dir/node*/log" >&2
    exit 1
fi
