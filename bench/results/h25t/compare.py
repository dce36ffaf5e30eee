import json, sys
def load(p):
    d = {}
    for line in open(p):
        parts = line.split()
        if len(parts) == 2 and len(parts[0]) == 64:
            d[parts[1]] = parts[0]
    return d
b, a = load("/tmp/h25t/before.sha"), load("/tmp/h25t/after.sha")
assert b.keys() == a.keys(), (b.keys() ^ a.keys())
same = [k for k in b if b[k] == a[k]]
diff = [k for k in b if b[k] != a[k]]
print(f"{len(same)}/{len(b)} files byte-identical; differing: {diff}")
# blockap_summary.json holds wall-clock seconds: compare without them
def strip(x):
    if isinstance(x, dict): return {k: strip(v) for k, v in x.items() if k != "seconds"}
    if isinstance(x, list): return [strip(v) for v in x]
    return x
for k in diff:
    if k.endswith("blockap_summary.json"):
        s1 = strip(json.load(open("/tmp/h25t/before_saved/" + k))); s2 = strip(json.load(open("/tmp/h25t/before/" + k)))
        print(k, "equal without 'seconds':", s1 == s2)
