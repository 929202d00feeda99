#!/usr/bin/env bash
# wait-for-agents.sh TIMEOUT_SECS DASHBOARD_URL COUNT: waits until the relay's dashboard lists
# at least COUNT connected node agents (with DASHBOARD_LOGIN=user:password for a dashboard
# behind a login). Used by the up.sh scripts.
set -euo pipefail
timeout=$1 dashboard=$2 count=$3
deadline=$((SECONDS + timeout))
while [ "$SECONDS" -lt "$deadline" ]; do
    agents=$(curl -sf --max-time 2 ${DASHBOARD_LOGIN:+-u "$DASHBOARD_LOGIN"} "$dashboard/api/status" | grep -o '"name": "node[0-9]*"' | sort -u | wc -l || true)
    [ "$agents" -ge "$count" ] && exit 0
    sleep 0.2
done
exit 1
