"""From measured costs to fleet sizes: how many H200s one Redis core, one NIC and one producer feed.

Everything here is arithmetic on two kinds of figures, kept apart in the output:
  measured      on the machine that ran the simulation: Redis CPU-seconds and bytes per million
                documents (publishing and consuming), the producer's documents per second
  H200 rates    one worker's end-to-end documents per second on one H200, measured by `embedq bench`
                (README, Performance, 2026-11-30)
The fleet sizes are extrapolated: Redis's main thread is taken as usable up to one full core and
its cost per document as constant (at low load it is higher, as commands batch less, so this errs
low); a NIC as full duplex at `nic_gbit` each way; the producer's rate as this machine's.
"""

from __future__ import annotations

from typing import Any

# One worker on one H200, end to end, documents/s (README "GPU: one NVIDIA H200, 2026-11-30,
# performance round 2"). BERT-base passages tokenized in the worker is derived: 1.91M tokens/s
# over 122.7 tokens per passage.
H200_DOCS_PER_S: dict[str, dict[tuple[str, bool], float]] = {
    "minilm": {("glosses", True): 161_400, ("glosses", False): 150_100,
               ("passages", True): 47_900, ("passages", False): 47_300},
    "bert-base": {("glosses", True): 77_600, ("glosses", False): 71_200,
                  ("passages", True): 15_900, ("passages", False): 15_600},
}


def _cost(windows: list[dict[str, Any]], key: str) -> float | None:
    """A per-million-documents cost over several windows, weighted by their documents."""
    docs = sum(w["documents"] for w in windows)
    if not docs:
        return None
    return sum(w[key] * w["documents"] for w in windows) / docs


def _whole_runs(cases: list[dict[str, Any]], schedule: str) -> list[dict[str, Any]]:
    """Whole-run figures of the runs that completed (all they read, they committed), else of all."""
    runs = [c for c in cases if c["schedule"] == schedule and "fleet_whole" in c and c["fleet_whole"]["documents"]]
    return [c["fleet_whole"] for c in [c for c in runs if c["complete"]] or runs]


def extrapolate(cases: list[dict[str, Any]], *, nic_gbit: float = 25.0) -> list[dict[str, Any]]:
    """One row per (corpus, pretokenized): the measured costs, and the H200s each part feeds."""
    rows = []
    for corpus, pretokenized in sorted({(c["corpus"], c["pretokenized"]) for c in cases}):
        mine = [c for c in cases if c["corpus"] == corpus and c["pretokenized"] == pretokenized and "error" not in c]
        publishing = [c["producer"] for c in mine if "producer" in c and c["producer"]["documents"]]
        consuming, live = _whole_runs(mine, "drain"), False
        if not consuming:  # live runs: everything Redis did, less what publishing cost
            consuming, live = _whole_runs(mine, "live"), True
        if not publishing or not consuming:
            continue
        alone = [c for c in mine if c["schedule"] == "producer" and c["producer"]["documents"]]
        one = [c["producer"] for c in alone if c["producers"] == 1] or publishing
        measured: dict[str, Any] = {
            "producer_docs_per_s": max(p["docs_per_s"] for p in one),  # one producer
            "producer_cores_busy": max(p["producer_cores_busy"] for p in one),
            "producers_docs_per_s": {c["producers"]: c["producer"]["docs_per_s"] for c in alone},
        }
        for side, windows in (("publish", publishing), ("consume", consuming)):
            for key in ("redis_cpu_s_per_m_docs", "redis_in_bytes_per_doc", "redis_out_bytes_per_doc",
                        "redis_commands_per_doc"):
                measured[f"{side}_{key}"] = _cost(windows, key)
        if live:  # the live windows hold publishing too
            for key in ("redis_cpu_s_per_m_docs", "redis_in_bytes_per_doc", "redis_out_bytes_per_doc",
                        "redis_commands_per_doc"):
                measured[f"consume_{key}"] = max(0.0, measured[f"consume_{key}"] - measured[f"publish_{key}"])
        cpu = measured["publish_redis_cpu_s_per_m_docs"] + measured["consume_redis_cpu_s_per_m_docs"]
        wire = max(measured["publish_redis_in_bytes_per_doc"] + measured["consume_redis_in_bytes_per_doc"],
                   measured["publish_redis_out_bytes_per_doc"] + measured["consume_redis_out_bytes_per_doc"])
        walls = {"redis_core": 1e6 / cpu if cpu > 0 else float("inf"),
                 "nic": nic_gbit * 1e9 / 8 / wire if wire > 0 else float("inf"),
                 "producer": measured["producer_docs_per_s"]}
        h200s = {}
        for model, rates in H200_DOCS_PER_S.items():
            if (corpus, pretokenized) not in rates:  # a corpus without H200 figures: the walls alone
                continue
            per_gpu = rates[(corpus, pretokenized)]
            fed = {wall: docs / per_gpu for wall, docs in walls.items()}
            first = min(fed, key=lambda wall: fed[wall])
            h200s[model] = {"per_h200_docs_per_s": per_gpu, **{f"{w}_h200s": v for w, v in fed.items()},
                            "first_wall": first}
        rows.append({"corpus": corpus, "pretokenized": pretokenized, "measured": measured,
                     "consume_cost_from": "live minus publish" if live else "drain",
                     "extrapolated": {"docs_per_s_at": walls, "nic_gbit": nic_gbit, "h200s": h200s}})
    return rows
