"""The ``gguf`` writer: one ``model.gguf`` file for llama.cpp, written with the ``gguf`` package's
``GGUFWriter`` (Llama-architecture models: ``LlamaForCausalLM``, ``MistralForCausalLM``).

Per-tensor ggml types come from the plan (``ggml_type``); the tuned codes are kept wherever the type
can hold them, and only there:

| planned scheme | ggml type | codes |
|---|---|---|
| INT4 g32 sym | Q4_0 | kept: q = code, d = scale (fp16, sign included): exact |
| INT5 g32 sym | Q5_0 | kept, exact |
| INT8 g32 sym | Q8_0 | kept: q = code - 128, exact |
| INT4 / INT5 g32 asym | Q4_1 / Q5_1 | kept: q = code, d = scale, m = -zero*scale rounded to fp16 (exact when fp16 holds zero*scale; otherwise each group is offset by at most half an fp16 ulp of m) |
| INT6 g32 (sym or asym), INT2/3 g32 when in_features % 256 != 0 | Q8_0 / Q4_0 / Q4_1 | kept, exact (Q4_1: m as above) |
| INT2, INT3, INT4, INT5, INT6, other group sizes | Q2_K, Q3_K, Q4_K, Q5_K, Q6_K | re-quantized |
| INT8 other group sizes or asym, FP8, MXFP8 | Q8_0 | re-quantized |
| MXFP4, NVFP4 | Q4_K | re-quantized |
| BF16 (kept in float) | BF16 | exact |

"Re-quantized": the K-quants hold their scales as 4- or 6-bit integers under an fp16 super-block scale,
which an fp16 per-group scale is not, so these tensors are quantized again from the checkpoint's
dequantized weights: legacy types by ``gguf.quants.quantize``, K-quants by ``ggml_kquants`` (ggml's
reference algorithms; the ``gguf`` package cannot quantize them). K-quants need in_features % 256 == 0;
other rows fall back as llama.cpp does (Q2_K/Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0).

Other tensors: 1-D (norms, biases) F32; embeddings and an unquantized output layer F16 (BF16 when
the checkpoint holds bf16). q_proj/k_proj rows are permuted as llama.cpp's converter does (HF's
rotate-half RoPE -> GGML's interleaved one); rows are quantized independently, so codes survive it.

Metadata as llama.cpp's ``convert_hf_to_gguf.py`` writes it for a Llama: hyper-parameters, the
vocabulary (``tokenizer.ggml.tokens/token_type``; model ``gpt2`` for byte-level BPE, ``llama`` for
SentencePiece, ``none`` without a tokenizer), merges, special token ids and the chat template (gguf's
``SpecialVocab``), and ``tokenizer.ggml.pre`` from the tokenizer's pre-tokenizer (``pretokenizer_name``).

Before the rename the file is read back with ``gguf.GGUFReader``: every tensor's name, type and shape,
every kept-code tensor dequantized by ``gguf.quants.dequantize`` against ours, every re-quantized one
finite and within its type's error of our weights.
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import gguf
import numpy as np
import torch
from safetensors import safe_open

from arctl.atomic import atomic_directory
from arctl.checkpoint import TENSORS_FILE, QuantizedCheckpoint
from arctl.plan import LayerPlan, Plan
from arctl.quant import QuantizedTensor, dequantize
from arctl.schemes import Scheme
from arctl_exporter import ggml_kquants
from arctl_exporter.errors import ExportError, ExportVerificationError, join_problems

FORMAT_NAME = "gguf"
MODEL_FILE = "model.gguf"
ARCHITECTURES = {"LlamaForCausalLM", "MistralForCausalLM"}
MODEL_TYPES = {"llama", "mistral"}
GGML_BLOCK = 32  # inputs per block of every ggml type the writer uses
Q = gguf.GGMLQuantizationType
K_FALLBACK = {Q.Q2_K: Q.Q4_0, Q.Q3_K: Q.Q4_0, Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0}
K_BY_BITS = {2: Q.Q2_K, 3: Q.Q3_K, 4: Q.Q4_K, 5: Q.Q5_K, 6: Q.Q6_K, 8: Q.Q8_0}
FILE_TYPES = {
    Q.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
    Q.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1,
    Q.Q5_0: gguf.LlamaFileType.MOSTLY_Q5_0,
    Q.Q5_1: gguf.LlamaFileType.MOSTLY_Q5_1,
    Q.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
    Q.Q2_K: gguf.LlamaFileType.MOSTLY_Q2_K,
    Q.Q3_K: gguf.LlamaFileType.MOSTLY_Q3_K_M,
    Q.Q4_K: gguf.LlamaFileType.MOSTLY_Q4_K_M,
    Q.Q5_K: gguf.LlamaFileType.MOSTLY_Q5_K_M,
    Q.Q6_K: gguf.LlamaFileType.MOSTLY_Q6_K,
    Q.BF16: gguf.LlamaFileType.MOSTLY_BF16,
    Q.F16: gguf.LlamaFileType.MOSTLY_F16,
}
# Largest error of a re-quantized tensor, relative to the RMS of the weights it comes from (verification).
REQUANT_RMS_BOUND = {
    Q.Q2_K: 0.6, Q.Q3_K: 0.4, Q.Q4_0: 0.3, Q.Q4_1: 0.3, Q.Q4_K: 0.2, Q.Q5_0: 0.15, Q.Q5_1: 0.15,
    Q.Q5_K: 0.1, Q.Q6_K: 0.05, Q.Q8_0: 0.03,
}  # fmt: skip
# Byte-level BPE pre-tokenizers as llama.cpp names them (tokenizer.ggml.pre), recognised by their regex.
_LLAMA3_REGEX = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
_QWEN2_REGEX = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"


class TensorChoice(NamedTuple):
    """How one planned layer is written: its ggml type and whether the tuned codes are kept."""

    qtype: gguf.GGMLQuantizationType
    keeps_codes: bool


def ggml_type(scheme: Scheme, in_features: int) -> TensorChoice:
    """The ggml type a planned layer is written in (see the module docstring's table)."""
    if not scheme.quantized:
        return TensorChoice(Q.BF16, True)
    k_fits = in_features % ggml_kquants.QK_K == 0
    if scheme.dtype == "int" and scheme.group_size == 32:
        bits, sym = scheme.bits, scheme.sym
        if bits == 4:
            return TensorChoice(Q.Q4_0 if sym else Q.Q4_1, True)
        if bits == 5:
            return TensorChoice(Q.Q5_0 if sym else Q.Q5_1, True)
        if bits == 8 and sym:
            return TensorChoice(Q.Q8_0, True)
        if bits == 6:
            return TensorChoice(Q.Q6_K, False) if k_fits else TensorChoice(Q.Q8_0, True)
        if bits in (2, 3) and not k_fits:
            return TensorChoice(Q.Q4_0 if sym else Q.Q4_1, True)
    if scheme.dtype == "int":
        wanted = K_BY_BITS.get(scheme.bits, Q.Q8_0)
    elif scheme.dtype in ("mxfp", "nvfp") and scheme.bits == 4:
        wanted = Q.Q4_K
    else:
        wanted = Q.Q8_0
    if wanted in K_FALLBACK and not k_fits:
        wanted = K_FALLBACK[wanted]
    return TensorChoice(wanted, False)


# --- kept codes -> ggml blocks -----------------------------------------------------------------------------


def _nibbles(q: np.ndarray) -> np.ndarray:
    """uint8 ``[blocks, 32]`` -> ``[blocks, 16]``: value j in the low nibble of byte j, j+16 in the high."""
    return (q[:, :16] & 0xF) | ((q[:, 16:] & 0xF) << 4)


def _high_bits(q: np.ndarray) -> np.ndarray:
    """Bit 4 of each of 32 values -> 4 bytes, value j at bit j (little endian)."""
    return np.packbits((q >> 4) & 1, axis=-1, bitorder="little")


def kept_code_rows(qt: QuantizedTensor, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """The ggml bytes ``[out, row_bytes]`` of a g32 INT layer, its codes unchanged."""
    out_features = qt.shape[0]
    bits = qt.scheme.bits
    codes = qt.codes.numpy().astype(np.int16).reshape(-1, 32)
    d = qt.scales.numpy().astype(np.float16).reshape(-1, 1)
    if qt.zeros is None:
        signed = codes - (1 << (bits - 1))
        m = None
    else:
        zeros = qt.zeros.numpy().astype(np.int16).reshape(-1, 1)
        signed = codes - zeros
        m = (-(zeros.astype(np.float32)) * d.astype(np.float32)).astype(np.float16)
    d_bytes = d.view(np.uint8)
    if qtype == Q.Q4_0:
        blocks = [d_bytes, _nibbles((signed + 8).astype(np.uint8))]
    elif qtype == Q.Q5_0:
        q = (signed + 16).astype(np.uint8)
        blocks = [d_bytes, _high_bits(q), _nibbles(q)]
    elif qtype == Q.Q8_0:
        blocks = [d_bytes, signed.astype(np.int8).view(np.uint8)]
    elif qtype == Q.Q4_1 and m is not None:
        blocks = [d_bytes, m.view(np.uint8), _nibbles(codes.astype(np.uint8))]
    elif qtype == Q.Q5_1 and m is not None:
        q = codes.astype(np.uint8)
        blocks = [d_bytes, m.view(np.uint8), _high_bits(q), _nibbles(q)]
    else:
        raise ValueError(f"{qt.scheme.name} codes cannot be kept in {qtype.name}")
    return np.concatenate(blocks, axis=-1).reshape(out_features, -1)


def requantized_rows(weight: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """float32 ``[out, in]`` -> ggml bytes ``[out, row_bytes]`` (gguf's quantizers, ggml_kquants for K)."""
    if qtype.name in ggml_kquants.QUANTIZERS:
        blocks = weight.reshape(-1, ggml_kquants.QK_K).astype(np.float32)
        return ggml_kquants.QUANTIZERS[qtype.name](blocks).reshape(weight.shape[0], -1)
    return gguf.quants.quantize(weight.astype(np.float32), qtype)


# --- names, rows, metadata ---------------------------------------------------------------------------------


def rope_permutation(out_features: int, n_head: int) -> np.ndarray:
    """Row order llama.cpp's converter gives q_proj (n_head heads) or k_proj (n_kv_head): within each
    head, the two rotate-half halves are interleaved."""
    rows = np.arange(out_features)
    return rows.reshape(n_head, 2, out_features // n_head // 2).swapaxes(1, 2).reshape(out_features)


@functools.lru_cache(maxsize=8)
def _name_map(n_blocks: int) -> gguf.TensorNameMap:
    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_blocks)


@dataclass(frozen=True)
class _Model:
    config: dict[str, Any]
    n_blocks: int
    n_head: int
    n_kv_head: int

    def gguf_name(self, hf_name: str) -> str | None:
        return _name_map(self.n_blocks).get_name(hf_name, try_suffixes=(".weight", ".bias"))

    def permutation(self, hf_name: str, out_features: int) -> np.ndarray | None:
        if hf_name.endswith("self_attn.q_proj.weight"):
            return rope_permutation(out_features, self.n_head)
        if hf_name.endswith("self_attn.k_proj.weight"):
            return rope_permutation(out_features, self.n_kv_head)
        return None


def _model(config: dict[str, Any]) -> _Model:
    architectures = set(config.get("architectures") or [])
    if not architectures & ARCHITECTURES and config.get("model_type") not in MODEL_TYPES:
        raise ExportError(
            f"model: architecture {sorted(architectures) or config.get('model_type')} is not one the gguf writer "
            f"knows ({', '.join(sorted(ARCHITECTURES))}); use auto_round or compressed-tensors"
        )
    for key in ("rope_parameters", "rope_scaling"):
        rope = config.get(key) or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ExportError(
                f"model: rope scaling {rope} is not written by the gguf writer; use auto_round or compressed-tensors"
            )
    n_head = int(config["num_attention_heads"])
    return _Model(
        config, int(config["num_hidden_layers"]), n_head, int(config.get("num_key_value_heads") or n_head)
    )


def rope_theta(config: dict[str, Any]) -> float:
    """RoPE base of an HF config: transformers 5 keeps it in ``rope_parameters``, older configs at the
    top level (10000 when neither says)."""
    for source in (config.get("rope_parameters") or {}, config):
        if "rope_theta" in source:
            return float(source["rope_theta"])
    return 10000.0


def pretokenizer_name(tokenizer_json: dict[str, Any]) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a byte-level BPE tokenizer, from what its pre-tokenizer does.

    Raises:
        ExportError: a pre-tokenizer llama.cpp would split differently from this tokenizer.
    """
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if (
        kinds == ["Digits", "ByteLevel"]
        and steps[0].get("individual_digits")
        and steps[1].get("use_regex", True)
    ):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = (steps[0].get("pattern") or {}).get("Regex")
        if pattern == _LLAMA3_REGEX:
            return "llama-bpe"
        if pattern == _QWEN2_REGEX:
            return "qwen2"
    raise ExportError(
        f"tokenizer: pre-tokenizer {kinds} is not one llama.cpp reproduces (gpt-2, smollm, llama-bpe, qwen2): "
        "llama.cpp would tokenize differently; use auto_round or compressed-tensors"
    )


def _add_vocab(writer: gguf.GGUFWriter, folder: Path, vocab_size: int) -> None:
    """The vocabulary as llama.cpp's converter writes it (``get_vocab_base`` + ``SpecialVocab``)."""
    tokenizer_file = folder / "tokenizer.json"
    if not tokenizer_file.is_file():
        writer.add_tokenizer_model("none")
        return
    tokenizer_json = json.loads(tokenizer_file.read_text(encoding="utf-8"))
    model = tokenizer_json.get("model", {})
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise ExportError(
            f"tokenizer: a {model.get('type')} tokenizer is not written by the gguf writer (byte-level BPE only); "
            "use auto_round or compressed-tensors"
        )
    pre = pretokenizer_name(tokenizer_json)
    reverse = {index: token for token, index in model["vocab"].items()}
    added = {entry["id"]: entry for entry in tokenizer_json.get("added_tokens", [])}
    tokens, types = [], []
    for index in range(vocab_size):
        if index in added:
            entry = added[index]
            tokens.append(entry["content"])
            types.append(gguf.TokenType.CONTROL if entry.get("special") else gguf.TokenType.USER_DEFINED)
        elif index in reverse:
            tokens.append(reverse[index])
            types.append(gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)


def _add_hparams(writer: gguf.GGUFWriter, model: _Model, file_type: gguf.LlamaFileType, name: str) -> None:
    config = model.config
    hidden = int(config["hidden_size"])
    writer.add_name(name)
    writer.add_context_length(int(config.get("max_position_embeddings", 2048)))
    writer.add_embedding_length(hidden)
    writer.add_block_count(model.n_blocks)
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(model.n_head)
    writer.add_head_count_kv(model.n_kv_head)
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_rope_dimension_count(int(config.get("head_dim") or hidden // model.n_head))
    writer.add_vocab_size(int(config["vocab_size"]))
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


# --- the plan of the file -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    """One tensor of the file: GGUF name, ggml type, and where its data comes from."""

    gguf_name: str
    hf_name: str
    qtype: gguf.GGMLQuantizationType
    keeps_codes: bool
    layer: LayerPlan | None


def layer_problem(layer: LayerPlan) -> str | None:
    """Why planned ``layer`` cannot be written in a GGUF file, or None if its plan can be."""
    scheme = layer.scheme
    head = f"{layer.name}: {scheme.name} cannot be written as {FORMAT_NAME}"
    if scheme.act is not None:
        return f"{head} (it quantizes activations; GGUF stores weights only); use compressed-tensors"
    in_features = layer.shape[1]
    if scheme.quantized and in_features % GGML_BLOCK:
        return (
            f"{head} (in_features {in_features} is not a multiple of {GGML_BLOCK}, ggml's block); use compressed-tensors"
        )
    return None


def _entries(checkpoint: QuantizedCheckpoint, model: _Model) -> list[_Entry]:
    planned = {f"{layer.name}.weight": layer for layer in checkpoint.plan.layers}
    with safe_open(str(checkpoint.path / TENSORS_FILE), framework="pt") as handle:
        keys = list(handle.keys())
        float_info = {
            key: (handle.get_slice(key).get_shape(), handle.get_slice(key).get_dtype()) for key in keys
        }
    tied = bool(model.config.get("tie_word_embeddings", False))
    names = list(float_info) + [name for name in planned if name not in float_info]
    lm_head = "lm_head.weight"
    if lm_head not in names and not tied:
        names.append(lm_head)  # an alias of the embeddings in the checkpoint, untied in the config
    entries, problems = [], []
    for hf_name in names:
        if tied and hf_name == lm_head and (lm_head not in planned or not planned[lm_head].scheme.quantized):
            continue  # llama.cpp reuses token_embd for the output
        gguf_name = model.gguf_name(hf_name)
        if gguf_name is None:
            if hf_name.endswith("rotary_emb.inv_freq"):
                continue
            problems.append(
                f"{hf_name}: no GGUF tensor name for it in a llama model; use auto_round or compressed-tensors"
            )
            continue
        layer = planned.get(hf_name)
        if layer is not None:
            problem = layer_problem(layer)
            if problem is not None:
                problems.append(problem)
                continue
            choice = ggml_type(layer.scheme, layer.shape[1])
            entries.append(_Entry(gguf_name, hf_name, choice.qtype, choice.keeps_codes, layer))
            continue
        source = (
            hf_name if hf_name in float_info else checkpoint.aliases.get(hf_name, "model.embed_tokens.weight")
        )
        shape, dtype = float_info[source]
        qtype = Q.F32 if len(shape) == 1 else (Q.BF16 if dtype == "BF16" else Q.F16)
        entries.append(_Entry(gguf_name, hf_name, qtype, True, None))
    join_problems(problems)
    return entries


def _float_data(entry: _Entry, source: dict[str, torch.Tensor], aliases: dict[str, str]) -> torch.Tensor:
    name = (
        entry.hf_name if entry.hf_name in source else aliases.get(entry.hf_name, "model.embed_tokens.weight")
    )
    return source[name]


def _rows(entry: _Entry, qt: QuantizedTensor | None, weight: torch.Tensor) -> np.ndarray:
    """The tensor's data, rows in HF order: ggml bytes for quantized types, floats otherwise."""
    if entry.qtype in (Q.F32, Q.F16, Q.BF16):
        values = weight.float().numpy()
        if entry.qtype == Q.F32:
            return values.astype(np.float32)
        if entry.qtype == Q.F16:
            if np.abs(values).max(initial=0) > np.finfo(np.float16).max:
                raise ExportError(
                    f"{entry.hf_name}: values overflow float16; use auto_round or compressed-tensors"
                )
            return values.astype(np.float16)
        return gguf.quants.quantize(values, Q.BF16)
    if entry.keeps_codes and qt is not None:
        return kept_code_rows(qt, entry.qtype)
    return requantized_rows(weight.float().numpy(), entry.qtype)


# --- verification -----------------------------------------------------------------------------------------


def verify_file(
    path: Path,
    entries: list[_Entry],
    expected: dict[str, np.ndarray],
    model: _Model,
    quantized: dict[str, QuantizedTensor],
) -> None:
    def fail(message: str) -> None:
        raise ExportVerificationError(f"{path.name}: {message}")

    reader = gguf.GGUFReader(path)
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    if set(tensors) != {entry.gguf_name for entry in entries}:
        fail(f"tensor names differ: {sorted(set(tensors) ^ {entry.gguf_name for entry in entries})[:3]}")
    if reader.fields["general.architecture"].contents() != "llama":
        fail("general.architecture is not llama")
    for entry in entries:
        tensor = tensors[entry.gguf_name]
        if tensor.tensor_type != entry.qtype:
            fail(f"{entry.gguf_name} has type {tensor.tensor_type.name}, planned {entry.qtype.name}")
        data = np.asarray(tensor.data)
        if not np.array_equal(data.view(np.uint8).ravel(), expected[entry.gguf_name].view(np.uint8).ravel()):
            fail(f"{entry.gguf_name}: bytes read back differ from the bytes written")
        if entry.layer is None or not entry.layer.scheme.quantized:
            continue
        values = gguf.quants.dequantize(data, tensor.tensor_type).reshape(entry.layer.shape)
        order = model.permutation(entry.hf_name, entry.layer.shape[0])
        if order is not None:
            values = values[np.argsort(order)]
        want = dequantize(quantized[entry.layer.name]).numpy()
        if entry.keeps_codes:
            qt = quantized[entry.layer.name]
            if qt.zeros is None:
                ok = np.array_equal(values, want)
            else:  # Q4_1/Q5_1: m = -zero*scale rounded to fp16; half an ulp of m per group at most
                m = np.abs(qt.zeros.numpy().astype(np.float32) * qt.scales.numpy().astype(np.float32))
                slack = np.repeat(np.spacing(m.astype(np.float16)).astype(np.float32) / 2, 32, axis=1)
                slack = slack + np.spacing(np.abs(want))  # and the float32 rounding of d * q + m
                ok = bool(np.all(np.abs(values - want) <= slack))
            if not ok:
                fail(f"{entry.gguf_name}: gguf's dequantization differs from the checkpoint's codes")
        else:
            rms = float(np.sqrt(np.mean(want.astype(np.float64) ** 2))) or 1.0
            error = float(np.sqrt(np.mean((values.astype(np.float64) - want) ** 2)))
            if not np.isfinite(values).all() or error > REQUANT_RMS_BOUND[entry.qtype] * rms:
                fail(
                    f"{entry.gguf_name}: re-quantized {entry.qtype.name} error {error / rms:.3f} of the weights' RMS"
                )


# --- the writer -------------------------------------------------------------------------------------------


class GgufWriter:
    """``gguf`` format: one llama.cpp file, per-tensor ggml types from the plan."""

    name = FORMAT_NAME
    description = (
        "GGUF for llama.cpp: Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 keeping tuned codes, K-quants re-quantized, BF16/F16"
    )
    dtypes = ("int", "mxfp", "nvfp", "fp8")
    int_bits = (2, 3, 4, 5, 6, 8)
    runtimes = ("llama.cpp",)

    def plan_problems(self, plan: Plan) -> list[str]:
        """Every planned layer a GGUF file cannot hold (the architecture and tokenizer are checked on the checkpoint)."""
        return [problem for layer in plan.layers if (problem := layer_problem(layer))]

    def check(self, checkpoint: QuantizedCheckpoint) -> None:
        """Raise ExportError for what the plan shows, then for the architecture, tensor names and tokenizer."""
        join_problems(self.plan_problems(checkpoint.plan))
        model = _model(checkpoint.config())
        _entries(checkpoint, model)
        tokenizer_file = checkpoint.path / "tokenizer.json"
        if tokenizer_file.is_file():
            tokenizer_json = json.loads(tokenizer_file.read_text(encoding="utf-8"))
            if tokenizer_json.get("model", {}).get("type") == "BPE":
                pretokenizer_name(tokenizer_json)

    def write(self, checkpoint: QuantizedCheckpoint, out_dir: Path) -> Path:
        """Write ``out_dir/model.gguf``, verify it, rename the folder into place."""
        self.check(checkpoint)
        model = _model(checkpoint.config())
        entries = _entries(checkpoint, model)
        quantized = checkpoint.quantized_tensors()
        source = checkpoint.float_tensors()
        data: dict[str, np.ndarray] = {}
        for entry in entries:
            qt = quantized.get(entry.layer.name) if entry.layer is not None else None
            weight = dequantize(qt) if qt is not None else _float_data(entry, source, checkpoint.aliases)
            rows = _rows(entry, qt, weight)
            order = model.permutation(entry.hf_name, rows.shape[0]) if rows.ndim == 2 else None
            data[entry.gguf_name] = np.ascontiguousarray(rows[order] if order is not None else rows)
        counts = Counter(
            entry.qtype for entry in entries if entry.layer is not None and entry.layer.scheme.quantized
        )
        file_type = (
            FILE_TYPES.get(counts.most_common(1)[0][0], gguf.LlamaFileType.GUESSED)
            if counts
            else gguf.LlamaFileType.MOSTLY_F16
        )
        out_dir = Path(out_dir)
        with atomic_directory(out_dir) as tmp:
            path = tmp / MODEL_FILE
            writer = gguf.GGUFWriter(path, "llama")
            _add_hparams(writer, model, file_type, checkpoint.plan.model_id or "model")
            _add_vocab(writer, checkpoint.path, int(model.config["vocab_size"]))
            for entry in entries:
                array = data[entry.gguf_name]
                quantized_type = entry.qtype not in (Q.F32, Q.F16)
                writer.add_tensor(entry.gguf_name, array, raw_dtype=entry.qtype if quantized_type else None)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
            verify_file(path, entries, data, model, quantized)
        return out_dir
