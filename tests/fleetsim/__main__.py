"""python -m tests.fleetsim: the fleet simulation's command line (see the package docstring)."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

from embedq.connection import RedisServer
from embedq.model import default_model_path, load_model_info
from tests.fleetsim.corpus import CopiedCorpus, CorpusFacts, corpus_facts
from tests.fleetsim.extrapolate import extrapolate
from tests.fleetsim.fleet import DEVICE, DRAIN, LIVE, PRODUCER_ALONE, Case, Fleet, FleetOptions
from tests.fleetsim.roles import PROTOCOL

# Padded tokens/s of MiniLM on one H200 (GPU-only), as tests.hostbench simulates it.
H200_RATES = {"glosses": 4e6, "passages": 8.6e6}


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.fleetsim", description=__doc__)
    parser.add_argument("--corpus", nargs="+", default=["glosses", "passages"])
    parser.add_argument("--corpus-dir", default=str(Path.home() / ".cache" / "embedq-test-corpus"))
    parser.add_argument("--tokenize", nargs="+", choices=["producer", "worker"], default=["producer", "worker"])
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--mode", nargs="+", choices=[DEVICE, PROTOCOL], default=[DEVICE],
                        help="device: the real worker on a simulated H200; protocol: Redis traffic only")
    parser.add_argument("--schedule", nargs="+", choices=[LIVE, DRAIN], default=[LIVE])
    parser.add_argument("--seconds", type=float, default=6.0, help="measured seconds of each phase")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--rate-glosses", type=float, default=H200_RATES["glosses"], help="padded tokens/s")
    parser.add_argument("--rate-passages", type=float, default=H200_RATES["passages"], help="padded tokens/s")
    parser.add_argument("--producer-processes", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                        help="tokenizer processes of a pretokenizing producer (as `embedq produce --pretokenize`)")
    parser.add_argument("--producers", nargs="+", type=int, default=[1],
                        help="producers per job, each publishing one slice of the source (--slice K/N)")
    parser.add_argument("--producer-docs", type=int, default=3_000_000, help="source size when the producer runs alone")
    parser.add_argument("--max-docs", type=int, default=20_000_000)
    parser.add_argument("--docs", type=int, default=None,
                        help="source size of the cases with workers (default: about --seconds of work)")
    parser.add_argument("--window-docs", type=int, default=16384)
    parser.add_argument("--batch-size", type=int, default=512, help="documents per stream message")
    parser.add_argument("--nic-gbit", type=float, default=25.0, help="NIC speed each way, for the extrapolation")
    parser.add_argument("--compress", action="store_true", help="producers compress each message with zstd")
    parser.add_argument("--out", default="fleetsim.json")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, sources)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    signal.signal(signal.SIGTERM, _interrupted)  # so that a stopped run still stops its fleet
    rates = {"glosses": args.rate_glosses, "passages": args.rate_passages}
    options = FleetOptions(rates=rates, seconds=args.seconds, warmup=args.warmup, window_docs=args.window_docs,
                           batch_size=args.batch_size,
                           producer_processes=args.producer_processes, compress=args.compress)
    work_dir = Path(tempfile.mkdtemp(prefix="embedq-fleetsim-"))
    server = RedisServer(directory=work_dir / "redis").start()
    model = load_model_info(default_model_path())
    cases: list[dict[str, Any]] = []
    report: dict[str, Any] = {"date": datetime.date.today().isoformat(), "machine": machine(server.url),
                              "command": "python -m tests.fleetsim " + " ".join(sys.argv[1:] if argv is None else argv),
                              "options": {**vars(args), "rates": rates}, "corpora": {}, "cases": cases}
    try:
        fleet = Fleet(options, server.url, work_dir)
        for name in args.corpus:
            path = Path(name) if name.endswith(".parquet") else Path(args.corpus_dir) / f"{name}.parquet"
            facts = corpus_facts(path.stem, path, model, 65536)
            rates.setdefault(facts.name, rates["passages"])
            copies = CopiedCorpus(path, work_dir / "sources" / facts.name)
            report["corpora"][facts.name] = {"documents": facts.documents, "mean_tokens": facts.mean_tokens,
                                             "mean_padded_tokens": facts.mean_padded_tokens,
                                             "device_docs_per_s": facts.device_docs_per_s(rates[facts.name])}
            for tokenize in args.tokenize:
                run_corpus(fleet, args, facts, copies, tokenize == "producer", cases)
        report["extrapolation"] = extrapolate(cases, nic_gbit=args.nic_gbit)
    finally:
        server.stop()
        if not args.keep:
            shutil.rmtree(work_dir, ignore_errors=True)
        Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    print_extrapolation(report["extrapolation"])
    print(f"wrote {args.out}" + (f"; logs and sources in {work_dir}" if args.keep else ""))


def run_corpus(fleet: Fleet, args: argparse.Namespace, facts: CorpusFacts, copies: CopiedCorpus,
               pretokenized: bool, cases: list[dict[str, Any]]) -> None:
    """For each number of producers: the producers alone, then every (schedule, mode, workers) case."""
    o = fleet.options
    for k in sorted(args.producers):
        alone = run_case(fleet, Case(facts.name, pretokenized, 0, DEVICE, PRODUCER_ALONE, k), facts, copies,
                         args.producer_docs, cases)
        producer_rate = alone.get("producer", {}).get("docs_per_s") or 1e6
        for schedule in args.schedule:
            for mode in args.mode:
                per_worker = facts.device_docs_per_s(o.rates[facts.name]) if mode == DEVICE else producer_rate
                for n in sorted(args.workers):
                    # About `seconds` of work, so that the job completes (its costs are then exact);
                    # a case that runs past the time limit is stopped and marked incomplete.
                    wanted = n * per_worker if schedule == DRAIN else min(n * per_worker, producer_rate)
                    docs = args.docs or int(min(args.max_docs, wanted * (o.warmup / 2 + o.seconds)))
                    result = run_case(fleet, Case(facts.name, pretokenized, n, mode, schedule, k), facts, copies,
                                      docs, cases)
                    if "fleet" in result:  # more workers do no better per worker than these did
                        per_worker = max(result["fleet"]["docs_per_s"] / n, 1.0)


def run_case(fleet: Fleet, case: Case, facts: CorpusFacts, copies: CopiedCorpus, documents: int,
             cases: list[dict[str, Any]]) -> dict[str, Any]:
    source, size = copies.source(documents)
    result = fleet.run(case, facts, source, size)
    cases.append(result)
    print_case(result)
    return result


def print_case(result: dict[str, Any]) -> None:
    label = f"{result['case']:<42}"
    if "error" in result:
        print(f"{label} ERROR {result['error']}", flush=True)
        return
    line = []
    if "producer" in result:
        p = result["producer"]
        line.append(f"producer {p['docs_per_s']:>10,.0f} docs/s ({p['producer_cores_busy']:.1f} cores), "
                    f"Redis {p['redis_cpu_s_per_m_docs']:.2f} cpu-s/M docs, in {p['redis_in_bytes_per_doc']:.0f} B/doc")
    if "fleet" in result:
        f, whole = result["fleet"], result["fleet_whole"]
        fed = f", devices fed {result['devices_fed']:.0%}" if "devices_fed" in result else ""
        line.append(f"fleet {f['docs_per_s']:>10,.0f} docs/s {f['tokens_per_s'] / 1e6:6.2f}M tok/s, "
                    f"Redis core {f['redis_core_busy']:.0%}, host {f['host_cores_busy']:.1f} cores{fed}; whole run "
                    f"{'' if result['complete'] else '(stopped) '}{whole['redis_cpu_s_per_m_docs']:.2f} Redis "
                    f"cpu-s/M docs, out {whole['redis_out_bytes_per_doc']:.0f} B/doc")
    print(f"{label} " + "; ".join(line), flush=True)


def print_extrapolation(rows: list[dict[str, Any]]) -> None:
    print("\nExtrapolated H200s fed (measured costs on this machine; see tests/fleetsim/extrapolate.py):")
    for row in rows:
        m, nic = row["measured"], row["extrapolated"]["nic_gbit"]
        wire_in = m["publish_redis_in_bytes_per_doc"] + m["consume_redis_in_bytes_per_doc"]
        wire_out = m["publish_redis_out_bytes_per_doc"] + m["consume_redis_out_bytes_per_doc"]
        print(f"  {row['corpus']} {'pretokenized' if row['pretokenized'] else 'texts'}: Redis "
              f"{m['publish_redis_cpu_s_per_m_docs']:.2f} + {m['consume_redis_cpu_s_per_m_docs']:.2f} cpu-s/M docs "
              f"(publish + consume), wire in {wire_in:.0f} / out {wire_out:.0f} B/doc, "
              f"producer {m['producer_docs_per_s']:,.0f} docs/s")
        for model, h in row["extrapolated"]["h200s"].items():
            print(f"    {model:<9}: Redis core {h['redis_core_h200s']:6.1f}, {nic:.0f} Gbit/s NIC "
                  f"{h['nic_h200s']:6.1f}, "
                  f"producer {h['producer_h200s']:5.1f} H200s -> first wall: {h['first_wall']}")


def machine(redis_url: str) -> dict[str, Any]:
    import redis

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return {"cores": os.cpu_count(), "cpu": model, "python": platform.python_version(),
            "redis": redis.Redis.from_url(redis_url).info("server")["redis_version"]}


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    main()
