#!/usr/bin/env bash
# Stops the nodes and the relay started by cluster/local/up.sh (SIGTERM, then SIGKILL after 20 s). Data stays.
set -euo pipefail
cd "$(dirname "$0")/../.."
dir=${RAFTYARD_LOCAL_DIR:-target/cluster-local}
for pidfile in "$dir"/node*/pid "$dir"/relay/pid; do
    [ -f "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    st=$(ps -o stat= -p "$pid" 2>/dev/null || true)
    if [ -n "$st" ] && [[ "$st" != Z* ]]; then
        kill -TERM "$pid"
        for _ in $(seq 1 100); do
            st=$(ps -o stat= -p "$pid" 2>/dev/null || true)
            { [ -z "$st" ] || [[ "$st" == Z* ]]; } && break
            sleep 0.2
        done
        st=$(ps -o stat= -p "$pid" 2>/dev/null || true)
        if [ -n "$st" ] && [[ "$st" != Z* ]]; then kill -KILL "$pid"; fi
        echo "stopped $(basename "$(dirname "$pidfile")") (pid $pid)"
    fi
    rm -f "$pidfile"
done
