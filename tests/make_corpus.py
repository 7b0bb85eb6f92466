"""Build the real-text test corpora from Debian's WordNet package (a copy of shared/corpus/make.py).

    python3 ../shared/corpus/make.py OUTDIR          # needs: apt-get download wordnet-base (done for you)

Writes OUTDIR/glosses.parquet (about 117k short definitions, id + text) and OUTDIR/passages.parquet
(glosses joined into passages of 20 to 400 words, a length spread like chunked documents).
"""
import os
import random
import subprocess
import sys
import tempfile

import pyarrow as pa
import pyarrow.parquet as pq


def glosses():
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["apt-get", "download", "-q", "wordnet-base"], cwd=tmp, check=True, capture_output=True)
        deb = next(f for f in os.listdir(tmp) if f.endswith(".deb"))
        subprocess.run(["dpkg", "-x", deb, "x"], cwd=tmp, check=True)
        out = []
        for pos in ("noun", "verb", "adj", "adv"):
            for line in open(f"{tmp}/x/usr/share/wordnet/data.{pos}", encoding="latin-1"):
                if not line.startswith("  ") and "|" in line:
                    out.append(line.split("|", 1)[1].strip())
        return out

def passages(texts, rng):
    out, i = [], 0
    while i < len(texts):
        target, words, cur = int(rng.lognormvariate(4.3, 0.7)), 0, []
        while i < len(texts) and words < min(max(target, 20), 400):
            cur.append(texts[i]); words += len(texts[i].split()); i += 1
        out.append(" ".join(cur))
    return out

if __name__ == "__main__":
    outdir = sys.argv[1]; os.makedirs(outdir, exist_ok=True)
    rng = random.Random(11)
    g = glosses()
    for name, texts in (("glosses", g), ("passages", passages(g, rng))):
        pq.write_table(pa.table({"id": [f"{name}-{i}" for i in range(len(texts))], "text": texts}),
                       f"{outdir}/{name}.parquet", compression="zstd")
        n = sorted(len(t.split()) for t in texts)
        print(f"{name}: {len(texts)} docs, words p50 {n[len(n)//2]} p90 {n[int(.9*len(n))]} max {n[-1]}")
