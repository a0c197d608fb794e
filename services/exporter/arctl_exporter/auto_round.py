"""The ``auto_round`` writer: ``quant_method: auto-round`` with ``auto_round:auto_gptq`` packing.

Output: a Hugging Face model folder that ``transformers`` (with auto-round installed) and SGLang
(>= 0.5.4.post2) load as is:

- ``config.json``: the source config with ``quantization_config``::

      {"quant_method": "auto-round", "packing_format": "auto_round:auto_gptq",
       "bits": 4, "group_size": 32, "sym": true, "data_type": "int",
       "block_name_to_quantize": "model.layers", "autoround_version": "0.16.1",
       "extra_config": {"model.layers.0.mlp.down_proj": {"bits": 8, "group_size": 32, ...},
                        "model.layers.1.self_attn.o_proj": {"bits": 16, "data_type": "float"}}}

  The global scheme is the most common one among the quantized layers inside the blocks; every
  other quantized layer gets its full scheme in ``extra_config`` (layers outside the blocks, such as
  a quantized ``lm_head``, always do, as auto-round writes them). Every other linear inside the
  blocks (BF16 in the plan) is marked ``{"bits": 16, "data_type": "float"}``, auto-round's own
  marker for a layer kept in floating point (``utils/model_free_utils.py``); its loader and
  SGLang's treat ``bits >= 16`` as unquantized.
- ``model.safetensors``: per quantized layer ``<layer>.qweight`` int32 ``[in*bits/32, out]``,
  ``<layer>.qzeros`` int32 ``[groups, out*bits/32]`` (``zp - 1``), ``<layer>.scales`` fp16
  ``[groups, out]`` and ``<layer>.bias`` in fp16 (the dtypes of auto-round's QuantLinear buffers).
  No ``g_idx``: auto-round writes it only for ``auto_gptq``/``gptqmodel`` packing and its
  ``auto_round:auto_gptq`` loaders register none. Every other tensor keeps its checkpoint dtype, as
  auto-round's own export does for this packing (it casts to fp16 only for AWQ packing). Tied
  tensors are stored once when the config ties them (``tie_word_embeddings``).
- tokenizer files, ``generation_config.json`` and the like: copied from the checkpoint folder.

Before the folder is renamed into place, it is read back with an independent reader (safetensors'
numpy API, a bit-by-bit numpy unpacker) and every quantized weight must dequantize to exactly the
checkpoint's values; the config must resolve every layer to its planned scheme.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from arctl.atomic import atomic_directory
from arctl.checkpoint import MANIFEST, QUANTIZED_FILE, TENSORS_FILE, CheckpointError, QuantizedCheckpoint
from arctl.models import is_input_embedding
from arctl.plan import LayerPlan, Plan
from arctl.quant import QuantizedTensor, dequantize
from arctl.schemes import PER_CHANNEL, Scheme
from arctl_exporter import packing
from arctl_exporter.errors import ExportError, ExportVerificationError, join_problems

FORMAT_NAME = "auto_round"
QUANT_METHOD = "auto-round"
PACKING_FORMAT = "auto_round:auto_gptq"
# The auto-round release whose on-disk layout (and loader) this writer reproduces and is tested with.
AUTOROUND_VERSION = "0.16.1"
MODEL_FILE = "model.safetensors"
UNQUANTIZED = {"bits": 16, "data_type": "float"}
PACK_MULTIPLE = 32
# Files of a checkpoint folder that are arctl's own, never copied into an exported model.
_CHECKPOINT_OWN_FILES = {MANIFEST, QUANTIZED_FILE, TENSORS_FILE, "plan.json", "metadata.json", "config.json"}


# --- checking ----------------------------------------------------------------------------------------


def layer_problem(layer: LayerPlan) -> str | None:
    """Why ``layer`` cannot be written with ``auto_round:auto_gptq`` packing, or None if it can."""
    scheme = layer.scheme
    if not scheme.quantized:
        return None
    out_features, in_features = layer.shape
    head = f"{layer.name}: {scheme.name} cannot be written as {PACKING_FORMAT}"
    if scheme.act is not None:
        return f"{head} (it quantizes activations; this format stores weights only); use compressed-tensors"
    if scheme.dtype != "int":
        return f"{head} (INT sym only); use compressed-tensors"
    if not scheme.sym:
        alternative = "auto_awq or compressed-tensors" if scheme.bits == 4 else "compressed-tensors"
        return f"{head} (symmetric INT only); use {alternative}"
    if scheme.bits not in packing.SUPPORTED_BITS:
        return f"{head} (INT 2/3/4/8 only); use gguf or compressed-tensors"
    if not scheme.fits(in_features):
        return f"{head} (group size {scheme.group_size} does not divide in_features {in_features}); plan a group size that does"
    if in_features % PACK_MULTIPLE or out_features % PACK_MULTIPLE:
        return (
            f"{head} (shape [{out_features}, {in_features}]: in and out features must be multiples of "
            f"{PACK_MULTIPLE} for int32 packing); use gguf or compressed-tensors"
        )
    return None


def with_group_lead(
    layers: Iterable[LayerPlan], include: Callable[[LayerPlan], bool] = lambda _layer: True
) -> Iterator[tuple[LayerPlan, LayerPlan]]:
    """``(layer, lead)`` for every included layer of a fused group, ``lead`` the group's first included
    layer (itself for the first): what the checks that a group's layers agree compare."""
    first: dict[str, LayerPlan] = {}
    for layer in layers:
        if layer.fused_group is not None and include(layer):
            yield layer, first.setdefault(layer.fused_group, layer)


