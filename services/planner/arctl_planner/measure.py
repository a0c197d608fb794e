"""Measured KL of a planned model: the plan applied with round-to-nearest, against the float model,
on calibration tokens. Weights are changed in place and restored. ``SwapMeasure`` also measures
plans that differ in a few layers without rerunning the blocks before the first change."""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any, Self

import torch
from torch import nn
from torch.nn import functional

from arctl.models import decoder_blocks, output_layer_name, untied_output
from arctl.plan import Plan
from arctl.quant import fake_quantize
from arctl.schemes import Scheme


@torch.no_grad()
def reference_log_probs(model: nn.Module, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """Float log-probabilities per calibration row (kept to compare several plans)."""
    return [functional.log_softmax(model(row.unsqueeze(0), use_cache=False).logits[0].float(), dim=-1) for row in input_ids]


def measured_kl(model: nn.Module, plan: Plan, input_ids: torch.Tensor, reference: list[torch.Tensor]) -> float:
    """Mean KL(float || planned) per token over ``input_ids`` ``[n, seqlen]`` (nats)."""
    with SwapMeasure(model, plan, input_ids, reference) as measure:
        return measure.kl


def _mean_kl(
    model: nn.Module,
    input_ids: torch.Tensor,
    reference: list[torch.Tensor],
    probabilities: list[torch.Tensor],
    cursor: list[int],
) -> float:
    """Mean KL(reference || model) per token, row by row (``probabilities``: ``reference``
    exponentiated); ``cursor[0]`` is set to the row's index before its forward pass."""
    total, count = 0.0, 0
    for index, (row, ref) in enumerate(zip(input_ids, reference, strict=True)):
        cursor[0] = index
        logp = functional.log_softmax(model(row.unsqueeze(0), use_cache=False).logits[0].float(), dim=-1)
        total += float((probabilities[index] * (ref - logp)).sum())
        count += ref.shape[0]
    return total / count


class _Replay(nn.Module):
    """Stands in for a decoder block whose output for the current row is already known; other
    attributes (e.g. a layer's attention type) are read from the block it replaces."""

    def __init__(self, block: nn.Module, outputs: list[Any], cursor: list[int]) -> None:
        super().__init__()
        self._replaced = [block]  # a list, so the block is not registered as a submodule
        self._outputs = outputs
        self._cursor = cursor

    def forward(self, *_args: Any, **_kwargs: Any) -> Any:
        return self._outputs[self._cursor[0]]

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._replaced[0], name)


class SwapMeasure:
    """Measured KL of a plan, and of trial plans that differ from it in a few layers, rerunning only
    the decoder blocks from the first changed one (the outputs of the blocks before it are kept from
    the last accepted plan and replayed). A trial's KL equals a fresh measurement of the same plan:
    the same weights and the same inputs reach every block.

    Use as a context manager: the planned weights are applied in place on entry and the float
    weights restored on exit (a planned output layer tied to the embeddings is untied meanwhile;
    planned tied embeddings carry the output layer with them). ``trial(changes)`` measures a change
    of schemes, then ``accept()`` or ``reject()`` it.
    """

    def __init__(self, model: nn.Module, plan: Plan, input_ids: torch.Tensor, reference: list[torch.Tensor]) -> None:
        self.model = model
        self.rows = input_ids
        self.reference = reference
        self.probabilities = [ref.exp() for ref in reference]
        self.blocks = decoder_blocks(model)
        self.head = output_layer_name(model)
        self.schemes = {layer.name: layer.scheme for layer in plan.layers}
        self.originals: dict[str, torch.Tensor] = {}
        self.outputs: list[list[Any]] = []
        self.kl = float("nan")
        self._pending: tuple[dict[str, Scheme], dict[str, torch.Tensor], int, list[list[Any]], float] | None = None
        self._untied = ExitStack()

    def __enter__(self) -> Self:
        try:
            if self.head in self.schemes:  # a planned head is untied: the embeddings keep their own weight
                self._untied.enter_context(untied_output(self.model))
            with torch.no_grad():
                for name, scheme in self.schemes.items():
                    weight = self.model.get_submodule(name).weight
                    self.originals[name] = weight.detach().clone()
                    self._set(name, scheme)
            self.kl, self.outputs = self._run(0)
        except BaseException:
            self.__exit__()  # the float weights go back even when the first measurement fails
            raise
        return self

    def __exit__(self, *_exc: object) -> None:
        with torch.no_grad():
            for name, weight in self.originals.items():
                self.model.get_submodule(name).weight.copy_(weight)
        self._untied.close()

    def _set(self, name: str, scheme: Scheme) -> None:
        weight = self.model.get_submodule(name).weight
        with torch.no_grad():
            weight.copy_(fake_quantize(self.originals[name].float(), scheme).to(weight.dtype))

    def _first_block(self, names: list[str]) -> int:
        starts = []
        for name in names:
            # the output layer changes nothing before it (replay every block), the embeddings everything
            outside = len(self.blocks) if name == self.head else 0
            index = next((i for i, (block, _) in enumerate(self.blocks) if name.startswith(f"{block}.")), outside)
            starts.append(index)
        return min(starts)

    @torch.no_grad()
    def _run(self, start: int) -> tuple[float, list[list[Any]]]:
        """KL with blocks ``< start`` replayed; the outputs of blocks ``>= start``."""
        cursor = [0]
        fresh: list[list[Any]] = [[] for _ in self.blocks[start:]]
        handles, swapped = [], []
        for offset, (name, block) in enumerate(self.blocks[start:]):
            def record(_module: nn.Module, _args: Any, output: Any, into: list[Any] = fresh[offset]) -> None:
                into.append(output.clone() if isinstance(output, torch.Tensor) else output)

            handles.append(block.register_forward_hook(record))
        try:
            for index, (name, block) in enumerate(self.blocks[:start]):
                parent_name, _, child = name.rpartition(".")
                parent = self.model.get_submodule(parent_name)
                setattr(parent, child, _Replay(block, self.outputs[index], cursor))
                swapped.append((parent, child, block))
            kl = _mean_kl(self.model, self.rows, self.reference, self.probabilities, cursor)
        finally:
            for parent, child, block in swapped:
                setattr(parent, child, block)
            for handle in handles:
                handle.remove()
        return kl, fresh

    def trial(self, changes: dict[str, Scheme]) -> float:
        """Measured KL with ``changes`` (layer -> scheme) on top of the current plan."""
        if self._pending is not None:
            raise RuntimeError("accept() or reject() the previous trial first")
        start = self._first_block(list(changes))
        saved = {name: self.model.get_submodule(name).weight.detach().clone() for name in changes}
        for name, scheme in changes.items():
            self._set(name, scheme)
        kl, outputs = self._run(start)
        self._pending = (changes, saved, start, outputs, kl)
        return kl

    def accept(self) -> None:
        if self._pending is None:
            raise RuntimeError("no trial to accept")
        changes, _saved, start, outputs, kl = self._pending
        self.schemes.update(changes)
        self.outputs = self.outputs[:start] + outputs
        self.kl = kl
        self._pending = None

    def reject(self) -> None:
        if self._pending is None:
            raise RuntimeError("no trial to reject")
        _changes, saved, _start, _outputs, _kl = self._pending
        with torch.no_grad():
            for name, weight in saved.items():
                self.model.get_submodule(name).weight.copy_(weight)
        self._pending = None
