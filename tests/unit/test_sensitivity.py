"""The Fisher statistics: ``gbar`` is the mean of the squared output gradients under labels sampled
from the float model and under the real next tokens, ``H`` the input second moment."""

from __future__ import annotations

import torch
from tiny_models import TINY_VOCAB, tiny_llama
from torch.nn import functional

from arctl.models import quantizable_layers
from arctl_planner.sensitivity import collect_statistics


def _squared_output_grads(model, name: str, ids: torch.Tensor, labels_of) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over tokens of the squared gradient of ``name``'s output, and of ``x x^T`` of its input."""
    captured = {}

    def hook(_module, args, output):
        captured["x"] = args[0].detach().reshape(-1, args[0].shape[-1])
        output.retain_grad()
        captured["y"] = output

    handle = model.get_submodule(name).register_forward_hook(hook)
    try:
        embeddings = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        logits = model(inputs_embeds=embeddings, use_cache=False).logits[0, :-1].float()
        functional.cross_entropy(logits, labels_of(logits), reduction="sum").backward()
    finally:
        handle.remove()
    grad = captured["y"].grad.reshape(-1, captured["y"].shape[-1])
    return grad.pow(2).sum(0), captured["x"].T @ captured["x"]


def test_fisher_statistics_average_sampled_and_real_labels() -> None:
    model = tiny_llama(seed=3).eval()
    ids = torch.randint(0, TINY_VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    layers = quantizable_layers(model)
    name = layers[1].name
    stats = collect_statistics(model, layers, ids, seed=5)[name]

    generator = torch.Generator().manual_seed(5)
    grad_sq, moment = 0, 0
    for row in ids:
        def sampled(logits, generator=generator):
            return torch.multinomial(functional.softmax(logits.detach(), dim=-1), 1, generator=generator).squeeze(-1)

        g_sampled, x_moment = _squared_output_grads(model, name, row.unsqueeze(0), sampled)
        g_real, _ = _squared_output_grads(model, name, row.unsqueeze(0), lambda logits, row=row: row[1:])
        grad_sq = grad_sq + g_sampled + g_real
        moment = moment + x_moment
    tokens = ids.numel()
    torch.testing.assert_close(stats.output_grad_sq, grad_sq / (2 * tokens))
    torch.testing.assert_close(stats.input_moment, moment / tokens)
    assert stats.tokens == tokens
