#!/usr/bin/env python3
"""Writes a docker-registry (CNCF Distribution) filesystem store directly, without the registry:
the same content benches/import/fill.py pushes through the API (COUNT small images, a 1 KiB
layer and a config each, tagged t<i> in bench/r<i % 100>), in seconds instead of minutes.
Usage: layout.py ROOTDIRECTORY COUNT
"""
import hashlib, json, os, sys

root = os.path.join(sys.argv[1], "docker/registry/v2"); count = int(sys.argv[2])

def put(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f: f.write(data)

def blob(data):
    h = hashlib.sha256(data).hexdigest()
    put(f"{root}/blobs/sha256/{h[:2]}/{h}/data", data)
    return "sha256:" + h, h

for i in range(count):
    repo = f"{root}/repositories/bench/r{i % 100}"
    layer = (f"layer {i} ".encode() * 120)[:1024]
    cfg = json.dumps({"architecture": "amd64", "os": "linux", "i": i}).encode()
    (ld, lh), (cd, ch) = blob(layer), blob(cfg)
    for d, h in ((ld, lh), (cd, ch)):
        put(f"{repo}/_layers/sha256/{h}/link", d.encode())
    m = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": len(cfg)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": ld, "size": len(layer)}]}).encode()
    md, mh = blob(m)
    put(f"{repo}/_manifests/revisions/sha256/{mh}/link", md.encode())
    put(f"{repo}/_manifests/tags/t{i}/current/link", md.encode())
    put(f"{repo}/_manifests/tags/t{i}/index/sha256/{mh}/link", md.encode())
print(f"{count} images written")
