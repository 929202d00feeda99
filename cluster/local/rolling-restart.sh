#!/usr/bin/env bash
# Restarts every node of the local cluster (cluster/local/up.sh) in turn, with its own config
# and data: the followers first and the leader last, so that the cluster elects once. Each
# node gets SIGTERM (it finishes its requests and leaves the relay first), is started again,
# and the next one waits until it is ready (`/v2/_raftyard/ready` answers 200: it has caught
# up, and its agent takes the relay's traffic again) and back at the relay. Clients of the
# shared endpoint 127.0.0.1:6000 see no error. With a new binary at RAFTYARD_BIN, this is a
# rolling upgrade.
#
#   RAFTYARD_BIN        binary to run (default: target/release/raftyard)
#   RAFTYARD_LOCAL_DIR  the cluster's directory (default: target/cluster-local)
#   DASHBOARD_LOGIN     user:password of the relay dashboard, if it has a login
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=${RAFTYARD_BIN:-target/release/raftyard}
dir=${RAFTYARD_LOCAL_DIR:-target/cluster-local}
[ -x "$bin" ] || { echo "no binary at $bin" >&2; exit 1; }

alive() { local st; st=$(ps -o stat= -p "$1" 2>/dev/null) || return 1; [[ "$st" != Z* ]]; }
registry_of() { sed -n 's/^listen = "\(.*\)"/\1/p' "$1/config.toml" | head -1; }

nodes=()
backups=()
for d in "$dir"/node[0-9]*; do
    [ -f "$d/pid" ] && alive "$(cat "$d/pid")" || continue
    if grep -q '^role = "backup"' "$d/config.toml"; then
        backups+=("$d") # not behind the relay: restarted after the others
    else
        nodes+=("$d")
    fi
done
[ ${#nodes[@]} -gt 0 ] || { echo "no running node under $dir (cluster/local/up.sh starts them)" >&2; exit 1; }

leader=$(curl -sf --max-time 2 "http://$(registry_of "${nodes[0]}")/v2/_raftyard/health" | grep -o '"leader":[0-9]*' | cut -d: -f2 || true)
order=()
for d in "${nodes[@]}"; do [ "${d##*/node}" != "$leader" ] && order+=("$d"); done
for d in "${nodes[@]}"; do [ "${d##*/node}" = "$leader" ] && order+=("$d"); done

restart() { # restart DIR: SIGTERM, wait for the exit, start again
    local d=$1 pid
    pid=$(cat "$d/pid")
    echo "${d##*/}: SIGTERM (pid $pid)"
    kill -TERM "$pid"
    for _ in $(seq 1 600); do alive "$pid" || break; sleep 0.1; done
    alive "$pid" && { echo "${d##*/} did not stop within 60 s" >&2; exit 1; }
    setsid nohup "$bin" serve --config "$d/config.toml" >>"$d/log" 2>&1 < /dev/null &
    echo $! > "$d/pid"
}

for d in "${order[@]}"; do
    n=${d##*/}
    reg=$(registry_of "$d")
    restart "$d"
    t=$SECONDS
    until [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://$reg/v2/_raftyard/ready")" = 200 ]; do
        [ $((SECONDS - t)) -lt 120 ] || { echo "$n not ready after 120 s; log in $d/log" >&2; exit 1; }
        alive "$(cat "$d/pid")" || { echo "$n exited; log in $d/log" >&2; exit 1; }
        sleep 0.2
    done
    cluster/wait-for-agents.sh 30 http://127.0.0.1:7500 ${#nodes[@]} || { echo "$n's agent is not back at the relay" >&2; exit 1; }
    # the agent's gate opens within a readiness check of the node being ready
    sleep 1
    echo "$n: restarted (pid $(cat "$d/pid")), ready after $((SECONDS - t)) s"
done
for d in "${backups[@]}"; do
    restart "$d"
    reg=$(registry_of "$d")
    t=$SECONDS
    until [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://$reg/v2/_raftyard/ready")" = 200 ]; do
        [ $((SECONDS - t)) -lt 120 ] || { echo "${d##*/} not serving after 120 s; log in $d/log" >&2; exit 1; }
        sleep 0.2
    done
    echo "${d##*/} (backup): restarted (pid $(cat "$d/pid"))"
done
echo "rolling restart done: $((${#order[@]} + ${#backups[@]})) nodes"
