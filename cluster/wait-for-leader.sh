#!/usr/bin/env bash
# wait-for-leader.sh TIMEOUT_SECS URL...: waits until every registry URL answers
# /v2/_raftyard/health and all name the same leader; prints it. Used by the up.sh scripts.
set -euo pipefail
timeout=$1
shift
deadline=$((SECONDS + timeout))
while :; do
    leaders=()
    for url in "$@"; do
        h=$(curl -sf --max-time 2 "$url/v2/_raftyard/health" || true)
        leaders+=("$(printf '%s' "$h" | sed -n 's/.*"leader":\([0-9]*\).*/\1/p')")
    done
    first=${leaders[0]}
    agreed=1
    for l in "${leaders[@]}"; do [ -n "$l" ] && [ "$l" = "$first" ] || agreed=0; done
    if [ "$agreed" = 1 ]; then
        echo "$first"
        exit 0
    fi
    if [ $SECONDS -ge $deadline ]; then
        echo "no agreed leader after ${timeout}s (seen: ${leaders[*]:-none})" >&2
        exit 1
    fi
    sleep 0.2
done
