"""Remote mode equals embedded mode: the same checkpoint and export, byte for byte."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from arctl.models import load_model
from arctl.progress import Progress
from arctl.schemes import get_scheme
from arctl_cli.pipeline import run_quantize
from arctl_cli.planning import build_request, make_plans
from arctl_cli.remote import PlanChoice, ServiceAddresses, run_quantize_remote
from arctl_planner.engine import plan_uniform
from tests.services.checks import folder_differences

ALL = ("planner", "tuner", "exporter")


def _addresses(services) -> ServiceAddresses:
    return ServiceAddresses(*(services.address(name) for name in ALL))


def _assert_same_run(remote: Path, embedded: Path) -> None:
    assert folder_differences(remote / "checkpoint", embedded / "checkpoint") == []
    assert folder_differences(remote / "export", embedded / "export") == []
    assert (remote / "plan.json").read_bytes() == (embedded / "plan.json").read_bytes()
    reports = [json.loads((folder / "report.json").read_text()) for folder in (remote, embedded)]
    for key in ("plan", "checkpoint_bytes", "export_bytes"):
        assert reports[0][key] == reports[1][key], key
    assert not [p.name for p in remote.parent.iterdir() if p.name.startswith(".")], "temporary folders left"


def embedded_plan(loaded, choice: PlanChoice):
    """The plan ``arctl quantize`` makes in embedded mode for the same flags."""
    if choice.scheme is not None:
        return plan_uniform(loaded, get_scheme(choice.scheme), choice.head)
    request = build_request((choice.avg_bits or 4.5,), ",".join(choice.schemes) or None, choice.runtime, list(choice.keep),
                            choice.sensitivity, head=choice.head)
    return make_plans(loaded, request, choice.dataset, None, lambda _: None)[0]


CHOICES = {
    "scheme": PlanChoice(scheme="W4A16G64"),
    "budget-weight": PlanChoice(avg_bits=4.5, sensitivity="weight", runtime="sglang"),
    "budget-weight-head": PlanChoice(avg_bits=5.0, sensitivity="weight", runtime="sglang", head=True),
    "budget-fisher-keep": PlanChoice(avg_bits=4.0, runtime="sglang", keep=("*.down_proj=W8A16",), dataset="CALIBRATION"),
}


@pytest.mark.parametrize("name", sorted(CHOICES))
def test_remote_quantize_equals_embedded(start_services, tiny_model: Path, root: Path, name: str) -> None:
    choice = CHOICES[name]
    if choice.dataset == "CALIBRATION":
        calibration = root / "calibration.txt"
        calibration.write_text("\n".join(" ".join(f"w{(7 * i + j) % 500}" for j in range(600)) for i in range(12)) + "\n")
        choice = replace(choice, dataset=str(calibration))
    services = start_services(*ALL)
    events: list[Progress] = []
    remote = root / "remote"
    report = run_quantize_remote(str(tiny_model), choice, remote, ["auto_round"], None, events.append, _addresses(services))

    loaded = load_model(str(tiny_model))
    plan = embedded_plan(loaded, choice)
    embedded_events: list[Progress] = []
    run_quantize(loaded, plan, root / "embedded", ["auto_round"], None, embedded_events.append)

    _assert_same_run(remote, root / "embedded")
    assert report.exports == {"auto_round": str(remote / "export")}
    # the engine's progress reaches the client unchanged: one "quantize" event per layer, in order
    quantize = [(e.completed, e.total, e.message) for e in events if e.stage == "quantize"]
    assert quantize == [(e.completed, e.total, e.message) for e in embedded_events if e.stage == "quantize"]
    assert not {e.stage for e in events} & {"queued", "start", "done"}
    if choice.sensitivity == "fisher" and choice.scheme is None:
        assert {"calibrate", "sensitivity"} <= {e.stage for e in events}
        assert {layer.scheme.name for layer in plan.layers if layer.name.endswith("down_proj")} == {"W8A16"}
    assert (plan.layers[-1].name == "lm_head") == choice.head


def test_remote_quantize_two_formats_layout(start_services, tiny_model: Path, root: Path) -> None:
    services = start_services(*ALL)
    report = run_quantize_remote(
        str(tiny_model), PlanChoice(scheme="W4A16"), root / "out", ["auto_round"], None, lambda _: None, _addresses(services)
    )
    assert Path(report.exports["auto_round"]) == root / "out" / "export"
    assert (root / "out" / "export" / "config.json").is_file()


@pytest.mark.smollm2
def test_remote_quantize_smollm2_equals_embedded(start_services, root: Path) -> None:
    """The real SmolLM2-135M through the three services (model loaded by the planner, the tuner and
    the embedded run: ~25 s each)."""
    services = start_services(*ALL)
    remote = root / "remote"
    choice = PlanChoice(avg_bits=4.5, runtime="sglang")  # arctl quantize's defaults (fisher on wikitext2)
    run_quantize_remote("smollm2", choice, remote, ["auto_round"], None, lambda _: None, _addresses(services))
    loaded = load_model("smollm2")
    run_quantize(loaded, embedded_plan(loaded, choice), root / "embedded", ["auto_round"], None, lambda _: None)
    _assert_same_run(remote, root / "embedded")
