"""Drawing on the terminal: progress bars, tables, and the ``--json`` form of every result."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as Bars
from rich.table import Table

from arctl.plan import Plan
from arctl.progress import Progress, ProgressCallback
from arctl_cli.pipeline import QuantizeReport, plan_summary

console = Console()
err_console = Console(stderr=True)


def stage(name: str, message: str) -> Progress:
    return Progress(stage=name, completed=0, total=0, message=message)


@contextlib.contextmanager
def progress_bars(enabled: bool = True) -> Iterator[ProgressCallback]:
    """A progress callback drawing one rich bar per stage on stderr (nothing when disabled)."""
    if not enabled:
        yield lambda _: None
        return
    bars = Bars(
        TextColumn("{task.description:<10}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[note]}"),
        console=err_console,
        transient=not sys.stderr.isatty(),
    )
    tasks: dict[str, Any] = {}

    def update(event: Progress) -> None:
        if event.stage not in tasks:
            tasks[event.stage] = bars.add_task(event.stage, total=event.total or None, note=event.message)
        bars.update(tasks[event.stage], completed=event.completed, total=event.total or None, note=event.message)

    with bars:
        yield update


def _echo_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def _number(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else "-"


def _bytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def plan(plan: Plan, path: Path, as_json: bool) -> None:
    summary = plan_summary(plan)
    if as_json:
        _echo_json({"plan": str(path), **summary})
        return
    schemes = ", ".join(f"{name} x{count}" for name, count in summary["schemes"].items())
    kl = "".join(
        f"; {label} KL {summary[key]:.4g}" for key, label in (("predicted_kl", "predicted"), ("measured_kl", "measured"))
        if isinstance(summary.get(key), float)
    )
    console.print(
        f"plan written to {path}: {summary['layers']} layers, true avg bits {summary['avg_bits']:.4f} "
        f"(codes only {summary['avg_bits_codes_only']:.4f}; target {summary['target_avg_bits']:g}); {schemes}{kl}"
    )


def pareto(plans: list[Plan], paths: list[Path], as_json: bool) -> None:
    rows = [{"plan": str(path), **plan_summary(plan)} for plan, path in zip(plans, paths, strict=True)]
    if as_json:
        _echo_json(rows)
        return
    table = Table(title="Pareto plans (one sensitivity pass)")
    for column in ("target", "true avg bits", "codes only", "predicted KL", "measured KL", "schemes", "file"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            f"{row['target_avg_bits']:g}", f"{row['avg_bits']:.4f}", f"{row['avg_bits_codes_only']:.4f}",
            _number(row["predicted_kl"]), _number(row["measured_kl"]),
            ", ".join(f"{k} x{v}" for k, v in row["schemes"].items()), row["plan"],
        )
    console.print(table)


def quantize_report(report: QuantizeReport, as_json: bool) -> None:
    if as_json:
        print(report.to_json(), end="")
        return
    table = Table(title=f"arctl quantize -> {report.out_dir}")
    table.add_column("")
    table.add_column("value", justify="right")
    summary = report.plan
    table.add_row("true avg bits", f"{summary['avg_bits']:.4f}")
    table.add_row("avg bits, codes only", f"{summary['avg_bits_codes_only']:.4f}")
    table.add_row("schemes", ", ".join(f"{k} x{v}" for k, v in summary["schemes"].items()))
    table.add_row("checkpoint size", _bytes(report.checkpoint_bytes))
    for name, size in report.export_bytes.items():
        table.add_row(f"{name} export size", _bytes(size))
    if report.evaluation:
        result = report.evaluation
        table.add_row("WikiText-2 ppl, float", f"{result['reference_ppl']:.3f}")
        table.add_row("WikiText-2 ppl, quantized", f"{result['ppl']:.3f}")
        table.add_row("KL to float (nats/token)", f"{result['kl']:.4f}")
        table.add_row("top-1 agreement", f"{result['top1_agreement']:.4f}")
        table.add_row("eval tokens", f"{result['tokens']} ({result['windows']} x {result['seqlen']})")
    for name, seconds in report.seconds.items():
        table.add_row(f"{name} time", f"{seconds:.1f} s")
    console.print(table)


def evaluation(result: dict[str, Any], as_json: bool) -> None:
    """An ``arctl eval`` report: one row per task and metric, value ± standard error."""
    if as_json:
        _echo_json(result)
        return
    weights = result.get("weights") or {}
    bits = weights.get("avg_bits")
    title = f"arctl eval {result['target']} ({weights.get('format', 'none')}" + (f", {bits:.3f} true bits)" if bits else ")")
    table = Table(title=title)
    for column in ("task", "metric", "value", "± stderr", "items", "seconds"):
        table.add_column(column, justify="left" if column in ("task", "metric") else "right")
    for task, numbers in result["tasks"].items():
        metrics = [m for m in ("acc", "acc_norm", "perplexity", "ppl", "reference_ppl", "kl", "top1_agreement") if m in numbers]
        for index, metric in enumerate(metrics):
            stderr = numbers.get(f"{metric}_stderr")
            table.add_row(
                task if index == 0 else "",
                metric,
                f"{numbers[metric]:.4f}",
                "" if stderr is None else f"{stderr:.4f}",
                str(numbers["items"]) if index == 0 else "",
                f"{numbers['seconds']:.1f}" if index == 0 else "",
            )
    console.print(table)
    if result.get("average_acc") is not None:
        console.print(f"average acc (lambada_openai, hellaswag, piqa, winogrande, arc_easy): {result['average_acc']:.4f}")
    if result.get("reference"):
        console.print(f"WikiText-2 KL and top-1 against {result['reference']}")


def table(title: str, header: list[str], rows: list[list[str]]) -> None:
    """A plain table of strings."""
    drawn = Table(title=title)
    for index, column in enumerate(header):
        drawn.add_column(column, justify="left" if index == 0 else "right")
    for row in rows:
        drawn.add_row(*row)
    console.print(drawn)


def inspection(info: dict[str, Any], as_json: bool) -> None:
    if as_json:
        _echo_json(info)
        return
    summary = info["summary"]
    table = Table(title=f"{info['kind']} {info['path']} (model {info['model']})")
    for column in ("layer", "shape", "scheme", "bits", "fused group"):
        table.add_column(column)
    for row in info["layers"]:
        table.add_row(row["name"], "x".join(map(str, row["shape"])), row["scheme"], f"{row['bits']:.4f}", row["fused_group"] or "")
    console.print(table)
    console.print(
        f"true avg bits {summary['avg_bits']:.4f} (codes only {summary['avg_bits_codes_only']:.4f}), "
        f"{summary['layers']} layers: " + ", ".join(f"{k} x{v}" for k, v in summary["schemes"].items())
    )
    if "size_bytes" in info:
        console.print(f"size on disk: {_bytes(info['size_bytes'])}")
