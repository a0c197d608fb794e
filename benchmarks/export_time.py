"""Export time of SmolLM2-135M to every format, each export verified by read-back as in production.

One round-to-nearest checkpoint per plan (uniform W4A16G32, which every format holds, and a mixed
plan from the planner's no-data sensitivity at ``--mixed-bits`` for the formats that take mixed
bits), then ``arctl_exporter.engine.export`` once per format into a fresh folder, timed from the
call to the renamed folder (packing, writing, verification read-back, manifest). The target of
the exporter issue is under 30 s per format on this 2-core machine. Prints a table and writes
``benchmarks/results/export_time.json``.

    python benchmarks/export_time.py [--repeats 1] [--mixed-bits 4.5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from arctl.models import load_model
from arctl.schemes import get_scheme
from arctl_cli.pipeline import folder_bytes
from arctl_exporter.engine import export
from arctl_planner.engine import PlanRequest, plan_model, plan_uniform
from arctl_tuner.config import TuneConfig
from arctl_tuner.engine import tune_model

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "export_time.json"
TARGET_S = 30.0
UNIFORM_FORMATS = ("auto_round", "auto_gptq", "auto_awq", "compressed-tensors", "gguf")
MIXED_FORMATS = ("auto_round", "auto_gptq", "compressed-tensors", "gguf")
# The mixed plan's candidates: symmetric INT that every mixed-bit format above can hold.
MIXED_SCHEMES = ("W2A16G32", "W3A16G32", "W4A16G32", "W8A16G32")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def time_exports(checkpoint: Path, formats: tuple[str, ...], work: Path, repeats: int) -> list[dict[str, Any]]:
    rows = []
    for name in formats:
        seconds = []
        size = 0.0
        for _ in range(repeats):
            out = work / f"export-{name}"
            shutil.rmtree(out, ignore_errors=True)
            started = time.perf_counter()
            written = export(checkpoint, [name], out)[name]
            seconds.append(round(time.perf_counter() - started, 2))
            size = round(folder_bytes(written) / 1e6, 1)
        rows.append({"format": name, "seconds": seconds, "best_s": min(seconds), "size_mb": size,
                     "under_target": max(seconds) < TARGET_S})
        log(f"  {name}: {seconds} s, {size} MB")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--mixed-bits", type=float, default=4.5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    loaded = load_model("smollm2")
    uniform = plan_uniform(loaded, get_scheme("W4A16G32"))
    request = PlanRequest(targets=(args.mixed_bits,), schemes=tuple(get_scheme(s) for s in MIXED_SCHEMES),
                          sensitivity="weight")
    mixed = plan_model(loaded, request)[0]
    results = []
    with tempfile.TemporaryDirectory(prefix="arctl-export-time-") as tmp:
        work = Path(tmp)
        for label, plan, formats in (("W4A16G32", uniform, UNIFORM_FORMATS),
                                     (f"mixed {args.mixed_bits:g}", mixed, MIXED_FORMATS)):
            log(f"{label}: round-to-nearest checkpoint ({plan.avg_bits:.4f} true bits)")
            checkpoint = tune_model(loaded, plan, work / f"checkpoint-{len(results)}", TuneConfig(iters=0), None)
            for row in time_exports(checkpoint, formats, work, args.repeats):
                results.append({"plan": label, "true_bits": round(plan.avg_bits, 4), **row})
    print()
    print(f"{'plan':12s} {'format':20s} {'seconds':>9s} {'MB':>7s}  < {TARGET_S:g} s")
    for row in results:
        print(f"{row['plan']:12s} {row['format']:20s} {row['best_s']:9.2f} {row['size_mb']:7.1f}  {row['under_target']}")
    record = {
        "settings": {"model": "SmolLM2-135M-Instruct (embedded GGUF, dequantized to float32)", "repeats": args.repeats,
                     "quantization": "round-to-nearest", "timed": "arctl_exporter.engine.export, one format per call",
                     "mixed_plan": f"plan_model sensitivity=weight, candidates {', '.join(MIXED_SCHEMES)}"},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_average_1m_after": round(os.getloadavg()[0], 2)},
        "target_s": TARGET_S,
        "rows": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
