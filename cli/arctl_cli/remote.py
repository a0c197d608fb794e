"""Remote mode and the service commands of ``arctl``.

- ``arctl quantize --planner H:P --tuner H:P --exporter H:P``: the same slice as the embedded
  pipeline (plan -> quantize -> export -> evaluate, one output folder written atomically), with the
  planner, tuner and exporter reached over gRPC. Artefacts move by path: the output folder must lie
  on a volume the services share, inside their allowed roots. Evaluation runs here, as embedded.
- ``arctl serve-planner|serve-tuner|serve-exporter [flags]``: one service in the foreground (the
  flags of ``python -m arctl_<service> --help``).
- ``arctl services up``: the three services as child processes on consecutive ports, until Ctrl-C
  or SIGTERM, which drains them.

TLS and token for the client come from ``ARCTL_TLS_CA`` (PEM to trust), ``ARCTL_TLS_SERVER_NAME``
and ``ARCTL_AUTH_TOKEN``.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

import grpc
import typer
from grpc_health.v1 import health_pb2, health_pb2_grpc

from arctl.atomic import atomic_directory
from arctl.checkpoint import read_checkpoint
from arctl.data import LOCAL_DATASETS, wikitext2_test_text
from arctl.models import EMBEDDED_MODELS, load_checkpoint_model, load_model
from arctl.plan import Plan
from arctl.progress import Progress, ProgressCallback
from arctl.rpc import client as rpc_client
from arctl.rpc import convert
from arctl.rpc.jobs import BOOKKEEPING_STAGES
from arctl.rpc.server import DEFAULT_PORTS
from arctl.schemes import get_scheme
from arctl.v1 import (
    common_pb2,
    exporter_pb2,
    exporter_pb2_grpc,
    planner_pb2,
    planner_pb2_grpc,
    tuner_pb2,
    tuner_pb2_grpc,
)
from arctl_cli import render
from arctl_cli.errors import fail
from arctl_cli.pipeline import (
    CHECKPOINT_DIR,
    REPORT_FILE,
    EvalSettings,
    QuantizeReport,
    evaluate_against,
    folder_bytes,
    plan_summary,
)
from arctl_exporter.engine import check_plan
from arctl_exporter.server import run as run_exporter
from arctl_planner.engine import CALIBRATION_NSAMPLES, CALIBRATION_SEED, REFINE_EVALUATIONS
from arctl_planner.server import run as run_planner
from arctl_tuner.server import run as run_tuner

SERVICES = ("planner", "tuner", "exporter")
REMOTE_EXPORT_STAGING = ".export-remote"

F = TypeVar("F", bound=Callable[..., Any])


class RemoteJobFailed(RuntimeError):
    """A remote job ended FAILED or CANCELLED; the message is the service's reason."""


@dataclass(frozen=True)
class ServiceAddresses:
    planner: str
    tuner: str
    exporter: str

    @classmethod
    def given(cls, planner: str | None, tuner: str | None, exporter: str | None) -> ServiceAddresses | None:
        """The three addresses, None when none is given; all three are needed once one is."""
        if not (planner or tuner or exporter):
            return None
        missing = [name for name, value in zip(SERVICES, (planner, tuner, exporter), strict=True) if not value]
        if missing:
            raise fail(f"remote mode needs all three services; missing --{', --'.join(missing)}")
        return cls(str(planner), str(tuner), str(exporter))


def client_settings() -> rpc_client.ClientSettings:
    ca = os.environ.get("ARCTL_TLS_CA")
    return rpc_client.ClientSettings(
        tls_ca=Path(ca) if ca else None,
        token=os.environ.get("ARCTL_AUTH_TOKEN") or None,
        server_name=os.environ.get("ARCTL_TLS_SERVER_NAME") or None,
    )


