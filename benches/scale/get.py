#!/usr/bin/env python3
"""Manifest GET by tag against one node of a cluster filled by fill.py: COUNT requests for
random tags among the first IMAGES images, on one keep-alive connection, twice (the first pass
warms caches); prints the second pass's p50 and p99. Usage: get.py NODE COUNT IMAGES
(e.g. get.py 127.0.0.1:5003 5000 20000 for a follower of cluster/local/up.sh).
"""
import http.client, random, sys, time
node, n, images = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
random.seed(1)
c = http.client.HTTPConnection(node, timeout=10)
for _ in range(2):
    lat = []
    for _ in range(n):
        i = random.randrange(images)
        t = time.perf_counter()
        c.request("GET", f"/v2/scale/r{i % 200}/manifests/t{i}",
                  headers={"accept": "application/vnd.oci.image.manifest.v1+json"})
        r = c.getresponse(); r.read()
        lat.append(time.perf_counter() - t)
        if r.status != 200:
            sys.exit(f"t{i}: {r.status}")
lat.sort()
print(f"{node}: p50 {lat[len(lat) // 2] * 1000:.3f} ms p99 {lat[int(len(lat) * 0.99)] * 1000:.3f} ms")
