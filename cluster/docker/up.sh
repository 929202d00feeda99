#!/usr/bin/env bash
# Builds the image and starts the three-node docker cluster and its relay; returns once every
# node answers on its published port, all agree on a leader and every agent is connected to
# the relay. Then: docker push 127.0.0.1:6000/… (through the relay) or 127.0.0.1:5001/….
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
"$here/build.sh"
# the relay's certificate (for the name "relay" the agents dial) and one token per node, once
secrets="$here/secrets"
if [ ! -f "$secrets/tls/ca.pem" ]; then
    docker run --rm -v "$secrets:/out" "${IMAGE:-raftyard:local}" certs self-signed --host relay --out /out/tls >/dev/null
fi
for n in 1 2 3; do
    [ -f "$secrets/token-node$n" ] || head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$secrets/token-node$n"
done
# the relay dashboard's password (user admin)
[ -f "$secrets/dashboard-password" ] || head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$secrets/dashboard-password"
docker-compose -p raftyard -f "$here/docker-compose.yml" up -d
if leader=$("$here/../wait-for-leader.sh" 60 http://127.0.0.1:5001 http://127.0.0.1:5002 http://127.0.0.1:5003); then
    echo "docker cluster up: leader is node $leader"
else
    echo "see: docker-compose -p raftyard -f $here/docker-compose.yml logs" >&2
    exit 1
fi
if DASHBOARD_LOGIN="admin:$(cat "$secrets/dashboard-password")" "$here/../wait-for-agents.sh" 30 http://127.0.0.1:7500 3; then
    echo "relay up: 3 agents behind 127.0.0.1:6000"
else
    echo "not every agent reached the relay: docker-compose -p raftyard -f $here/docker-compose.yml logs relay" >&2
    exit 1
fi