def fused_group_problems(layers: tuple[LayerPlan, ...]) -> list[str]:
    """Layers of one fused group (q/k/v, gate/up, one MoE layer's experts) with different schemes:
    SGLang runs such a group as one kernel and refuses a checkpoint that mixes them."""
    problems = []
    for layer, lead in with_group_lead(layers):
        if layer.scheme != lead.scheme:
            problems.append(
                f"{layer.name}: {layer.scheme.name} differs from {lead.scheme.name} of {lead.name} in fused group "
                f"{layer.fused_group}; SGLang runs the group as one kernel: plan one scheme for it"
            )
    return problems


def embedding_problem(layer: LayerPlan) -> str | None:
    """Why quantized input embeddings cannot go into a Hugging Face folder format: transformers, vLLM
    and SGLang read embeddings in 16 bits only."""
    if layer.scheme.quantized and is_input_embedding(layer.name):
        return (
            f"{layer.name}: quantized embeddings ({layer.scheme.name}) go into gguf only (transformers, vLLM and "
            "SGLang read embeddings in 16 bits); plan them for gguf or leave them out"
        )
    return None


def sharded_plan_problems(
    layers: tuple[LayerPlan, ...],
    layer_problem: Callable[[LayerPlan], str | None],
    config_problem: Callable[[tuple[LayerPlan, ...]], str | None],
) -> list[str]:
    """Every layer's ``embedding_problem`` or ``layer_problem`` and the fused groups' (runtimes refuse
    a fused module whose shards differ); with none, why no config can describe the plan (``config_problem``)."""
    problems = [problem for layer in layers if (problem := embedding_problem(layer) or layer_problem(layer))]
    problems += fused_group_problems(layers)
    if not problems and (problem := config_problem(layers)) is not None:
        problems.append(problem)
    return problems


def config_problem(layers: tuple[LayerPlan, ...]) -> str | None:
    """Why no ``quantization_config`` can describe ``layers`` (nothing quantized, no numbered blocks), or None."""
    if not any(layer.scheme.quantized for layer in layers):
        return f"the plan quantizes no layer: nothing to write as {PACKING_FORMAT}; keep the source model"
    if not _blocks(layers):
        return (
            f"no planned layer lies in numbered blocks (e.g. model.layers.N): {PACKING_FORMAT} needs "
            "block_name_to_quantize; use compressed-tensors"
        )
    return None


def _blocks(layers: tuple[LayerPlan, ...]) -> list[str]:
    return sorted({prefix for layer in layers if (prefix := block_prefix(layer.name)) is not None})


def block_prefix(name: str) -> str | None:
    """The repeated-block list a layer lives in: ``model.layers.3.mlp.up_proj`` -> ``model.layers``;
    None for a layer outside numbered blocks (``lm_head``)."""
    parts = name.split(".")
    for index, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[:index]) or None
    return None


