"""Seed tables for SmolLM2-135M: average zero-shot accuracy of float, RTN and tuned models.

Rows: the float model; for each of W4A16G64 (INT4 g64), W3A16G64 (INT3), W2A16G32_ASYM (INT2),
MXFP4 and NVFP4 a uniform plan, round-to-nearest and tuned by arctl's SignRound; and mixed plans at
4.5 / 5 / 6 true average bits (arctl's planner, Fisher sensitivity, one measurement for the three
budgets), RTN and tuned. Each model is evaluated by ``arctl.tasks`` (lm-evaluation-harness
protocols) on the first ``--limit`` documents of lambada_openai, hellaswag, piqa, winogrande and
arc_easy (their mean ``acc`` is the table's average, as in AutoRound's tables), plus WikiText-2
token perplexity on ``--wikitext-windows`` windows of 2048 tokens.

The defaults are sized to finish in about an hour on the 2-core CPU machine (tuning: 32 x 128 tokens
of C4, 20 iterations, as benchmarks/tuner_vs_autoround.py); ``--limit`` items per task keeps the
standard error of each task near 0.05 at 100 items, so differences smaller than that are noise.
Prints the table and writes ``benchmarks/results/seed_tables.json``.

    python benchmarks/seed_tables.py [--limit 100] [--iters 20] [--nsamples 32] [--seqlen 128]
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from arctl.checkpoint import read_checkpoint
from arctl.data import calibration_samples
from arctl.models import load_checkpoint_model, load_model
from arctl.plan import Plan
from arctl.schemes import get_scheme
from arctl.tasks.registry import ZERO_SHOT_AVERAGE, parse_tasks
from arctl.tasks.runner import TaskSettings, run_tasks, zero_shot_average
from arctl_planner.engine import (
    CALIBRATION_DATASET,
    CALIBRATION_NSAMPLES,
    CALIBRATION_SEED,
    CALIBRATION_SEQLEN,
    PlanRequest,
    plan_model,
    plan_uniform,
)
from arctl_tuner.config import TuneConfig
from arctl_tuner.engine import tune_model

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "seed_tables.json"
SCHEMES = ("W4A16G64", "W3A16G64", "W2A16G32_ASYM", "MXFP4", "NVFP4")
MIXED_BITS = (4.5, 5.0, 6.0)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def evaluate(model: torch.nn.Module, tokenizer: Any, settings: TaskSettings) -> dict[str, Any]:
    started = time.perf_counter()
    results = run_tasks(model, tokenizer, parse_tasks(["wikitext2", *ZERO_SHOT_AVERAGE]), settings)
    return {
        "tasks": {r.task: {"acc": r.metrics["acc"].value, "acc_stderr": r.metrics["acc"].stderr} for r in results if "acc" in r.metrics},
        "average": zero_shot_average(results),
        "wikitext2_ppl": next(r.metrics["ppl"].value for r in results if r.task == "wikitext2"),
        "eval_s": round(time.perf_counter() - started, 1),
    }


def run_plan(loaded, plan: Plan, method: str, config: TuneConfig, calibration, work: Path, settings: TaskSettings) -> dict[str, Any]:
    out = work / "checkpoint"
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    if method == "rtn":
        path = tune_model(loaded, plan, out, TuneConfig(iters=0), None)
    else:
        path = tune_model(loaded, plan, out, config, calibration)
    quantize_s = round(time.perf_counter() - started, 1)
    model = load_checkpoint_model(read_checkpoint(path))
    row = {"bits": round(plan.avg_bits, 4), "quantize_s": quantize_s, **evaluate(model, loaded.tokenizer, settings)}
    del model
    gc.collect()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--wikitext-windows", type=int, default=2)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--schemes", default=",".join(SCHEMES))
    parser.add_argument("--mixed", default=",".join(map(str, MIXED_BITS)), help="Mixed-plan budgets ('' for none).")
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    started = time.perf_counter()
    settings = TaskSettings(limit=args.limit, batch_size=16, wikitext_windows=args.wikitext_windows, data_dir=args.data_dir)
    config = TuneConfig(iters=args.iters, nsamples=args.nsamples, seqlen=args.seqlen, batch_size=args.batch_size, seed=args.seed)
    loaded = load_model("smollm2")
    calibration = calibration_samples(loaded.tokenizer, "c4", args.nsamples, args.seqlen, seed=args.seed, data_dir=args.data_dir)
    rows: list[dict[str, Any]] = []
    log("float")
    rows.append({"name": "float", "method": "float", **evaluate(loaded.model, loaded.tokenizer, settings), "bits": None})
    plans = [(name, plan_uniform(loaded, get_scheme(name))) for name in filter(None, args.schemes.split(","))]
    budgets = tuple(float(b) for b in filter(None, args.mixed.split(",")))
    plan_s = None
    if budgets:
        log(f"planning mixed {budgets}")
        t = time.perf_counter()
        planning_ids = calibration_samples(
            loaded.tokenizer, CALIBRATION_DATASET, CALIBRATION_NSAMPLES, CALIBRATION_SEQLEN, seed=CALIBRATION_SEED, data_dir=args.data_dir
        ).input_ids
        mixed = plan_model(loaded, PlanRequest(targets=budgets), planning_ids)
        plan_s = round(time.perf_counter() - t, 1)
        plans += [(f"mixed {b:g}", plan) for b, plan in zip(budgets, mixed, strict=True)]
    with tempfile.TemporaryDirectory(prefix="arctl-seed-") as tmp:
        for name, plan in plans:
            for method in ("rtn", "tuned"):
                log(f"{name} {method}")
                row = run_plan(loaded, plan, method, config, calibration, Path(tmp), settings)
                rows.append({"name": name, "method": method, **row})
                log(f"  avg {row['average']:.4f} ppl {row['wikitext2_ppl']:.2f} ({row['quantize_s']}s + {row['eval_s']}s)")
    print()
    header = f"{'model':14s} {'method':6s} {'bits':>6s} " + " ".join(f"{t[:10]:>10s}" for t in ZERO_SHOT_AVERAGE) + f" {'average':>8s} {'wiki ppl':>9s}"
    print(header)
    for row in rows:
        bits = "16" if row["bits"] is None else f"{row['bits']:.3f}"
        accs = " ".join(f"{row['tasks'][t]['acc']:10.4f}" for t in ZERO_SHOT_AVERAGE)
        print(f"{row['name']:14s} {row['method']:6s} {bits:>6s} {accs} {row['average']:8.4f} {row['wikitext2_ppl']:9.2f}")
    result = {
        "settings": {
            "model": "SmolLM2-135M-Instruct (embedded GGUF Q4_1, dequantized to float32: the 'float' row)",
            "limit": args.limit, "tasks": list(ZERO_SHOT_AVERAGE), "average": "mean acc of the five tasks",
            "wikitext2": f"token perplexity, {args.wikitext_windows} x 2048 tokens", "tune": config.to_dict(),
            "calibration": "c4 (shared data), seed as tune", "mixed_planner": f"fisher, {CALIBRATION_NSAMPLES} x {CALIBRATION_SEQLEN} {CALIBRATION_DATASET} train tokens, one measurement",
            "plan_s": plan_s, "torch": torch.__version__, "total_s": round(time.perf_counter() - started, 1),
        },
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
