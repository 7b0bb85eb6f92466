"""`embedq bench`: the end-to-end throughput of a real job, against the ceilings around it.

For each scenario (corpus x model x where tokenization happens; every job chunked as `--chunk`
says, or not) one run measures, on one device:

    tokenizer alone     the `tokenizers` library on all cores, and embedq's tokenizer pool
    sentence-transformers `encode` on the same texts and model (the baseline people use)
    GPU-only ceiling    the same engine on the same buckets, inputs already padded in host memory
    end to end          a real Redis stream (already filled by the producer), the worker with its
                        tokenizer pool or pretokenized messages, real Parquet parts, commits

and the padding waste, GPU busy fraction (NVML), peak host RSS (worker and tokenizer processes),
peak GPU memory, peak Redis memory, and throughput per stage over time (a PNG). Results go to
stdout as a table and to a JSON file. BERT-base is a random-weight model of that shape (speed
only); MiniLM is the real all-MiniLM-L6-v2.

Modules: `run` (the whole bench), `scenarios` (settings and results), `end_to_end` (one scenario),
`workload` (the sequences the worker embeds: documents, or chunks), `ceilings` (tokenizer, GPU-only,
sentence-transformers), `precision`, `sampling`, `corpus` (and the long documents),
`random_model`, `report` (table, JSON), `plot`.
"""

from embedq.bench.corpus import load_corpus, write_corpus
from embedq.bench.plot import plot, replot
from embedq.bench.random_model import SHAPES, build_random_model
from embedq.bench.run import run_bench
from embedq.bench.scenarios import Result, Scenario

__all__ = ["SHAPES", "Result", "Scenario", "build_random_model", "load_corpus", "plot", "replot", "run_bench",
           "write_corpus"]
