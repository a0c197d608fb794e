"""``arctl``: thin commands over the engines. Every flag also reads an ``ARCTL_*`` variable."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Annotated

import typer
from transformers.utils import logging as transformers_logging

from arctl.atomic import atomic_write_text
from arctl.logs import configure_logging
from arctl.models import DEFAULT_MODEL, load_model
from arctl.plan import Plan
from arctl.schemes import get_scheme
from arctl.tasks.registry import PERPLEXITY_TASK, TASKS
from arctl.tasks.runner import TaskSettings
from arctl_cli import remote, render
from arctl_cli.errors import fail, user_errors_exit_2
from arctl_cli.evaluate import evaluate_target
from arctl_cli.inspection import inspect_path, read_plan
from arctl_cli.picture import plan_bars_png
from arctl_cli.pipeline import EvalSettings, TuneSettings, run_quantize, tune_from_settings
from arctl_cli.planning import build_request, make_plans, resolve_targets, runtime_for
from arctl_cli.report import comparison_rows, read_run, write_report
from arctl_cli.serving import register_serving_commands
from arctl_exporter.engine import export
from arctl_exporter.registry import WRITERS
from arctl_planner.engine import REFINE_EVALUATIONS, plan_uniform
from arctl_tuner.config import RECIPES, recipe

app = typer.Typer(
    name="arctl",
    help="Quantize LLMs to low bits (plan, quantize, export, evaluate) and serve them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
remote.register(app)
register_serving_commands(app)
DEFAULT_FORMAT = "auto_round"

ModelOpt = Annotated[
    str,
    typer.Option("--model", "-m", envvar="ARCTL_MODEL", help="HF folder (safetensors), .gguf file, hub id, or 'smollm2'."),
]
AvgBitsOpt = Annotated[
    float | None,
    typer.Option("--avg-bits", envvar="ARCTL_AVG_BITS", help="Target true average bits per weight (scales included)."),
]
MaxSizeOpt = Annotated[str | None, typer.Option("--max-size", help="Size budget of the whole model, e.g. 80MB.")]
ParetoOpt = Annotated[str | None, typer.Option("--pareto", help="Several budgets from one measurement, e.g. 3,4.5,6.")]
RuntimeOpt = Annotated[
    str | None, typer.Option("--for", help="Runtime the plan must run on: sglang, gguf, compressed-tensors, any.")
]
KeepOpt = Annotated[list[str] | None, typer.Option("--keep", help="Fix layers: GLOB=SCHEME (repeatable; the first matching rule wins).")]
HeadOpt = Annotated[
    bool,
    typer.Option("--lm-head/--no-lm-head", help="Quantize the output layer too: planned, measured and counted in the average like the others."),
]
EmbeddingsOpt = Annotated[
    bool,
    typer.Option(
        "--embeddings/--no-embeddings",
        help="Quantize the input embeddings too (GGUF / llama.cpp only; tied ones carry the output layer unless --lm-head).",
    ),
]
SensitivityOpt = Annotated[
    str, typer.Option("--sensitivity", help="fisher (predicted KL from calibration data) or weight (no data).")
]
RefineOpt = Annotated[
    int,
    typer.Option("--refine", min=0, help="Swaps measured per plan after the solve; those lowering its measured KL are kept (0: none)."),
]
SchemesOpt = Annotated[
    str | None,
    typer.Option("--schemes", envvar="ARCTL_SCHEMES", help="Comma-separated candidate schemes, e.g. W4A16G64,W8A16G64."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of tables.")]
DataDirOpt = Annotated[
    Path | None,
    typer.Option("--data-dir", envvar="ARCTL_DATA_DIR", help="Folder of the offline data sets (default ../shared/data)."),
]
SeqlenOpt = Annotated[
    int, typer.Option("--eval-seqlen", envvar="ARCTL_EVAL_SEQLEN", min=16, help="Evaluation window length.")
]
RecipeOpt = Annotated[
    str, typer.Option("--recipe", envvar="ARCTL_RECIPE", help=f"Tuning recipe: {', '.join(RECIPES)} (rtn: no tuning).")
]
ItersOpt = Annotated[int | None, typer.Option("--iters", min=0, help="SignRound steps per block (0: round to nearest).")]
NsamplesOpt = Annotated[int | None, typer.Option("--nsamples", min=1, help="Calibration samples.")]
CalibSeqlenOpt = Annotated[int | None, typer.Option("--seqlen", min=8, help="Calibration sample length in tokens.")]
BatchOpt = Annotated[int | None, typer.Option("--batch-size", min=1, help="Calibration samples per step.")]
LrOpt = Annotated[float | None, typer.Option("--lr", help="Initial step size (default 1/iters).")]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Seed of sample choice and order.")]
DatasetOpt = Annotated[
    str, typer.Option("--dataset", envvar="ARCTL_DATASET", help="Calibration text: wikitext2, c4, or a .txt/.jsonl file.")
]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue a killed run from its last finished block.")]
WindowsOpt = Annotated[
    int,
    typer.Option("--eval-windows", envvar="ARCTL_EVAL_WINDOWS", min=0, help="Windows of WikiText-2 test to evaluate (0: all)."),
]


@app.callback()
def main(
    log_level: Annotated[str, typer.Option(envvar="ARCTL_LOG_LEVEL", help="debug, info, warning, error")] = "warning",
    log_format: Annotated[str, typer.Option(envvar="ARCTL_LOG_FORMAT", help="auto, pretty, json")] = "auto",
) -> None:
    try:
        configure_logging(log_level, log_format)
    except ValueError as exc:
        raise fail(str(exc)) from None
    # arctl draws its own progress; transformers' bars and notices would interleave with it.
    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(signum: int, _frame: object) -> None:
    """SIGTERM unwinds like Ctrl-C, so temporary output is removed on the way out."""
    raise KeyboardInterrupt(f"signal {signum}")


@app.command("plan")
@user_errors_exit_2
def plan_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="plan.json, or a folder for --pareto.")] = Path("plan.json"),
    model: ModelOpt = DEFAULT_MODEL,
    avg_bits: AvgBitsOpt = None,
    max_size: MaxSizeOpt = None,
    pareto: ParetoOpt = None,
    schemes: SchemesOpt = None,
    runtime: RuntimeOpt = None,
    keep: KeepOpt = None,
    head: HeadOpt = False,
    embeddings: EmbeddingsOpt = False,
    sensitivity: SensitivityOpt = "fisher",
    refine: RefineOpt = REFINE_EVALUATIONS,
    dataset: DatasetOpt = "wikitext2",
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Choose a scheme per layer for a target true average bit-width (or size, or several budgets),
    with the least predicted KL to the float model."""
    build_request((4.5,), schemes, runtime or "any", keep or [], sensitivity, head=head, embeddings=embeddings)
    with render.progress_bars(enabled=not as_json) as progress:
        progress(render.stage("load", f"loading {model}"))
        loaded = load_model(model)
        targets = resolve_targets(loaded, avg_bits, max_size, pareto, head, embeddings)
        request = build_request(targets, schemes, runtime or "any", keep or [], sensitivity, refine, head, embeddings)
        plans = make_plans(loaded, request, dataset, data_dir, progress)
    if pareto is None:
        plans[0].save(out)
        render.plan(plans[0], out, as_json)
        return
    written = []
    for plan in plans:
        path = out / f"plan-{plan.target_avg_bits:g}.json"
        plan.save(path)
        written.append(path)
    render.pareto(plans, written, as_json)


