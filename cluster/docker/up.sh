#!/usr/bin/env bash
# Builds the image and starts the three-node docker cluster; returns once every node answers
# on its published port and all agree on a leader. Then: docker push 127.0.0.1:5001/…
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
"$here/build.sh"
docker-compose -p raftyard -f "$here/docker-compose.yml" up -d
if leader=$("$here/../wait-for-leader.sh" 60 http://127.0.0.1:5001 http://127.0.0.1:5002 http://127.0.0.1:5003); then
    echo "docker cluster up: leader is node $leader"
else
    echo "see: docker-compose -p raftyard -f $here/docker-compose.yml logs" >&2
    exit 1
fi
