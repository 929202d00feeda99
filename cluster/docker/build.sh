#!/usr/bin/env bash
# Builds the image raftyard:local from our own binary: no base image (none can be pulled),
# just the binary and the shared libraries ldd names, on scratch.
#   RAFTYARD_BIN  binary to package (default: target/release/raftyard, built if missing)
#   IMAGE         image name (default: raftyard:local)
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=${RAFTYARD_BIN:-target/release/raftyard}
image=${IMAGE:-raftyard:local}
if [ ! -x "$bin" ]; then
    cargo build --release -p raftyard
fi
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
mkdir -p "$ctx/rootfs/tmp" "$ctx/rootfs/data"
cp "$bin" "$ctx/rootfs/raftyard"
# the dynamic loader and every library the binary links, at their paths
for lib in $(ldd "$bin" | grep -o '/[^ ]*'); do
    mkdir -p "$ctx/rootfs$(dirname "$lib")"
    cp -L "$lib" "$ctx/rootfs$lib"
done
cat > "$ctx/Dockerfile" <<'DOCKERFILE'
FROM scratch
COPY rootfs/ /
ENV RUST_LOG=info
ENTRYPOINT ["/raftyard"]
CMD ["serve", "--listen", "0.0.0.0:5000", "--peer-listen", "0.0.0.0:5100", "--data-dir", "/data"]
DOCKERFILE
docker build -q -t "$image" "$ctx"
echo "built $image"
