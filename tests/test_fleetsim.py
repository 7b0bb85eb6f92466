"""The fleet simulation (`python -m tests.fleetsim`): a bounded run end to end, and its arithmetic."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT
from tests.fleetsim.extrapolate import H200_DOCS_PER_S, extrapolate


def window(documents: int, cpu: float, into: float, out: float, rate: float = 1e5) -> dict[str, Any]:
    return {"documents": documents, "docs_per_s": rate, "producer_cores_busy": 1.0, "redis_cpu_s_per_m_docs": cpu,
            "redis_in_bytes_per_doc": into, "redis_out_bytes_per_doc": out, "redis_commands_per_doc": 0.01}


def test_the_first_wall_is_the_part_that_feeds_the_fewest_gpus() -> None:
    cases = [
        {"corpus": "glosses", "pretokenized": False, "schedule": "producer", "producers": 1, "workers": 0,
         "producer": window(10**6, 0.25, 100, 5, rate=600_000)},
        {"corpus": "glosses", "pretokenized": False, "schedule": "drain", "producers": 1, "workers": 2,
         "complete": True, "producer": window(10**6, 0.25, 100, 5, rate=600_000),
         "fleet_whole": window(10**6, 0.15, 10, 95)},
    ]
    [row] = extrapolate(cases, nic_gbit=0.1)  # a NIC slow enough to be the limit
    walls = row["extrapolated"]["docs_per_s_at"]
    assert walls["redis_core"] == pytest.approx(1e6 / 0.40)  # publishing and consuming, one core
    assert walls["nic"] == pytest.approx(0.1e9 / 8 / 110)  # the busier direction: 100 + 10 bytes in
    assert walls["producer"] == 600_000
    minilm = row["extrapolated"]["h200s"]["minilm"]
    assert minilm["producer_h200s"] == pytest.approx(600_000 / H200_DOCS_PER_S["minilm"][("glosses", False)])
    assert minilm["first_wall"] == "nic"
    roomy = extrapolate(cases, nic_gbit=400)[0]["extrapolated"]["h200s"]["minilm"]
    assert roomy["first_wall"] == "producer"


def test_a_small_fleet_runs_end_to_end_and_reports_its_curve(corpus_dir: Path, tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    small = tmp_path / "glosses-small.parquet"
    pq.write_table(pq.read_table(corpus_dir / "glosses.parquet").slice(0, 3000), small)
    out = tmp_path / "fleet.json"
    subprocess.run([sys.executable, "-m", "tests.fleetsim", "--corpus", str(small), "--tokenize", "worker",
                    "--workers", "1", "--producers", "2", "--mode", "device", "protocol", "--seconds", "2",
                    "--warmup", "0.5", "--producer-docs", "20000", "--docs", "6000", "--out", str(out)],
                   cwd=ROOT, check=True, timeout=300, capture_output=True)
    report = json.loads(out.read_text())
    cases = {c["case"]: c for c in report["cases"]}
    assert not [c["error"] for c in cases.values() if "error" in c]
    assert cases["glosses-small texts producer 2p 0xdevice"]["producer"]["docs_per_s"] > 0
    live = cases["glosses-small texts live 2p 1xdevice"]
    assert live["complete"] and live["fleet"]["docs_per_s"] > 0 and live["fleet_whole"]["redis_cpu_s_per_m_docs"] > 0
    assert cases["glosses-small texts live 2p 1xprotocol"]["complete"]