def _in_blocks(name: str, blocks: list[str]) -> bool:
    # auto-round's check_start_with_block_name: a plain prefix test.
    return any(name.startswith(block) for block in blocks)


# --- the layout --------------------------------------------------------------------------------------


def _scheme_entry(scheme: Scheme) -> dict[str, Any]:
    return {"bits": scheme.bits, "group_size": scheme.group_size, "sym": scheme.sym, "data_type": "int"}


def _tie_word_embeddings(config: dict[str, Any]) -> bool:
    if "tie_word_embeddings" in config:
        return bool(config["tie_word_embeddings"])
    text = config.get("text_config")
    return bool(isinstance(text, dict) and text.get("tie_word_embeddings", False))


def _set_tie_word_embeddings(config: dict[str, Any], value: bool) -> None:
    config["tie_word_embeddings"] = value
    if isinstance(config.get("text_config"), dict) and "tie_word_embeddings" in config["text_config"]:
        config["text_config"]["tie_word_embeddings"] = value


@dataclass(frozen=True)
class _Layout:
    """What goes into the folder: the config and, per safetensors key, where its tensor comes from."""

    config: dict[str, Any]
    quantized: dict[str, QuantizedTensor]
    # key -> (source name in the checkpoint's float tensors, cast to fp16 or keep dtype)
    float_keys: dict[str, tuple[str, bool]]


def quantization_config(layers: tuple[LayerPlan, ...], float_names: list[str]) -> dict[str, Any]:
    """The ``quantization_config`` for a plan whose layers all pass ``layer_problem``.

    ``float_names`` are the checkpoint's other tensors: a 2-D ``.weight`` inside the blocks that the
    plan does not list is marked unquantized too, so the loader leaves it a plain Linear.
    """
    problem = config_problem(layers)
    if problem is not None:
        raise ExportError(problem)
    quantized = [layer for layer in layers if layer.scheme.quantized]
    blocks = _blocks(layers)
    in_block = [layer for layer in quantized if _in_blocks(layer.name, blocks)] or quantized
    default = Counter(layer.scheme for layer in in_block).most_common(1)[0][0]
    extra: dict[str, dict[str, Any]] = {}
    for layer in layers:
        inside = _in_blocks(layer.name, blocks)
        if not layer.scheme.quantized:
            if inside:
                extra[layer.name] = dict(UNQUANTIZED)
        elif not inside or layer.scheme != default:
            extra[layer.name] = _scheme_entry(layer.scheme)
    planned = {layer.name for layer in layers}
    for name in float_names:
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module not in planned and _in_blocks(module, blocks):
            extra.setdefault(module, dict(UNQUANTIZED))
    config: dict[str, Any] = {
        "quant_method": QUANT_METHOD,
        "packing_format": PACKING_FORMAT,
        **_scheme_entry(default),
        "block_name_to_quantize": ",".join(blocks),
        "autoround_version": AUTOROUND_VERSION,
    }
    if extra:
        config["extra_config"] = extra
    return config


def _layout(checkpoint: QuantizedCheckpoint) -> _Layout:
    layers = checkpoint.plan.layers
    quantized = checkpoint.quantized_tensors()
    for layer in layers:
        qt = quantized.get(layer.name)
        if qt is not None and qt.shape != layer.shape:
            raise CheckpointError(
                f"{layer.name}: codes have shape {list(qt.shape)}, the plan says {list(layer.shape)}"
            )
    float_shapes = _float_tensor_names(checkpoint)
    config = {key: value for key, value in checkpoint.config().items() if key != "quantization_config"}
    qconfig = quantization_config(layers, [name for name, ndim in float_shapes.items() if ndim == 2])
    blocks = qconfig["block_name_to_quantize"].split(",")
    tied = _tie_word_embeddings(config)
    if tied and any(not _in_blocks(name, blocks) for name in quantized):
        # A quantized output layer carries its own codes: it can no longer share the embedding.
        tied = False
        _set_tie_word_embeddings(config, False)
    config["quantization_config"] = qconfig

    float_keys: dict[str, tuple[str, bool]] = {}
    for name in float_shapes:
        module, _, kind = name.rpartition(".")
        if module in quantized and kind == "weight":
            continue  # the codes replace it
        float_keys[name] = (name, module in quantized and kind == "bias")
    for alias, target in checkpoint.aliases.items():
        module, _, kind = alias.rpartition(".")
        if tied or (module in quantized and kind == "weight") or target not in float_shapes:
            continue  # re-tied by transformers on load, or replaced by codes
        float_keys[alias] = (target, module in quantized and kind == "bias")
    return _Layout(config=config, quantized=quantized, float_keys=float_keys)


