"""``arctl report``: runs of ``arctl eval --out run.json`` side by side, as an HTML page or a PNG.

The picture has two panels: average zero-shot accuracy against true average bits (float models at
16 bits), and per-task accuracy bars for every run. The HTML page holds the table of every task's
numbers (with standard errors) and the picture inline.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib import pyplot
from matplotlib.figure import Figure

from arctl.atomic import atomic_write_text
from arctl_cli.evaluate import REPORT_FORMAT
from arctl_cli.picture import write_figure_png

FLOAT_BITS = 16.0
REPORT_SUFFIXES = (".html", ".png")


class ReportError(ValueError):
    """A run file that cannot be compared, or an output the report cannot be written as."""


@dataclass(frozen=True)
class Run:
    """One evaluated model: a label, its true average bits and its per-task numbers."""

    label: str
    bits: float
    tasks: dict[str, dict[str, Any]]
    average_acc: float | None


def read_run(path: Path) -> Run:
    """A run report; ``ReportError`` naming the file when it is not one."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ReportError(f"run file {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ReportError(f"{path} is not JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != REPORT_FORMAT:
        raise ReportError(f"{path} is not an `arctl eval --out` report (format {REPORT_FORMAT})")
    weights = data.get("weights") or {}
    bits = weights.get("avg_bits")
    return Run(
        label=str(data.get("label") or Path(data["target"]).name or data["target"]),
        bits=float(bits) if isinstance(bits, (int, float)) else FLOAT_BITS,
        tasks=data.get("tasks", {}),
        average_acc=data.get("average_acc"),
    )


def comparison_rows(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    """A table: one row per run; columns bits, average, then each task's main numbers."""
    tasks = list(dict.fromkeys(task for run in runs for task in run.tasks))
    header = ["run", "true bits", "avg acc"]
    columns: list[tuple[str, str]] = []
    for task in tasks:
        metrics = [m for m in ("acc", "acc_norm", "perplexity", "ppl", "kl") if any(m in run.tasks.get(task, {}) for run in runs)]
        columns += [(task, metric) for metric in metrics]
        header += [f"{task} {metric}" for metric in metrics]
    rows = []
    for run in runs:
        row = [run.label, f"{run.bits:.3f}", "" if run.average_acc is None else f"{run.average_acc:.4f}"]
        for task, metric in columns:
            numbers = run.tasks.get(task, {})
            value, stderr = numbers.get(metric), numbers.get(f"{metric}_stderr")
            row.append("" if value is None else f"{value:.4f}" + ("" if stderr is None else f" ± {stderr:.4f}"))
        rows.append(row)
    return header, rows


def comparison_figure(runs: list[Run]) -> Figure:
    figure, (left, right) = pyplot.subplots(1, 2, figsize=(13, 4.5), dpi=110)
    scored = [run for run in runs if run.average_acc is not None]
    for run in scored:
        left.scatter(run.bits, run.average_acc, s=30)
        left.annotate(run.label, (run.bits, run.average_acc), fontsize=7, xytext=(3, 3), textcoords="offset points")
    left.set_xlabel("true average bits (float = 16)")
    left.set_ylabel("average acc (5 tasks)")
    left.set_title("accuracy vs bits" if scored else "accuracy vs bits (no run has all five tasks)")
    tasks = [t for t in dict.fromkeys(t for run in runs for t in run.tasks) if any("acc" in run.tasks.get(t, {}) for run in runs)]
    width = 0.8 / max(len(runs), 1)
    for index, run in enumerate(runs):
        values = [run.tasks.get(task, {}).get("acc") or 0.0 for task in tasks]
        errors = [run.tasks.get(task, {}).get("acc_stderr") or 0.0 for task in tasks]
        right.bar([t + index * width for t in range(len(tasks))], values, width, yerr=errors, label=run.label, capsize=2)
    right.set_xticks([t + 0.4 - width / 2 for t in range(len(tasks))], tasks, rotation=20, fontsize=8)
    right.set_ylabel("acc")
    right.set_title("per task")
    right.legend(fontsize=7)
    figure.tight_layout()
    return figure


def write_report(runs: list[Run], out: Path) -> Path:
    """Write the comparison as ``.png`` or ``.html`` (atomically)."""
    if not runs:
        raise ReportError("no run files given")
    if out.suffix not in REPORT_SUFFIXES:
        raise ReportError(f"--out must end in {' or '.join(REPORT_SUFFIXES)}, not {out.name!r}")
    figure = comparison_figure(runs)
    if out.suffix == ".png":
        return write_figure_png(figure, out)
    buffer = io.BytesIO()
    try:
        figure.savefig(buffer, format="png")
    finally:
        pyplot.close(figure)
    header, rows = comparison_rows(runs)
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>arctl report</title>"
        "<style>body{font-family:sans-serif}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
        "padding:3px 6px;font-size:13px}td{text-align:right}</style></head><body><h1>arctl report</h1>"
        f"<table><tr>{cells}</tr>{body}</table>"
        f"<p><img alt='accuracy vs bits and per task' src='data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}'></p>"
        "</body></html>\n"
    )
    atomic_write_text(out, page)
    return out
