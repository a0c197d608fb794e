"""SignRound engine on tiny models: the optimizer pieces, the loss going down, resume equivalence."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_llama, tiny_tokenizer

from arctl.checkpoint import read_checkpoint
from arctl.data import CalibrationSet
from arctl.models import LoadedModel, decoder_blocks, load_checkpoint_model
from arctl.plan import LayerPlan, Plan
from arctl.progress import Progress
from arctl.quant import quantize
from arctl.schemes import get_scheme
from arctl_planner.engine import plan_uniform
from arctl_tuner import engine
from arctl_tuner.blocks import capture_block_inputs, run_block
from arctl_tuner.config import RECIPES, TuneConfig, TuneConfigError, recipe
from arctl_tuner.engine import default_work_dir, tune_model
from arctl_tuner.precision import native_bfloat16, resolve_compute_dtype
from arctl_tuner.resume import ResumeMismatchError
from arctl_tuner.rtn import PlanMismatchError
from arctl_tuner.signround import tune_block
from arctl_tuner.signsgd import CyclicSampler, clamp_factors, linear_decay, signed_step
from tests.services.checks import folder_differences


def test_signed_step_moves_each_element_by_lr_against_its_gradient_sign() -> None:
    param = torch.nn.Parameter(torch.tensor([0.0, 1.0, -1.0, 0.5]))
    param.grad = torch.tensor([3.0, -0.001, 0.0, -7.0])
    signed_step([param], 0.25)
    assert param.tolist() == [-0.25, 1.25, -1.0, 0.75]
    assert param.grad is None


def test_linear_decay_schedule() -> None:
    assert [linear_decay(0.1, step, 4) for step in range(5)] == pytest.approx([0.1, 0.075, 0.05, 0.025, 0.0])
    assert linear_decay(0.1, 0, 0) == 0.0


def test_clipping_factors_are_kept_in_the_unit_interval() -> None:
    factor = torch.tensor([-0.2, 0.5, 1.3])
    clamp_factors([factor])
    assert factor.tolist() == [0.0, 0.5, 1.0]


def test_default_lr_follows_autoround() -> None:
    assert TuneConfig(iters=200).lr_for_bits(4) == pytest.approx(1 / 200)
    assert TuneConfig(iters=1000).lr_for_bits(2) == pytest.approx(2 / 1000)
    assert TuneConfig(iters=1000).lr_for_bits(4) == pytest.approx(1 / 1000)
    assert TuneConfig(iters=50, lr=5e-3, minmax_lr=1e-2).minmax_lr_for_bits(4) == 1e-2
    assert RECIPES["light"].iters == 50 and RECIPES["best"].iters == 1000 and RECIPES["default"].nsamples == 128


@pytest.mark.parametrize(
    "kwargs, message",
    [({"iters": -1}, "iters"), ({"batch_size": 0}, "batch_size"), ({"batch_size": 16, "nsamples": 8}, "larger"),
     ({"lr": 0.0}, "lr"), ({"dtype": "float16"}, "dtype"), ({"holdout": 1.0}, "holdout")],
)
def test_bad_settings_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(TuneConfigError, match=message):
        TuneConfig(**kwargs)


def test_unknown_recipe_lists_the_valid_ones() -> None:
    with pytest.raises(TuneConfigError, match="light, default, best"):
        recipe("fastest")
    assert recipe("light", iters=7, lr=None).iters == 7


def test_sampler_cycles_through_shuffled_samples_and_is_seeded() -> None:
    sampler = CyclicSampler(10, 4, seed=3)
    first_cycle = sampler.next() + sampler.next()
    assert len(set(first_cycle)) == 8
    assert len(sampler.next()) == 4  # reshuffled: 2 left are dropped
    again = CyclicSampler(10, 4, seed=3)
    assert again.next() + again.next() == first_cycle


def _loaded(seed: int = 0) -> LoadedModel:
    return LoadedModel(tiny_llama(seed=seed), tiny_tokenizer(), "tiny", "sha")


def _calibration(n: int = 8, seqlen: int = 32) -> CalibrationSet:
    ids = torch.randint(4, 512, (n, seqlen), generator=torch.Generator().manual_seed(0))
    return CalibrationSet(input_ids=ids, source="random", seed=0, mode="documents", skipped_short=0, documents_used=n)


def test_tuning_lowers_the_block_loss_below_round_to_nearest() -> None:
    loaded = _loaded()
    plan = plan_uniform(loaded, get_scheme("W2A16G32"))
    name, block = decoder_blocks(loaded.model)[0]
    inputs = capture_block_inputs(loaded.model, block, _calibration().input_ids)
    targets = run_block(block, inputs.hidden, inputs.kwargs, 4, torch.float32)
    before = {k: v.clone() for k, v in block.state_dict().items()}
    layers = [layer for layer in plan.layers if layer.name.startswith(f"{name}.")]
    config = TuneConfig(iters=40, batch_size=8, nsamples=8, seqlen=32, dtype="float32")
    quantized, stats = tune_block(block, name, layers, inputs.hidden, targets, inputs.kwargs, config, seed=0)
    assert stats.loss_after < 0.8 * stats.loss_before
    assert set(quantized) == {layer.name for layer in layers}
    assert all(torch.equal(before[k], v) for k, v in block.state_dict().items())  # the float block is untouched


def _first_block_problem(scheme: str):
    loaded = _loaded()
    plan = plan_uniform(loaded, get_scheme(scheme))
    name, block = decoder_blocks(loaded.model)[0]
    inputs = capture_block_inputs(loaded.model, block, _calibration().input_ids)
    targets = run_block(block, inputs.hidden, inputs.kwargs, 4, torch.float32)
    layers = [layer for layer in plan.layers if layer.name.startswith(f"{name}.")]
    return block, name, layers, inputs, targets


def test_holdout_counts_are_rounded_at_least_one_and_leave_a_batch() -> None:
    assert TuneConfig(nsamples=32, holdout=0.125).holdout_count(32) == 4
    assert TuneConfig(nsamples=8, batch_size=4, holdout=0.01).holdout_count(8) == 1
    assert TuneConfig(nsamples=8, batch_size=8).holdout_count(8) == 0
    assert TuneConfig(holdout=0.0).holdout_count(128) == 0


def test_holdout_keeps_the_initial_parameters_when_training_only_hurts_them() -> None:
    block, name, layers, inputs, targets = _first_block_problem("W4A16G32")
    # a step size of 3 moves every rounding offset by 3 levels: each step makes the block worse
    config = TuneConfig(iters=4, batch_size=4, nsamples=8, seqlen=32, dtype="float32", holdout=0.25, holdout_min_bits=0,
                        lr=3.0)
    quantized, stats = tune_block(block, name, layers, inputs.hidden, targets, inputs.kwargs, config, seed=0)
    assert stats.best_iter == 0 and stats.loss_after == stats.loss_before
    untrained = TuneConfig(iters=0, batch_size=4, nsamples=8, seqlen=32, dtype="float32", holdout=0.25, holdout_min_bits=0)
    reference, _ = tune_block(block, name, layers, inputs.hidden, targets, inputs.kwargs, untrained, seed=0)
    assert all(torch.equal(quantized[key].codes, reference[key].codes) for key in reference)


def test_blocks_keep_the_last_step_or_below_last_min_bits_the_lowest_batch_loss() -> None:
    block, name, layers, inputs, targets = _first_block_problem("W4A16G32")
    # a step size of 3 moves every rounding offset by 3 levels: each step makes the block worse
    settings = {"iters": 4, "batch_size": 4, "nsamples": 8, "seqlen": 32, "dtype": "float32", "lr": 3.0}
    initial, _ = tune_block(block, name, layers, inputs.hidden, targets, inputs.kwargs, TuneConfig(**{**settings, "iters": 0}), 0)
    same_as_initial = lambda tuned: all(torch.equal(tuned[key].codes, initial[key].codes) for key in initial)
    batch, batch_stats = tune_block(block, name, layers, inputs.hidden, targets, inputs.kwargs,
                                    TuneConfig(**settings, last_min_bits=5), seed=0)
    assert batch_stats.best_iter == 0 and batch_stats.loss_after == batch_stats.loss_before and same_as_initial(batch)
    last, last_stats = tune_block(block, name, layers, inputs.hidden, targets, inputs.kwargs,
                                  TuneConfig(**settings, last_min_bits=4), seed=0)
    assert last_stats.best_iter == 4 and last_stats.loss_after > last_stats.loss_before and not same_as_initial(last)
    assert last_stats.loss_before == batch_stats.loss_before  # both: the first training batch before any step


def test_holdout_picks_a_later_iteration_when_training_helps() -> None:
    block, name, layers, inputs, targets = _first_block_problem("W2A16G32")
    config = TuneConfig(iters=40, batch_size=4, nsamples=8, seqlen=32, dtype="float32", holdout=0.25, holdout_min_bits=2)
    _, stats = tune_block(block, name, layers, inputs.hidden, targets, inputs.kwargs, config, seed=0)
    assert stats.best_iter > 0 and stats.loss_after < stats.loss_before


@pytest.mark.parametrize("scheme", ["W4A16G32", "W3A16G32_ASYM", "MXFP4", "NVFP4", "FP8"])
def test_every_scheme_tunes_and_beats_rtn_on_the_block_loss(scheme: str, tmp_path: Path) -> None:
    loaded = _loaded()
    plan = plan_uniform(loaded, get_scheme(scheme))
    # no held-out samples in any block (held-out selection is tested on its own): each block's kept
    # parameters, those after the last step, must have lowered its loss on the first training batch
    config = TuneConfig(iters=30, batch_size=4, nsamples=8, seqlen=32, dtype="float32", holdout=0.0)
    path = tune_model(loaded, plan, tmp_path / "ckpt", config, _calibration())
    blocks = read_checkpoint(path).metadata["blocks"]
    assert all(b["loss_after"] <= b["loss_before"] for b in blocks)
    assert any(b["loss_after"] < 0.95 * b["loss_before"] for b in blocks)
    assert not default_work_dir(tmp_path / "ckpt").exists()


def test_mixed_plan_inside_one_block(tmp_path: Path) -> None:
    loaded = _loaded()
    base = plan_uniform(loaded, get_scheme("W4A16G64"))
    choices = ["W2A16G32", "MXFP4", "BF16", "W8A16", "NVFP4", "W3A16G32_ASYM", "FP8"]
    layers = tuple(
        LayerPlan(layer.name, layer.shape, get_scheme(choices[i % len(choices)]), layer.fused_group)
        for i, layer in enumerate(base.layers)
    )
    plan = Plan(base.model_id, base.model_sha256, layers)
    config = TuneConfig(iters=5, batch_size=4, nsamples=8, seqlen=32, dtype="float32")
    checkpoint = read_checkpoint(tune_model(loaded, plan, tmp_path / "ckpt", config, _calibration()))
    assert set(checkpoint.quantized_tensors()) == {l.name for l in layers if l.scheme.quantized}
    model = load_checkpoint_model(checkpoint)
    assert torch.isfinite(model(torch.tensor([[5, 6, 7]])).logits).all()


def test_resume_after_a_crash_gives_the_same_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = TuneConfig(iters=6, batch_size=4, nsamples=8, seqlen=32, dtype="float32")
    plan = plan_uniform(_loaded(), get_scheme("W3A16G32"))
    uninterrupted = tune_model(_loaded(), plan, tmp_path / "a", config, _calibration())
    real = engine.tune_block
    calls = {"n": 0}

    def crash_on_second_block(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "tune_block", crash_on_second_block)
    with pytest.raises(KeyboardInterrupt):
        tune_model(_loaded(), plan, tmp_path / "b", config, _calibration())
    assert not (tmp_path / "b").exists()
    assert (default_work_dir(tmp_path / "b") / "block_0000.safetensors").is_file()
    monkeypatch.setattr(engine, "tune_block", real)
    events: list[Progress] = []
    resumed = tune_model(_loaded(), plan, tmp_path / "b", config, _calibration(), events.append, resume=True)
    assert folder_differences(uninterrupted, resumed) == []  # every file, metadata.json and manifest.json too
    tune = [e.metrics for e in events if e.stage == "tune"]
    assert [m["resumed"] for m in tune] == [1.0, 0.0] and all(m["seconds"] >= 0 for m in tune)


def test_same_inputs_and_seed_give_the_same_bytes(tmp_path: Path) -> None:
    """No run-time measurements in the checkpoint: two runs are identical in every file."""
    plan = plan_uniform(_loaded(), get_scheme("W4A16G32"))
    for config in (TuneConfig(iters=0), TuneConfig(iters=3, batch_size=4, nsamples=8, seqlen=32, dtype="float32")):
        a = tune_model(_loaded(), plan, tmp_path / f"a{config.iters}", config, _calibration())
        b = tune_model(_loaded(), plan, tmp_path / f"b{config.iters}", config, _calibration())
        assert folder_differences(a, b) == []
        assert "seconds" not in (a / "metadata.json").read_text()


def test_resume_refuses_a_work_folder_from_other_settings(tmp_path: Path) -> None:
    plan = plan_uniform(_loaded(), get_scheme("W4A16G64"))
    work = default_work_dir(tmp_path / "ckpt")
    work.mkdir()
    (work / "run.json").write_text(json.dumps({"fingerprint": "other"}))
    with pytest.raises(ResumeMismatchError, match="another model, plan, settings or data"):
        tune_model(_loaded(), plan, tmp_path / "ckpt", TuneConfig(iters=2, batch_size=4, nsamples=8, seqlen=32),
                   _calibration(), resume=True)


def test_plans_that_do_not_fit_the_model_are_refused(tmp_path: Path) -> None:
    loaded = _loaded()
    base = plan_uniform(loaded, get_scheme("W4A16G64"))
    wrong_shape = Plan("m", "s", (LayerPlan(base.layers[0].name, (1, 2), base.layers[0].scheme),))
    unknown = Plan("m", "s", (LayerPlan("model.layers.9.mlp.up_proj", (256, 128), base.layers[0].scheme),))
    config = TuneConfig(iters=2, batch_size=4, nsamples=8, seqlen=32)
    with pytest.raises(PlanMismatchError, match="has shape"):
        tune_model(loaded, wrong_shape, tmp_path / "a", config, _calibration())
    with pytest.raises(PlanMismatchError, match="not a quantizable layer"):
        tune_model(loaded, unknown, tmp_path / "b", config, _calibration())
    with pytest.raises(TuneConfigError, match="calibration"):
        tune_model(loaded, base, tmp_path / "c", config, None)


def test_bfloat16_tuning_on_cpu_runs_eager_attention_and_gives_the_model_its_own_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded = _loaded()
    loaded.model.set_attn_implementation("sdpa")
    seen: list[str] = []
    real = engine.tune_block

    def spy(*args, **kwargs):
        seen.append(loaded.model.config._attn_implementation)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "tune_block", spy)
    plan = plan_uniform(loaded, get_scheme("W4A16G32"))
    config = TuneConfig(iters=3, batch_size=4, nsamples=8, seqlen=32, dtype="bfloat16")
    tune_model(loaded, plan, tmp_path / "ckpt", config, _calibration())
    assert seen and set(seen) == {"eager"}
    assert loaded.model.config._attn_implementation == "sdpa"
    seen.clear()
    tune_model(loaded, plan, tmp_path / "ckpt32", TuneConfig(iters=3, batch_size=4, nsamples=8, seqlen=32, dtype="float32"),
               _calibration())
    assert set(seen) == {"sdpa"}


def test_auto_compute_dtype_is_bfloat16_only_where_the_device_multiplies_in_it(tmp_path: Path) -> None:
    cpu = torch.device("cpu")
    assert TuneConfig().dtype == "auto"
    assert resolve_compute_dtype("auto", cpu) == ("bfloat16" if native_bfloat16(cpu) else "float32")
    assert resolve_compute_dtype("float32", cpu) == "float32"
    assert resolve_compute_dtype("bfloat16", cpu) == "bfloat16"
    loaded = _loaded()
    plan = plan_uniform(loaded, get_scheme("W4A16G32"))
    config = TuneConfig(iters=2, batch_size=4, nsamples=8, seqlen=32)
    metadata = read_checkpoint(tune_model(loaded, plan, tmp_path / "ckpt", config, _calibration())).metadata
    assert metadata["dtype"] == resolve_compute_dtype("auto", cpu)  # the dtype that ran, not "auto"


@pytest.mark.parametrize("scheme, held_out", [("W4A16G32", False), ("W8A16G32", True)])
def test_holdout_applies_only_to_blocks_of_at_least_min_bits(scheme: str, held_out: bool) -> None:
    block, name, layers, inputs, targets = _first_block_problem(scheme)
    settings = {"iters": 6, "batch_size": 4, "nsamples": 8, "seqlen": 32, "dtype": "float32"}
    _, default = tune_block(block, name, layers, inputs.hidden, targets, inputs.kwargs, TuneConfig(**settings), seed=0)
    _, batch_rule = tune_block(block, name, layers, inputs.hidden, targets, inputs.kwargs,
                               TuneConfig(**settings, holdout=0.0), seed=0)
    summary = lambda stats: (stats.loss_before, stats.loss_after, stats.best_iter)
    assert (summary(default) != summary(batch_rule)) is held_out


@pytest.mark.parametrize("iters", [0, 5])
def test_nvfp4_fused_groups_share_one_global_scale(iters: int, tmp_path: Path) -> None:
    loaded = _loaded()
    plan = plan_uniform(loaded, get_scheme("NVFP4"))
    config = TuneConfig(iters=iters, batch_size=4, nsamples=8, seqlen=32, dtype="float32")
    quantized = read_checkpoint(tune_model(loaded, plan, tmp_path / "ckpt", config, _calibration())).quantized_tensors()
    for block in ("model.layers.0", "model.layers.1"):
        groups = [[f"{block}.self_attn.{p}_proj" for p in "qkv"], [f"{block}.mlp.{p}_proj" for p in ("gate", "up")]]
        for names in groups:
            amax = max(float(loaded.model.get_submodule(name).weight.abs().max()) for name in names)
            for name in names:  # the group's largest weight sets the scale
                assert float(quantized[name].global_scale) == pytest.approx(448 * 6 / amax, rel=1e-6)
        # a layer outside any fused group keeps its own
        o_proj = loaded.model.get_submodule(f"{block}.self_attn.o_proj").weight
        assert float(quantized[f"{block}.self_attn.o_proj"].global_scale) == pytest.approx(448 * 6 / float(o_proj.abs().max()))


def test_in_mixed_blocks_layers_above_tune_max_bits_keep_round_to_nearest() -> None:
    block, name, layers, inputs, targets = _first_block_problem("W8A16G32")
    mixed = [
        LayerPlan(layer.name, layer.shape, get_scheme("W2A16G32" if layer.name.endswith("o_proj") else "W8A16G32"))
        for layer in layers
    ]
    config = TuneConfig(iters=10, batch_size=4, nsamples=8, seqlen=32, dtype="float32", tune_max_bits=4)
    quantized, stats = tune_block(block, name, mixed, inputs.hidden, targets, inputs.kwargs, config, seed=0)
    for layer in mixed:
        rtn = quantize(block.get_submodule(layer.name[len(name) + 1:]).weight, layer.scheme)
        same = torch.equal(quantized[layer.name].codes, rtn.codes) and torch.equal(quantized[layer.name].scales, rtn.scales)
        assert same == (layer.scheme.bits == 8), layer.name  # only the 2-bit o_proj was tuned
    assert stats.loss_after < stats.loss_before
    # a block without layers of at most tune_max_bits bits is tuned whole
    wide = [LayerPlan(layer.name, layer.shape, get_scheme("W3A16G32")) for layer in layers]
    tuned, _ = tune_block(block, name, wide, inputs.hidden, targets, inputs.kwargs, replace(config, tune_max_bits=2), seed=0)
    for layer in wide:
        rtn = quantize(block.get_submodule(layer.name[len(name) + 1:]).weight, layer.scheme)
        assert not torch.equal(tuned[layer.name].codes, rtn.codes), layer.name