@app.command("quantize")
@user_errors_exit_2
def quantize_command(
    out: Annotated[Path, typer.Option("--out", "-o", envvar="ARCTL_OUT", help="Output folder (replaced atomically).")] = Path(
        "runs/smollm2-4.5bit"
    ),
    model: ModelOpt = DEFAULT_MODEL,
    avg_bits: AvgBitsOpt = None,
    scheme: Annotated[str | None, typer.Option("--scheme", help="One scheme for every layer, e.g. W4A16G64.")] = None,
    schemes: SchemesOpt = None,
    runtime: RuntimeOpt = None,
    keep: KeepOpt = None,
    head: HeadOpt = False,
    embeddings: EmbeddingsOpt = False,
    sensitivity: SensitivityOpt = "fisher",
    refine: RefineOpt = REFINE_EVALUATIONS,
    plan_file: Annotated[Path | None, typer.Option("--plan", help="A plan.json from `arctl plan`.")] = None,
    formats: Annotated[list[str] | None, typer.Option("--format", "-f", help="Export format (repeatable; default auto_round).")] = None,
    evaluate: Annotated[bool, typer.Option("--eval/--no-eval", help="Evaluate float vs quantized on WikiText-2.")] = True,
    eval_seqlen: SeqlenOpt = 2048,
    eval_windows: WindowsOpt = 8,
    data_dir: DataDirOpt = None,
    recipe_name: RecipeOpt = "rtn",
    iters: ItersOpt = None,
    nsamples: NsamplesOpt = None,
    seqlen: CalibSeqlenOpt = None,
    batch_size: BatchOpt = None,
    lr: LrOpt = None,
    seed: SeedOpt = None,
    dataset: DatasetOpt = "wikitext2",
    resume: ResumeOpt = False,
    as_json: JsonOpt = False,
    planner: Annotated[str | None, typer.Option("--planner", envvar="ARCTL_PLANNER_ADDR", help="Planner service host:port (remote mode).")] = None,
    tuner: Annotated[str | None, typer.Option("--tuner", envvar="ARCTL_TUNER_ADDR", help="Tuner service host:port (remote mode).")] = None,
    exporter: Annotated[str | None, typer.Option("--exporter", envvar="ARCTL_EXPORTER_ADDR", help="Exporter service host:port (remote mode).")] = None,
) -> None:
    """Plan, quantize (round to nearest or SignRound), export and evaluate in one go (default: SmolLM2
    at 4.5 bits, round to nearest)."""
    formats = formats or [DEFAULT_FORMAT]
    for name in formats:
        if name not in WRITERS:
            raise fail(f"unknown format {name!r}; valid: {', '.join(WRITERS)}")
    chosen = [option for option in (avg_bits, scheme, plan_file) if option is not None]
    if len(chosen) > 1:
        raise fail("give only one of --avg-bits, --scheme and --plan")
    uniform = get_scheme(scheme) if scheme is not None else None
    if (head or embeddings) and plan_file is not None:
        raise fail("--lm-head and --embeddings do not apply to --plan: the plan says which layers are quantized")
    request = build_request(
        (avg_bits or 4.5,), schemes, runtime_for(formats, runtime), keep or [], sensitivity, refine, head, embeddings
    )
    addresses = remote.ServiceAddresses.given(planner, tuner, exporter)
    if addresses is not None:
        choice = remote.PlanChoice(
            plan_file, scheme, avg_bits, tuple(n.strip() for n in (schemes or "").split(",") if n.strip()),
            runtime_for(formats, runtime), tuple(keep or ()), sensitivity, dataset, refine, head, embeddings,
        )
        tuning_remote = remote.RemoteTuning(recipe_name, iters, nsamples, seqlen, batch_size, lr, seed, dataset, resume)
        evaluation = EvalSettings(eval_seqlen, eval_windows or None, data_dir) if evaluate else None
        remote.quantize_remote(addresses, model, out, choice, list(formats), evaluation, as_json, tuning_remote)
        return
    tuning = TuneSettings(
        recipe(recipe_name, iters=iters, nsamples=nsamples, seqlen=seqlen, batch_size=batch_size, lr=lr, seed=seed),
        dataset,
        data_dir,
        resume,
    )
    with render.progress_bars(enabled=not as_json) as progress:
        progress(render.stage("load", f"loading {model}"))
        loaded = load_model(model)
        if plan_file is not None:
            plan = Plan.load(plan_file)
        elif uniform is not None:
            plan = plan_uniform(loaded, uniform, head, embeddings)
        else:
            plan = make_plans(loaded, request, dataset, data_dir, progress)[0]
        settings = EvalSettings(eval_seqlen, eval_windows or None, data_dir) if evaluate else None
        report = run_quantize(loaded, plan, out, list(formats), settings, progress, tuning)
    render.quantize_report(report, as_json)


