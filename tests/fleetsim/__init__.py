"""The fleet simulation: how many GPUs one Redis, one producer and one stream feed.

`tests.hostbench`'s simulated device (a queue in another process that takes `padded tokens / rate`
seconds a batch) under N real worker processes, one real producer and a private redis-server, on
one job. It samples the job's committed documents, Redis's main-thread CPU and network bytes, the
producer's rate and the CPU of the host and of each process tree, and writes JSON: the curve
(workers against documents/s and Redis CPU) and an extrapolation, labelled as such, of how many
H200s one Redis core, one NIC and one producer feed (`extrapolate.py`).

    python -m tests.fleetsim                                          # glosses, passages; texts and
                                                                      # pretokenized; 1, 2, 4 workers
    python -m tests.fleetsim --mode protocol --schedule drain --workers 1 2   # Redis's own ceiling

On a machine with few cores the workers are bound by the host, not the simulated device; what
carries over is then the cost per million documents (Redis CPU-seconds, bytes), not the rates.
`--mode protocol` replaces the workers by processes that only do a worker's Redis traffic
(`roles.py`), so that a few cores can push Redis to its limit.
"""
