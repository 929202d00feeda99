#!/usr/bin/env python3
"""Fills a registry through its API. Usage:
  fill.py URL small COUNT [THREADS]   COUNT small images (one 1 KiB layer, a config, a manifest),
                                      tagged t<i> in 100 repositories bench/r<i % 100>
  fill.py URL large MIB               one image whose single layer is MIB MiB, bench/large:v1
"""
import hashlib, json, os, sys, threading, time, http.client, urllib.parse

url = urllib.parse.urlparse(sys.argv[1]); mode = sys.argv[2]
def conn(): return http.client.HTTPConnection(url.hostname, url.port, timeout=300)

def push_blob(c, repo, body, digest, size):
    c.request("POST", f"/v2/{repo}/blobs/uploads/", body=b"", headers={"content-length": "0"})
    r = c.getresponse(); r.read()
    if r.status != 202: raise Exception(f"upload start {repo}: {r.status}")
    loc = urllib.parse.urlparse(r.getheader("location"))
    path = loc.path + ("?" + loc.query + "&" if loc.query else "?") + f"digest={digest}"
    c.request("PUT", path, body=body, headers={"content-length": str(size), "content-type": "application/octet-stream"})
    r = c.getresponse(); r.read()
    if r.status != 201: raise Exception(f"blob {digest}: {r.status}")

def push_manifest(c, repo, tag, config, layers):
    m = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config[0], "size": config[1]},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d, "size": s} for d, s in layers]}).encode()
    c.request("PUT", f"/v2/{repo}/manifests/{tag}", body=m, headers={"content-type": "application/vnd.oci.image.manifest.v1+json"})
    r = c.getresponse(); r.read()
    if r.status != 201: raise Exception(f"manifest {repo}:{tag}: {r.status}")

def small(count, threads):
    done = [0]; lock = threading.Lock()
    def work(k):
        c = conn()
        for i in range(k, count, threads):
            repo = f"bench/r{i % 100}"
            layer = (f"layer {i} ".encode() * 120)[:1024]
            cfg = json.dumps({"architecture": "amd64", "os": "linux", "i": i}).encode()
            blobs = []
            for b in (layer, cfg):
                d = "sha256:" + hashlib.sha256(b).hexdigest()
                push_blob(c, repo, b, d, len(b)); blobs.append((d, len(b)))
            push_manifest(c, repo, f"t{i}", blobs[1], [blobs[0]])
            with lock: done[0] += 1
    ts = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    [t.start() for t in ts]; [t.join() for t in ts]
    return done[0]

def large(mib):
    chunk = os.urandom(1 << 20); h = hashlib.sha256()
    for _ in range(mib): h.update(chunk)
    d = "sha256:" + h.hexdigest(); size = mib << 20
    def gen():
        for _ in range(mib): yield chunk
    c = conn(); push_blob(c, "bench/large", gen(), d, size)
    cfg = b'{"architecture":"amd64","os":"linux"}'; cd = "sha256:" + hashlib.sha256(cfg).hexdigest()
    push_blob(c, "bench/large", cfg, cd, len(cfg))
    push_manifest(c, "bench/large", "v1", (cd, len(cfg)), [(d, size)])
    return 1

t0 = time.time()
n = small(int(sys.argv[3]), int(sys.argv[4]) if len(sys.argv) > 4 else 8) if mode == "small" else large(int(sys.argv[3]))
print(f"{n} images in {time.time() - t0:.1f} s")