@app.command("tune")
@user_errors_exit_2
def tune_command(
    plan_file: Annotated[Path, typer.Option("--plan", help="A plan.json from `arctl plan`.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Checkpoint folder to write (atomically).")],
    model: ModelOpt = DEFAULT_MODEL,
    recipe_name: RecipeOpt = "default",
    iters: ItersOpt = None,
    nsamples: NsamplesOpt = None,
    seqlen: CalibSeqlenOpt = None,
    batch_size: BatchOpt = None,
    lr: LrOpt = None,
    seed: SeedOpt = None,
    dataset: DatasetOpt = "wikitext2",
    data_dir: DataDirOpt = None,
    resume: ResumeOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """SignRound: learn rounding and clipping block by block for a plan; write a QuantizedCheckpoint."""
    config = recipe(recipe_name, iters=iters, nsamples=nsamples, seqlen=seqlen, batch_size=batch_size, lr=lr, seed=seed)
    plan = Plan.load(plan_file)
    with render.progress_bars(enabled=not as_json) as progress:
        progress(render.stage("load", f"loading {model}"))
        loaded = load_model(model)
        path = tune_from_settings(loaded, plan, out, TuneSettings(config, dataset, data_dir, resume), progress)
    render.inspection(inspect_path(path), as_json)


@app.command("export")
@user_errors_exit_2
def export_command(
    checkpoint: Annotated[Path, typer.Argument(help="A QuantizedCheckpoint folder.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")],
    formats: Annotated[list[str] | None, typer.Option("--format", "-f", help="Export format (repeatable; default auto_round).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Write a checkpoint in other people's formats."""
    formats = formats or [DEFAULT_FORMAT]
    written = export(checkpoint, list(formats), out)
    if as_json:
        typer.echo(json.dumps({name: str(path) for name, path in written.items()}))
    else:
        for name, path in written.items():
            typer.echo(f"{name}: {path}")


@app.command("eval")
@user_errors_exit_2
def eval_command(
    target: Annotated[str, typer.Argument(help="A model (folder, .gguf, smollm2, exported folder) or a checkpoint.")],
    tasks: Annotated[
        str, typer.Option("--tasks", "-t", help=f"Comma-separated tasks: {', '.join(TASKS)}.")
    ] = PERPLEXITY_TASK,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="First N documents of each task (default: all).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Sequences per forward pass.")] = 16,
    dtype: Annotated[str, typer.Option("--dtype", help="auto (as loaded), float32, bfloat16 or float16.")] = "auto",
    reference: Annotated[
        str | None, typer.Option("--reference", "-r", help="Float model for KL / top-1 on WikiText-2 (default: a checkpoint's source).")
    ] = None,
    eval_seqlen: SeqlenOpt = 2048,
    eval_windows: WindowsOpt = 8,
    data_dir: DataDirOpt = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write the run report (JSON) for `arctl report`.")] = None,
    label: Annotated[str | None, typer.Option("--label", help="Name of this run in `arctl report` (default: the target).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Zero-shot tasks (lm-evaluation-harness protocols) and WikiText-2 perplexity, with standard errors."""
    settings = TaskSettings(limit, batch_size, eval_seqlen, eval_windows or None, data_dir)
    with render.progress_bars(enabled=not as_json) as progress:
        result = evaluate_target(target, tasks, settings, reference, dtype, progress)
    result["label"] = label or target
    if out is not None:
        atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    render.evaluation(result, as_json)


@app.command("report")
@user_errors_exit_2
def report_command(
    runs: Annotated[list[Path], typer.Argument(help="Run reports written by `arctl eval --out`.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="report.html (table + pictures) or report.png.")],
) -> None:
    """Compare evaluated runs side by side: accuracy vs true bits, per-task bars, the numbers."""
    loaded = [read_run(path) for path in runs]
    written = write_report(loaded, out)
    header, rows = comparison_rows(loaded)
    render.table("arctl report", header, rows)
    print(f"wrote {written}")


@app.command("inspect")
@user_errors_exit_2
def inspect_command(
    path: Annotated[Path, typer.Argument(help="A plan.json or a QuantizedCheckpoint folder.")],
    png: Annotated[Path | None, typer.Option("--png", help="Also draw the per-layer bits as a PNG bar picture.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Show a plan or a checkpoint: layers, schemes, true average bits, size on disk."""
    info = inspect_path(path)
    if png is not None:
        plan_bars_png(read_plan(path), png)
        info["png"] = str(png)
    render.inspection(info, as_json)


if __name__ == "__main__":
    app()
