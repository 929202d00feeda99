#!/usr/bin/env bash
# Builds the image and starts the three-node docker cluster; returns once every node answers
# on its published port and all agree on a leader. Then: docker push 127.0.0.1:5001/…
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
"$here/build.sh"
docker-compose -p raftyard -f "$here/docker-compose.yml" up -d
deadline=$((SECONDS + 60))
while :; do
    leaders=()
    for n in 1 2 3; do
        h=$(curl -sf --max-time 2 "http://127.0.0.1:500$n/v2/_raftyard/health" || true)
        leaders+=("$(printf '%s' "$h" | sed -n 's/.*"leader":\([0-9]*\).*/\1/p')")
    done
    if [ -n "${leaders[0]}" ] && [ "${leaders[0]}" = "${leaders[1]}" ] && [ "${leaders[1]}" = "${leaders[2]}" ]; then
        echo "docker cluster up: leader is node ${leaders[0]}"
        exit 0
    fi
    if [ $SECONDS -ge $deadline ]; then
        echo "docker cluster did not come up; see: docker-compose -p raftyard -f $here/docker-compose.yml logs" >&2
        exit 1
    fi
    sleep 0.5
done
