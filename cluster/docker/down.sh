#!/usr/bin/env bash
# Stops the docker cluster. --volumes also deletes its data.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
docker-compose -p raftyard -f "$here/docker-compose.yml" down ${1:+"$1"}
