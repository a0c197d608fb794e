"""The CLI on a tiny model folder: the happy path, and every kind of bad input gives one line and exit 2."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from typer.testing import CliRunner

from arctl.checkpoint import read_checkpoint
from arctl.models import load_model
from arctl.plan import Plan
from arctl.progress import Progress, ProgressCallback
from arctl.schemes import get_scheme
from arctl_cli.main import app
from arctl_cli.pipeline import tune_from_settings
from arctl_planner.engine import plan_uniform
from tests.services.checks import folder_differences

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def assert_one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "Traceback" not in result.output


def test_plan_writes_a_plan_at_the_budget(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "plan.json"
    result = run("plan", "--model", str(tiny_model_dir), "--avg-bits", "4.5", "--out", str(out), "--json",
                 "--dataset", str(_words_file(tmp_path)))
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert 4.48 <= summary["avg_bits"] <= 4.5
    assert len(summary["schemes"]) >= 2
    shown = run("inspect", str(out), "--json")
    assert json.loads(shown.stdout)["summary"]["avg_bits"] == summary["avg_bits"]


def test_quantize_without_eval_writes_checkpoint_export_and_report(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = run("quantize", "--model", str(tiny_model_dir), "--scheme", "W4A16G64", "--no-eval", "--out", str(out), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["plan"]["avg_bits"] == pytest.approx(4.25)
    checkpoint = read_checkpoint(out / "checkpoint")
    assert checkpoint.plan.scheme_counts() == {"W4A16G64": 14}
    assert (out / "export" / "config.json").is_file() or any((out / "export").iterdir())
    assert json.loads((out / "report.json").read_text())["checkpoint_bytes"] == report["checkpoint_bytes"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_quantize_with_eval_reports_perplexity_before_and_after(tiny_model_dir: Path, tmp_path: Path, shared_data: Path) -> None:
    out = tmp_path / "run"
    result = run(
        "quantize", "--model", str(tiny_model_dir), "--avg-bits", "3.0", "--out", str(out),
        "--eval-seqlen", "64", "--eval-windows", "2", "--data-dir", str(shared_data), "--json",
    )
    assert result.exit_code == 0, result.output
    evaluation = json.loads(result.stdout)["evaluation"]
    assert evaluation["tokens"] == 2 * 63
    assert evaluation["kl"] > 0 and evaluation["ppl"] > 1 and evaluation["reference_ppl"] > 1


def test_missing_model_path(tmp_path: Path) -> None:
    assert_one_line_error(run("quantize", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")), "model not found")


def test_pickled_only_model_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    assert_one_line_error(run("plan", "--model", str(tmp_path), "--out", str(tmp_path / "p.json")), "safetensors only")


def test_pareto_and_size_budgets(tiny_model_dir: Path, tmp_path: Path) -> None:
    result = run("plan", "--model", str(tiny_model_dir), "--pareto", "3,4.5,6", "--out", str(tmp_path / "front"),
                 "--sensitivity", "weight", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [row["target_avg_bits"] for row in rows] == [3.0, 4.5, 6.0]
    assert all(row["avg_bits"] <= row["target_avg_bits"] for row in rows)
    assert sorted(p.name for p in (tmp_path / "front").iterdir()) == ["plan-3.json", "plan-4.5.json", "plan-6.json"]
    sized = run("plan", "--model", str(tiny_model_dir), "--max-size", "0.5MB", "--out", str(tmp_path / "s.json"),
                "--sensitivity", "weight", "--for", "sglang", "--json")
    assert sized.exit_code == 0, sized.output
    assert not any(name.startswith(("MX", "NV", "FP")) for name in json.loads(sized.stdout)["schemes"])


@pytest.mark.parametrize(
    "args, message",
    [(["--keep", "*.nothing=W4A16G64"], "matches no quantizable layer"), (["--for", "tensorrt"], "unknown runtime"),
     (["--max-size", "lots"], "not a size"), (["--sensitivity", "vibes"], "unknown sensitivity"),
     (["--schemes", "MXFP4,NVFP4", "--for", "sglang"], "no candidate scheme fits")],
)
def test_bad_plan_requests(tiny_model_dir: Path, tmp_path: Path, args: list[str], message: str) -> None:
    result = run("plan", "--model", str(tiny_model_dir), "--out", str(tmp_path / "p.json"), "--sensitivity", "weight", *args)
    assert_one_line_error(result, message)


def test_lm_head_is_planned_and_quantized_on_request(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "plan.json"
    pinned = ["--keep", "lm_head=W8A16G64", "--sensitivity", "weight", "--avg-bits", "5"]
    result = run("plan", "--model", str(tiny_model_dir), "--lm-head", *pinned, "--out", str(out), "--json")
    assert result.exit_code == 0, result.output
    assert Plan.load(out).scheme_of("lm_head") == get_scheme("W8A16G64")
    refused = run("plan", "--model", str(tiny_model_dir), *pinned, "--out", str(tmp_path / "other.json"))
    assert_one_line_error(refused, "--keep 'lm_head' matches no quantizable layer", "planned only with --lm-head")
    run_dir = tmp_path / "run"
    quantized = run("quantize", "--model", str(tiny_model_dir), "--scheme", "W4A16G64", "--lm-head", "--no-eval",
                    "--out", str(run_dir), "--json")
    assert quantized.exit_code == 0, quantized.output
    checkpoint = read_checkpoint(run_dir / "checkpoint")
    assert checkpoint.plan.scheme_counts() == {"W4A16G64": 15} and "lm_head" in checkpoint.quantized_tensors()
    awq = run("quantize", "--model", str(tiny_model_dir), "--scheme", "W4A16G64", "--lm-head", "-f", "auto_awq",
              "--no-eval", "--out", str(tmp_path / "awq"))
    assert_one_line_error(awq, "AWQ quantizes no layer outside the decoder blocks")


def test_embeddings_are_planned_and_quantized_for_gguf_only(tiny_model_dir: Path, tmp_path: Path) -> None:
    sglang = run("plan", "--model", str(tiny_model_dir), "--embeddings", "--for", "sglang", "--sensitivity", "weight",
                 "--out", str(tmp_path / "p.json"))
    assert_one_line_error(sglang, "sglang runs no quantized embeddings")
    refused = run("quantize", "--model", str(tiny_model_dir), "--scheme", "W4A16G32", "--embeddings", "--no-eval",
                  "--out", str(tmp_path / "ar"))
    assert_one_line_error(refused, "model.embed_tokens: quantized embeddings (W4A16G32) go into gguf only")
    assert not (tmp_path / "ar").exists()
    planned = run("plan", "--model", str(tiny_model_dir), "--embeddings", "--for", "gguf", "--sensitivity", "weight",
                  "--avg-bits", "5", "--out", str(tmp_path / "gguf.json"))
    assert planned.exit_code == 0, planned.output
    assert Plan.load(tmp_path / "gguf.json").layers[0].name == "model.embed_tokens"  # (llama.cpp runs: test_export_gguf)


@pytest.mark.parametrize("bits", ["1.5", "17"])
def test_avg_bits_outside_reach(tiny_model_dir: Path, tmp_path: Path, bits: str) -> None:
    result = run("plan", "--model", str(tiny_model_dir), "--avg-bits", bits, "--out", str(tmp_path / "p.json"),
                 "--sensitivity", "weight")
    assert_one_line_error(result, "outside what the schemes can reach")
    assert not (tmp_path / "p.json").exists()


def test_unknown_scheme_lists_valid_names(tiny_model_dir: Path, tmp_path: Path) -> None:
    result = run("quantize", "--model", str(tiny_model_dir), "--scheme", "W5A99", "--out", str(tmp_path / "o"))
    assert_one_line_error(result, "unknown scheme 'W5A99'", "W4A16G64", "MXFP4")


def test_unknown_format_lists_valid_names(tiny_model_dir: Path, tmp_path: Path) -> None:
    result = run("quantize", "--model", str(tiny_model_dir), "--format", "onnx", "--out", str(tmp_path / "o"))
    assert_one_line_error(result, "unknown format 'onnx'", "auto_round")


def _must_not_quantize(*_args, **_kwargs):
    raise AssertionError("quantized a plan the export format refuses")


@pytest.mark.parametrize(
    "scheme, fmt, reason",
    [("NVFP4_A4", "auto_round", "NVFP4_A4 cannot be written as auto_round:auto_gptq (it quantizes activations"),
     ("MXFP4", "auto_gptq", "MXFP4 cannot be written as auto_gptq (INT only)")],
)
def test_quantize_refuses_a_plan_the_format_cannot_hold_before_quantizing(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scheme: str, fmt: str, reason: str
) -> None:
    monkeypatch.setattr("arctl_cli.pipeline.tune_from_settings", _must_not_quantize)
    out = tmp_path / "run"
    result = run("quantize", "--model", str(tiny_model_dir), "--scheme", scheme, "-f", fmt, "--no-eval", "--out", str(out))
    assert_one_line_error(result, reason, "use compressed-tensors")
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no temporary or partial folder either


def test_remote_quantize_refuses_a_plan_the_format_cannot_hold_before_tuning(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    @contextmanager
    def no_stubs(*_args):
        yield None, None, None

    def planned(_stub, model, choice, _progress):
        return plan_uniform(load_model(model), get_scheme(choice.scheme))

    monkeypatch.setattr("arctl_cli.remote._stubs", no_stubs)
    monkeypatch.setattr("arctl_cli.remote.remote_plan", planned)
    monkeypatch.setattr("arctl_cli.remote.remote_tune", _must_not_quantize)
    out = tmp_path / "run"
    services = ["--planner", "127.0.0.1:1", "--tuner", "127.0.0.1:2", "--exporter", "127.0.0.1:3"]
    result = run("quantize", "--model", str(tiny_model_dir), "--scheme", "NVFP4_A4", "-f", "gguf", "--no-eval",
                 "--out", str(out), *services)
    assert_one_line_error(result, "NVFP4_A4 cannot be written as gguf (it quantizes activations")
    assert [p.name for p in tmp_path.iterdir()] == []


def test_unreadable_data_folder(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    result = run("quantize", "--model", str(tiny_model_dir), "--data-dir", str(tmp_path / "no-data"), "--out", str(out))
    assert_one_line_error(result, "no-data")
    assert not out.exists()


def test_data_folder_without_wikitext(tiny_model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    result = run("eval", str(tiny_model_dir), "--data-dir", str(tmp_path / "data"))
    assert_one_line_error(result, "wiki")


def test_bad_plan_file(tiny_model_dir: Path, tmp_path: Path) -> None:
    plan = tmp_path / "plan.json"
    plan.write_text("{not json")
    result = run("quantize", "--model", str(tiny_model_dir), "--plan", str(plan), "--out", str(tmp_path / "o"))
    assert_one_line_error(result, "not valid JSON")


def test_output_folder_not_writable(tiny_model_dir: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    result = run("quantize", "--model", str(tiny_model_dir), "--no-eval", "--out", str(blocker / "run"))
    assert_one_line_error(result, "a-file")


def test_inspect_refuses_a_corrupted_checkpoint(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert run("quantize", "--model", str(tiny_model_dir), "--no-eval", "--out", str(out)).exit_code == 0
    shown = run("inspect", str(out / "checkpoint"), "--json")
    assert json.loads(shown.stdout)["kind"] == "checkpoint"
    with open(out / "checkpoint" / "quantized.safetensors", "r+b") as handle:
        handle.seek(-1, 2)
        handle.write(b"\x01" if handle.read(1) != b"\x01" else b"\x02")
    assert_one_line_error(run("inspect", str(out / "checkpoint")), "does not match its manifest")


def test_real_process_exit_code_and_message(tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "arctl_cli.main", "plan", "--model", str(tmp_path / "missing")],
        check=False, capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 2
    assert completed.stderr.strip().startswith("error: model not found")
    assert len(completed.stderr.strip().splitlines()) == 1


def _words_file(tmp_path: Path) -> Path:
    path = tmp_path / "calib.txt"
    path.write_text("\n".join(" ".join(f"w{(7 * i + j) % 500}" for j in range(80)) for i in range(12)) + "\n")
    return path


def _tune_args(tiny_model_dir: Path, tmp_path: Path, plan: Path, out: Path, iters: int) -> list[str]:
    return ["tune", "--model", str(tiny_model_dir), "--plan", str(plan), "--out", str(out), "--iters", str(iters),
            "--nsamples", "4", "--seqlen", "32", "--batch-size", "2", "--dataset", str(_words_file(tmp_path))]


def test_tune_writes_a_signround_checkpoint(tiny_model_dir: Path, tmp_path: Path) -> None:
    plan = tmp_path / "plan.json"
    assert run("plan", "--model", str(tiny_model_dir), "--avg-bits", "3.0", "--out", str(plan), "--for", "sglang",
               "--sensitivity", "weight").exit_code == 0
    result = run(*_tune_args(tiny_model_dir, tmp_path, plan, tmp_path / "ckpt", 4), "--json")
    assert result.exit_code == 0, result.output
    metadata = read_checkpoint(tmp_path / "ckpt").metadata
    assert metadata["method"] == "signround" and metadata["iters"] == 4
    assert metadata["calibration"]["nsamples"] == 4 and len(metadata["blocks"]) == 2


def test_tune_refuses_bad_recipe_and_settings(tiny_model_dir: Path, tmp_path: Path) -> None:
    plan = tmp_path / "plan.json"
    assert run("plan", "--model", str(tiny_model_dir), "--avg-bits", "4.2", "--out", str(plan),
               "--sensitivity", "weight").exit_code == 0
    args = _tune_args(tiny_model_dir, tmp_path, plan, tmp_path / "ckpt", 4)
    assert_one_line_error(run(*args, "--recipe", "turbo"), "unknown recipe 'turbo'", "light")
    assert_one_line_error(run(*args[:-6], "--nsamples", "2", "--batch-size", "4"), "larger than nsamples")
    missing = [*args[:-2], "--dataset", str(tmp_path / "absent.jsonl")]
    assert_one_line_error(run(*missing), "absent.jsonl")


def test_killed_tune_resumes_to_the_same_checkpoint(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = tmp_path / "plan.json"
    assert run("plan", "--model", str(tiny_model_dir), "--avg-bits", "3.0", "--out", str(plan), "--for", "sglang",
               "--sensitivity", "weight").exit_code == 0
    iters = 400
    assert run(*_tune_args(tiny_model_dir, tmp_path, plan, tmp_path / "whole", iters)).exit_code == 0
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "arctl_cli.main", *_tune_args(tiny_model_dir, tmp_path, plan, out, iters)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (tmp_path / "killed.partial" / "block_0000.safetensors").exists():
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert not out.exists()
    events: list[Progress] = []

    def recording(loaded, plan, out_dir, settings, progress: ProgressCallback):  # the tune command's call
        def both(event: Progress) -> None:
            events.append(event)
            progress(event)

        return tune_from_settings(loaded, plan, out_dir, settings, both)

    monkeypatch.setattr("arctl_cli.main.tune_from_settings", recording)
    resumed = run(*_tune_args(tiny_model_dir, tmp_path, plan, out, iters), "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert folder_differences(tmp_path / "whole", out) == []  # byte for byte, metadata.json included
    assert [e.metrics["resumed"] for e in events if e.stage == "tune"] == [1.0, 0.0]
    assert not (tmp_path / "killed.partial").exists()


def test_inspect_draws_the_bits_as_png(tiny_model_dir: Path, tmp_path: Path) -> None:
    plan = tmp_path / "plan.json"
    assert run("plan", "--model", str(tiny_model_dir), "--avg-bits", "5", "--out", str(plan), "--sensitivity", "weight").exit_code == 0
    result = run("inspect", str(plan), "--png", str(tmp_path / "bits.png"), "--json")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "bits.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(result.stdout)["png"] == str(tmp_path / "bits.png")