def rpc_errors_exit_2(command: F) -> F:
    """A gRPC error or a failed remote job prints one line and exits 2, like every bad input."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except grpc.RpcError as exc:
            code = exc.code().name if exc.code() is not None else "UNKNOWN"
            raise fail(f"{code.lower()}: {exc.details() or 'no details'}") from None
        except RemoteJobFailed as exc:
            raise fail(str(exc)) from None

    return wrapper  # type: ignore[return-value]


def _forward(progress: ProgressCallback) -> ProgressCallback:
    """Service events into the CLI's bars: the engines' stages as they are, bookkeeping left out."""

    def forward(event: Progress) -> None:
        if event.stage not in BOOKKEEPING_STAGES:
            progress(event)

    return forward


def _finished(service: str, status: Any) -> Any:
    inner = status.status
    if inner.state != common_pb2.JOB_STATE_SUCCEEDED:
        state = common_pb2.JobState.Name(inner.state).removeprefix("JOB_STATE_").lower()
        raise RemoteJobFailed(f"{service} job {inner.job_id} {state}: {inner.error or 'no reason given'}")
    return status


def _model_reference(model: str) -> str:
    """An existing local path is sent absolute (the services do not share our cwd)."""
    if model in EMBEDDED_MODELS:
        return model
    path = Path(model).expanduser()
    return str(path.absolute()) if path.exists() else model


@dataclass(frozen=True)
class PlanChoice:
    """How to get the plan: a file, one scheme for every layer, or a budget over candidate schemes
    (with the planner flags of ``arctl quantize``; calibration as ``arctl_cli.planning`` draws it)."""

    plan_file: Path | None = None
    scheme: str | None = None
    avg_bits: float | None = None
    schemes: tuple[str, ...] = ()
    runtime: str = "any"
    keep: tuple[str, ...] = ()
    sensitivity: str = "fisher"
    dataset: str = "wikitext2"
    refine_evaluations: int = REFINE_EVALUATIONS
    head: bool = False
    embeddings: bool = False

    def request(self, model: str) -> planner_pb2.PlanRequest:
        if self.scheme is not None:
            return planner_pb2.PlanRequest(
                model=model, candidate_schemes=[self.scheme], plan_lm_head=self.head, plan_embeddings=self.embeddings
            )
        dataset = self.dataset if self.dataset in LOCAL_DATASETS else str(Path(self.dataset).absolute())
        return planner_pb2.PlanRequest(
            model=model,
            target_avg_bits=4.5 if self.avg_bits is None else self.avg_bits,
            candidate_schemes=list(self.schemes),
            target_runtime=self.runtime,
            keep=list(self.keep),
            sensitivity=self.sensitivity,
            calibration_data=common_pb2.ArtifactRef(uri=dataset, kind=common_pb2.ARTIFACT_KIND_DATASET),
            nsamples=CALIBRATION_NSAMPLES,
            seed=CALIBRATION_SEED,
            refine_evaluations=self.refine_evaluations,
            plan_lm_head=self.head,
            plan_embeddings=self.embeddings,
        )


@contextmanager
def _stubs(addresses: ServiceAddresses, settings: rpc_client.ClientSettings) -> Iterator[tuple[Any, Any, Any]]:
    with ExitStack() as stack:
        channels = [stack.enter_context(rpc_client.channel(a, settings)) for a in
                    (addresses.planner, addresses.tuner, addresses.exporter)]
        yield (
            planner_pb2_grpc.PlannerServiceStub(channels[0]),
            tuner_pb2_grpc.TunerServiceStub(channels[1]),
            exporter_pb2_grpc.ExporterServiceStub(channels[2]),
        )


def remote_plan(stub: Any, model: str, choice: PlanChoice, progress: ProgressCallback) -> Plan:
    if choice.plan_file is not None:
        return Plan.load(choice.plan_file)
    job = stub.StartPlan(choice.request(model), timeout=rpc_client.UNARY_TIMEOUT)
    status = _finished("planner", rpc_client.follow(stub, job.job_id, _forward(progress)))
    return convert.plan_from_proto(status.plan)


@dataclass(frozen=True)
class RemoteTuning:
    """The tuning flags of ``arctl quantize``, as a TuneRequest carries them (None: the recipe's)."""

    recipe: str = "rtn"
    iters: int | None = None
    nsamples: int | None = None
    seqlen: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    seed: int | None = None
    dataset: str = "wikitext2"
    resume: bool = False

    def request(self, model: str, plan: Plan, output: Path) -> tuner_pb2.TuneRequest:
        dataset = self.dataset if self.dataset in LOCAL_DATASETS else str(Path(self.dataset).absolute())
        request = tuner_pb2.TuneRequest(
            model=model,
            plan=convert.plan_to_proto(plan),
            output=common_pb2.ArtifactRef(uri=str(output), kind=common_pb2.ARTIFACT_KIND_CHECKPOINT),
            recipe=self.recipe,
            calibration_data=common_pb2.ArtifactRef(uri=dataset, kind=common_pb2.ARTIFACT_KIND_DATASET),
            resume=self.resume,
        )
        for name in ("iters", "nsamples", "seqlen", "batch_size", "lr", "seed"):
            if getattr(self, name) is not None:
                setattr(request, name, getattr(self, name))
        return request


def remote_tune(
    stub: Any, model: str, plan: Plan, output: Path, progress: ProgressCallback, tuning: RemoteTuning
) -> common_pb2.ArtifactRef:
    job = stub.StartTune(tuning.request(model, plan, output), timeout=rpc_client.UNARY_TIMEOUT)
    return _finished("tuner", rpc_client.follow(stub, job.job_id, _forward(progress))).checkpoint


def remote_export(
    stub: Any, checkpoint: common_pb2.ArtifactRef, formats: list[str], output: Path, progress: ProgressCallback
) -> dict[str, Path]:
    """Export like the embedded engine lays it out: one format in ``output`` itself, several in
    ``output/<format>`` (the service always writes ``<output>/<format>``)."""
    target = output.parent / REMOTE_EXPORT_STAGING if len(formats) == 1 else output
    request = exporter_pb2.ExportRequest(
        checkpoint=checkpoint,
        formats=formats,
        output=common_pb2.ArtifactRef(uri=str(target), kind=common_pb2.ARTIFACT_KIND_EXPORTED_MODEL),
    )
    job = stub.StartExport(request, timeout=rpc_client.UNARY_TIMEOUT)
    status = _finished("exporter", rpc_client.follow(stub, job.job_id, _forward(progress)))
    written = {entry.format: Path(entry.artifact.uri) for entry in status.exports}
    if len(formats) == 1:
        os.replace(written[formats[0]], output)
        target.rmdir()
        return {formats[0]: output}
    return written


def run_quantize_remote(
    model: str,
    choice: PlanChoice,
    out_dir: Path,
    formats: list[str],
    evaluation: EvalSettings | None,
    progress: ProgressCallback,
    addresses: ServiceAddresses,
    tuning: RemoteTuning | None = None,
    settings: rpc_client.ClientSettings | None = None,
) -> QuantizeReport:
    """``run_quantize`` with the engines behind gRPC; the same folder layout and report."""
    eval_text = wikitext2_test_text(evaluation.data_dir) if evaluation is not None else ""
    reference = _model_reference(model)
    out_dir = Path(out_dir).absolute()
    seconds: dict[str, float] = {}
    with _stubs(addresses, settings or client_settings()) as (planner, tuner, exporter), atomic_directory(out_dir) as tmp:
        plan = remote_plan(planner, reference, choice, progress)
        if formats:
            check_plan(formats, plan)  # in-process, as the exporter would refuse it after the tuning
        started = time.perf_counter()
        # The tuner writes beside the output under a stable name, so its work folder of finished
        # blocks (<staged>.partial) outlives an interrupted run and --resume continues from it.
        staged = out_dir.parent / f".{out_dir.name}.remote-checkpoint"
        tuned = remote_tune(tuner, reference, plan, staged, progress, tuning or RemoteTuning())
        os.replace(staged, tmp / CHECKPOINT_DIR)
        checkpoint_ref = common_pb2.ArtifactRef(uri=str(tmp / CHECKPOINT_DIR), kind=tuned.kind, sha256=tuned.sha256)
        seconds["quantize"] = round(time.perf_counter() - started, 2)
        checkpoint = read_checkpoint(tmp / CHECKPOINT_DIR)
        started = time.perf_counter()
        exports = remote_export(exporter, checkpoint_ref, formats, tmp / "export", progress) if formats else {}
        seconds["export"] = round(time.perf_counter() - started, 2)
        result = None
        if evaluation is not None:
            started = time.perf_counter()
            progress(render.stage("load", f"loading {model} for evaluation"))
            loaded = load_model(model)
            quantized_model = load_checkpoint_model(checkpoint, dtype=next(loaded.model.parameters()).dtype)
            comparison = evaluate_against(quantized_model, loaded.model, loaded.tokenizer, eval_text, evaluation, progress)
            result = {"dataset": "wikitext2-test", **asdict(comparison)}
            seconds["evaluate"] = round(time.perf_counter() - started, 2)
        report = QuantizeReport(
            out_dir=str(out_dir),
            checkpoint=str(out_dir / CHECKPOINT_DIR),
            exports={name: str(out_dir / path.relative_to(tmp)) for name, path in exports.items()},
            plan=plan_summary(plan),
            checkpoint_bytes=folder_bytes(checkpoint.path),
            export_bytes={name: folder_bytes(path) for name, path in exports.items()},
            evaluation=result,
            seconds=seconds,
        )
        (tmp / REPORT_FILE).write_text(report.to_json(), encoding="utf-8")
        (tmp / "plan.json").write_text(plan.to_json(), encoding="utf-8")
    return report


@rpc_errors_exit_2
def quantize_remote(
    addresses: ServiceAddresses,
    model: str,
    out: Path,
    choice: PlanChoice,
    formats: list[str],
    evaluation: EvalSettings | None,
    as_json: bool,
    tuning: RemoteTuning | None = None,
) -> None:
    """The body of ``arctl quantize`` in remote mode: same bars, same report."""
    if choice.scheme is not None:
        get_scheme(choice.scheme)
    for name in choice.schemes:
        get_scheme(name)
    chosen = [c for c in (choice.avg_bits is not None, choice.scheme is not None, choice.plan_file is not None) if c]
    if len(chosen) > 1:
        raise fail("give only one of --avg-bits, --scheme and --plan")
    with render.progress_bars(enabled=not as_json) as progress:
        progress(render.stage("load", f"remote: {model} via {addresses.planner}, {addresses.tuner}, {addresses.exporter}"))
        report = run_quantize_remote(model, choice, out, formats, evaluation, progress, addresses, tuning)
    render.quantize_report(report, as_json)


# --- serving -----------------------------------------------------------------------------------------


SERVICE_RUNNERS: dict[str, Callable[[list[str] | None], int]] = {
    "planner": run_planner,
    "tuner": run_tuner,
    "exporter": run_exporter,
}


PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


def _serve_command(service: str) -> Callable[[typer.Context], None]:
    def command(ctx: typer.Context) -> None:
        raise typer.Exit(SERVICE_RUNNERS[service](list(ctx.args)))

    command.__doc__ = f"Run the {service} gRPC service (flags: arctl serve-{service} --help)."
    return command


def wait_serving(address: str, timeout: float, settings: rpc_client.ClientSettings | None = None) -> None:
    """Block until the service at ``address`` answers SERVING to a health check."""
    deadline = time.monotonic() + timeout
    with rpc_client.channel(address, settings or client_settings()) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                answer = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{address} did not become healthy within {timeout:.0f} s")
            time.sleep(0.2)


def services_up(
    host: Annotated[str, typer.Option(help="Address the three services bind.")] = "127.0.0.1",
    base_port: Annotated[int, typer.Option(help="Planner port; tuner and exporter take the next two.")] = DEFAULT_PORTS["planner"],
    state_dir: Annotated[Path, typer.Option(envvar="ARCTL_STATE_DIR", help="Job stores, one folder per service.")] = Path(
        ".arctl-state"
    ),
    allowed_root: Annotated[
        list[Path] | None, typer.Option("--allowed-root", help="Folder the services may read and write (repeatable; default: cwd).")
    ] = None,
    metrics_base_port: Annotated[int, typer.Option(help="First /metrics port; -1 = off.")] = 9101,
    startup_timeout: Annotated[float, typer.Option(help="Seconds to wait for each service's health.")] = 60.0,
) -> None:
    """Start planner, tuner and exporter locally (child processes) until Ctrl-C or SIGTERM."""
    roots = [str(Path(root).absolute()) for root in (allowed_root or [Path.cwd()])]
    children: list[tuple[str, str, subprocess.Popen[bytes]]] = []
    for index, service in enumerate(SERVICES):
        args = [sys.executable, "-m", f"arctl_{service}", "--host", host, "--port", str(base_port + index),
                "--state-dir", str(Path(state_dir).absolute() / service),
                "--metrics-port", str(metrics_base_port + index if metrics_base_port >= 0 else -1)]
        for root in roots:
            args += ["--allowed-root", root]
        children.append((service, f"{host}:{base_port + index}", subprocess.Popen(args)))
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        for service, address, process in children:
            wait_serving(address, startup_timeout)
            typer.echo(f"{service}: {address} (pid {process.pid})")
        typer.echo(
            "remote mode: "
            + " ".join(f"ARCTL_{service.upper()}_ADDR={address}" for service, address, _ in children)
            + "  (Ctrl-C stops the three)"
        )
        while not stopping and all(process.poll() is None for _, _, process in children):
            time.sleep(0.5)
    finally:
        for _, _, process in children:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for service, _, process in children:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                typer.echo(f"{service} did not drain in 30 s; killed", err=True)
    failed = [service for service, _, process in children if process.returncode not in (0, -signal.SIGTERM)]
    if failed and not stopping:
        raise fail(f"service(s) exited: {', '.join(failed)}")


def register(app: typer.Typer) -> None:
    """Add ``serve-planner``, ``serve-tuner``, ``serve-exporter`` and ``services up`` to ``app``."""
    for service in SERVICES:
        app.command(f"serve-{service}", context_settings=PASS_THROUGH, add_help_option=False)(_serve_command(service))
    services = typer.Typer(help="Run the gRPC services locally.", no_args_is_help=True)
    services.command("up")(services_up)
    app.add_typer(services, name="services")