def _float_tensor_names(checkpoint: QuantizedCheckpoint) -> dict[str, int]:
    with safe_open(str(checkpoint.path / TENSORS_FILE), framework="pt") as handle:
        return {key: len(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118 (safe_open is not iterable)


def _packed_tensors(name: str, qt: QuantizedTensor) -> dict[str, torch.Tensor]:
    bits = qt.scheme.bits
    out_features, _ = qt.shape
    groups = int(qt.scales.shape[1])
    return {
        f"{name}.qweight": packing.pack_qweight(qt.codes, bits),
        f"{name}.qzeros": packing.pack_qzeros(packing.sym_zeros(bits, out_features, groups), bits),
        f"{name}.scales": qt.scales.to(torch.float16).t().contiguous(),
    }


def _copy_model_files(source: Path, target: Path) -> list[str]:
    copied = []
    for path in sorted(source.iterdir()):
        if path.is_file() and path.name not in _CHECKPOINT_OWN_FILES:
            shutil.copy2(path, target / path.name)
            copied.append(path.name)
    return copied


# --- verification (independent reader) -------------------------------------------------------------


def _np_unpack(words: np.ndarray, bits: int) -> np.ndarray:
    """int32 ``[..., m]`` -> int64 ``[..., m*32/bits]``, reading the bit stream one bit at a time."""
    stream = np.ascontiguousarray(words).view(np.uint32).astype(np.uint64)
    count = words.shape[-1] * 32 // bits
    values = np.zeros(words.shape[:-1] + (count,), dtype=np.int64)
    for bit in range(bits):
        position = np.arange(count, dtype=np.uint64) * np.uint64(bits) + np.uint64(bit)
        word = (position // np.uint64(32)).astype(np.int64)
        plane = (stream[..., word] >> (position % np.uint64(32))) & np.uint64(1)
        values |= plane.astype(np.int64) << bit
    return values


def _np_dequantize(
    qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray, bits: int, group_size: int
) -> np.ndarray:
    """float32 ``[out, in]`` = (code - zp) * scale, read from the packed arrays alone."""
    codes = _np_unpack(qweight.T, bits)  # [out, in]
    zeros = _np_unpack(qzeros, bits) + 1  # [groups, out]
    in_features = codes.shape[1]
    width = in_features if group_size == PER_CHANNEL else group_size
    group_of_input = np.arange(in_features) // width
    zero_full = zeros.T[:, group_of_input].astype(np.float32)
    scale_full = scales.T[:, group_of_input].astype(np.float32)
    return (codes.astype(np.float32) - zero_full) * scale_full


def _resolve(qconfig: dict[str, Any], name: str) -> dict[str, Any] | None:
    """The scheme auto-round's loader (and SGLang's) gives layer ``name``; None = unquantized."""
    keys = ("bits", "group_size", "sym", "data_type")
    default = {key: qconfig[key] for key in keys}
    blocks = [block.strip() for block in str(qconfig["block_name_to_quantize"]).split(",")]
    extra = qconfig.get("extra_config", {})
    if name in extra:
        resolved = {**default, **{key: extra[name][key] for key in keys if key in extra[name]}}
    elif _in_blocks(name, blocks):
        resolved = default
    else:
        return None
    return None if int(resolved["bits"]) >= 16 else resolved


def verify_folder(folder: Path, checkpoint: QuantizedCheckpoint, layout: _Layout) -> None:
    """Read ``folder`` back and compare it with the checkpoint; raise ExportVerificationError."""

    def fail(message: str) -> None:
        raise ExportVerificationError(f"{folder.name}: {message}")

    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    qconfig = config.get("quantization_config", {})
    if qconfig.get("quant_method") != QUANT_METHOD or qconfig.get("packing_format") != PACKING_FORMAT:
        fail("config.json lacks the auto-round quantization_config")
    for layer in checkpoint.plan.layers:
        resolved = _resolve(qconfig, layer.name)
        expected = _scheme_entry(layer.scheme) if layer.scheme.quantized else None
        if resolved != expected:
            fail(f"config resolves {layer.name} to {resolved}, the plan says {expected}")

    expected_keys = set(layout.float_keys)
    for name in layout.quantized:
        expected_keys |= {f"{name}.qweight", f"{name}.qzeros", f"{name}.scales"}
    with safe_open(str(folder / MODEL_FILE), framework="np") as handle:
        keys = set(handle.keys())
        if keys != expected_keys:
            fail(
                f"tensor names differ: missing {sorted(expected_keys - keys)[:3]}, extra {sorted(keys - expected_keys)[:3]}"
            )
        for name, qt in layout.quantized.items():
            qweight, qzeros, scales = (
                handle.get_tensor(f"{name}.{part}") for part in ("qweight", "qzeros", "scales")
            )
            if qweight.dtype != np.int32 or qzeros.dtype != np.int32 or scales.dtype != np.float16:
                fail(
                    f"{name}: dtypes {qweight.dtype}/{qzeros.dtype}/{scales.dtype}, expected int32/int32/float16"
                )
            bits = qt.scheme.bits
            zeros = _np_unpack(qzeros, bits) + 1
            if not np.all(zeros == 1 << (bits - 1)):
                fail(f"{name}: zero points are not {1 << (bits - 1)} (symmetric {bits}-bit)")
            got = _np_dequantize(qweight, qzeros, scales, bits, qt.scheme.group_size)
            want = dequantize(qt).numpy()
            if got.shape != want.shape or not np.array_equal(got, want):
                fail(f"{name}: packed weights do not dequantize to the checkpoint's values")

    written = load_file(str(folder / MODEL_FILE))
    source = checkpoint.float_tensors()
    for key, (origin, to_fp16) in layout.float_keys.items():
        want_tensor = source[origin].to(torch.float16) if to_fp16 else source[origin]
        if written[key].dtype != want_tensor.dtype or not torch.equal(written[key], want_tensor):
            fail(f"{key} differs from the checkpoint's {origin}")


# --- the writer --------------------------------------------------------------------------------------


class AutoRoundWriter:
    """``auto_round`` format, ``auto_round:auto_gptq`` packing (symmetric INT 2/3/4/8)."""

    name = FORMAT_NAME

    def plan_problems(self, plan: Plan) -> list[str]:
        """Every layer (and fused group) of ``plan`` this format cannot hold; else why no config can describe it."""
        return sharded_plan_problems(plan.layers, layer_problem, config_problem)

    def check(self, checkpoint: QuantizedCheckpoint) -> None:
        """Raise ExportError listing every layer this format cannot hold (the plan tells it all)."""
        join_problems(self.plan_problems(checkpoint.plan))

    def write(self, checkpoint: QuantizedCheckpoint, out_dir: Path) -> Path:
        """Write, verify and rename into ``out_dir``; on any failure nothing is left behind."""
        self.check(checkpoint)
        layout = _layout(checkpoint)
        source = checkpoint.float_tensors()
        tensors: dict[str, torch.Tensor] = {}
        for name, qt in layout.quantized.items():
            tensors.update(_packed_tensors(name, qt))
        for key, (origin, to_fp16) in layout.float_keys.items():
            tensor = (source[origin].to(torch.float16) if to_fp16 else source[origin]).contiguous()
            tensors[key] = tensor.clone() if origin != key else tensor  # an alias must not share storage
        out_dir = Path(out_dir)
        with atomic_directory(out_dir) as tmp:
            save_file(tensors, str(tmp / MODEL_FILE), metadata={"format": "pt"})
            _copy_model_files(checkpoint.path, tmp)
            (tmp / "config.json").write_text(json.dumps(layout.config, indent=2) + "\n", encoding="utf-8")
            verify_folder(tmp, checkpoint, layout)
        return out_dir
