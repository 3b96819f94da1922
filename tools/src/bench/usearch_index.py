"""Builds a reference DB's usearch.index the way the seeds' build_usearch_index.py does, for `deckhand
bench delta`.

Run by the bench as `python3 usearch_index.py EMBEDDINGS.npy OUT.index CONNECTIVITY EXPANSION_ADD
THREADS`: it loads the float32 matrix with numpy, adds every row under its row number to a new cosine
index of f32 vectors in one `add` (THREADS 0 is usearch's default, every core, as a script that does not
say leaves it; on several threads the vectors land in the file in the order the threads add them) and
saves it. A release rebuilds the index from all its embeddings, so the graph of an updated DB is a new
graph. It prints one JSON line: {"usearch", "numpy", "rows"}.

When numpy or usearch cannot be imported it prints {"missing": "..."} and exits 0: the bench says so and
builds the index with the usearch crate instead.
"""

import json
import sys

try:
    import numpy as np
    import usearch
    from usearch.index import Index
except ImportError as e:  # the bench reports it
    print(json.dumps({"missing": str(e)}))
    sys.exit(0)


def main():
    npy, out = sys.argv[1], sys.argv[2]
    connectivity, expansion_add, threads = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    vectors = np.load(npy)
    index = Index(
        ndim=vectors.shape[1],
        metric="cos",
        dtype="f32",
        connectivity=connectivity,
        expansion_add=expansion_add,
        expansion_search=64,
    )
    index.add(np.arange(len(vectors), dtype=np.uint64), vectors, threads=threads)
    index.save(out)
    print(json.dumps({"usearch": usearch.__version__, "numpy": np.__version__, "rows": len(vectors)}))


if __name__ == "__main__":
    main()
