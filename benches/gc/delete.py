#!/usr/bin/env python3
"""Deletes every other image fill.py pushed (tags t<i> with odd i, in bench/r<i % 100>): looks up
each manifest's digest by its tag, then DELETEs the manifest by digest, as `docker` /
`skopeo delete` do. Usage: delete.py URL COUNT [THREADS]
"""
import sys, threading, time, http.client, urllib.parse

url = urllib.parse.urlparse(sys.argv[1]); count = int(sys.argv[2])
threads = int(sys.argv[3]) if len(sys.argv) > 3 else 8
ACCEPT = "application/vnd.oci.image.manifest.v1+json"
done = [0]; lock = threading.Lock()

def work(k):
    c = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    for i in range(1 + 2 * k, count, 2 * threads):
        repo = f"bench/r{i % 100}"
        c.request("HEAD", f"/v2/{repo}/manifests/t{i}", headers={"accept": ACCEPT})
        r = c.getresponse(); r.read()
        if r.status != 200: raise Exception(f"{repo}:t{i}: {r.status}")
        d = r.getheader("docker-content-digest")
        c.request("DELETE", f"/v2/{repo}/manifests/{d}")
        r = c.getresponse(); r.read()
        if r.status != 202: raise Exception(f"delete {repo}@{d}: {r.status}")
        with lock: done[0] += 1

t0 = time.time()
ts = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
[t.start() for t in ts]; [t.join() for t in ts]
print(f"{done[0]} images deleted in {time.time() - t0:.1f} s")
