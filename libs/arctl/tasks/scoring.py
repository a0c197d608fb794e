"""Log-likelihood of continuations, the way lm-evaluation-harness's HF backend computes it, faster.

Tokenization (the harness's ``_encode_pair``): trailing spaces of the context move to the
continuation; ``whole = encode(context + continuation)``, ``ctx = encode(context)`` (the tokenizer's
own special-token default), and the continuation's tokens are ``whole[len(ctx):]``. The model reads
``(ctx + cont)[-(max_length + 1):][:-1]`` and the last ``len(cont)`` positions predict ``cont``:
``logprob`` is their summed log-softmax (float32), ``greedy`` says every argmax equals the target.

Speed, without changing those numbers beyond float rounding:
- the requests of one document share a token prefix (the context): it runs once, its key/value
  cache is repeated for the choices, and only the rest of each request runs after it;
- documents of similar length run together in batches (right-padded, masked);
- logits are computed only for the last positions that are scored.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from arctl.models import context_length
from arctl.tasks.items import Item, Request


@dataclass(frozen=True)
class Score:
    """One request's log P(continuation | context) and whether greedy decoding reproduces it."""

    logprob: float
    greedy: bool


@dataclass(frozen=True)
class Encoded:
    """A request as token ids: what the model reads and the targets of its last positions."""

    inputs: list[int]
    targets: list[int]


def encode_request(tokenizer, request: Request, max_length: int) -> Encoded:  # type: ignore[no-untyped-def]
    """The harness's tokenization of one request, left-truncated to ``max_length`` model inputs."""
    context, continuation = request.context, request.continuation
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if not continuation:
        raise ValueError("a request needs a non-empty continuation")
    if context:
        whole = list(tokenizer.encode(context + continuation))
        context_ids = list(tokenizer.encode(context))
        targets = whole[len(context_ids) :]
        tokens = context_ids + targets
    else:
        targets = list(tokenizer.encode(continuation))
        tokens = [tokenizer.eos_token_id, *targets]
    if not targets:
        raise ValueError(f"the continuation {request.continuation!r} encodes to no tokens")
    tokens = tokens[-(max_length + 1) :]
    return Encoded(tokens[:-1], targets[-(len(tokens) - 1) :])


def shared_prefix_length(requests: Sequence[Encoded]) -> int:
    """Tokens every request's input starts with, stopping before the first scored position of any
    request (so the prefix needs no logits)."""
    limit = min(len(r.inputs) - len(r.targets) for r in requests)
    first = requests[0].inputs
    length = 0
    while length < limit and all(r.inputs[length] == first[length] for r in requests[1:]):
        length += 1
    return length


def scores_from_logits(logits: torch.Tensor, targets: list[int]) -> Score:
    """``logits`` ``[len(targets), vocab]`` at the positions that predict ``targets``."""
    logprobs = F.log_softmax(logits.float(), dim=-1)
    target = torch.tensor(targets, dtype=torch.long)
    picked = logprobs.gather(1, target[:, None]).squeeze(1)
    return Score(float(picked.double().sum()), bool((logprobs.argmax(dim=-1) == target).all()))


class LoglikelihoodScorer:
    """Scores items of a task with one Hugging Face causal LM.

    Documents run in groups of at most ``batch_size`` requests (a document with more requests runs
    alone). Single-request documents (LAMBADA) run whole, in one pass. Otherwise a group runs in two
    forward passes: the documents' shared prefixes, right-padded, fill a
    key/value cache; the cache rows are repeated per request and the rest of each request runs after
    its prefix, with an attention mask that hides the prefix padding and position ids that continue
    each prefix.
    """

    def __init__(self, model: nn.Module, tokenizer, max_length: int | None = None, batch_size: int = 16) -> None:  # type: ignore[no-untyped-def]
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length or _model_max_length(model)
        self.batch_size = batch_size
        parameters = inspect.signature(model.forward).parameters
        self._cache_argument = "cache" if "cache" in parameters else "past_key_values"
        self._pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)

    @torch.inference_mode()
    def score(self, items: Sequence[Item], progress: Callable[[int, int], None] | None = None) -> list[list[Score]]:
        """Scores for every request of every item, in order; ``progress(done, total)`` per group."""
        encoded = [[encode_request(self.tokenizer, r, self.max_length) for r in item.requests] for item in items]
        prefixes = [shared_prefix_length(requests) for requests in encoded]
        # longest first (as the harness): similar lengths share a group, little padding
        order = sorted(range(len(items)), key=lambda i: -max(len(r.inputs) for r in encoded[i]))
        results: dict[int, list[Score]] = {}
        group: list[int] = []
        for position, index in enumerate(order):
            group.append(index)
            following = order[position + 1] if position + 1 < len(order) else None
            size = sum(len(encoded[i]) for i in group)
            if following is None or size + len(encoded[following]) > self.batch_size:
                scores = self._score_group([encoded[i] for i in group], [prefixes[i] for i in group])
                results.update(zip(group, scores, strict=True))
                group = []
                if progress:
                    progress(len(results), len(items))
        return [results[i] for i in range(len(items))]

    def _score_group(self, documents: list[list[Encoded]], prefixes: list[int]) -> list[list[Score]]:
        if all(len(document) == 1 for document in documents):  # nothing to share: one pass
            return _split(self._score_whole([d[0] for d in documents]), documents)
        if min(prefixes) == 0:  # a document with nothing shared (one-token context): run whole requests
            return [self._score_whole(requests) for requests in documents]
        owner = torch.tensor([d for d, requests in enumerate(documents) for _ in requests], dtype=torch.long)
        requests = [r for document in documents for r in document]
        prefix_rows = [document[0].inputs[:length] for document, length in zip(documents, prefixes, strict=True)]
        prefix_ids, prefix_mask = self._padded(prefix_rows)
        # right padding under causal attention: no real position sees it, so no mask in this pass
        out = self.model(prefix_ids, use_cache=True, logits_to_keep=1)
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        cache.reorder_cache(owner)
        starts = [prefixes[d] for d in owner.tolist()]
        rows = [r.inputs[start:] for r, start in zip(requests, starts, strict=True)]
        ids, mask = self._padded(rows)
        positions = torch.tensor(starts, dtype=torch.long)[:, None] + torch.arange(ids.shape[1])[None, :]
        keep = ids.shape[1] - min(len(row) - len(r.targets) for row, r in zip(rows, requests, strict=True))
        out = self.model(
            ids,
            attention_mask=torch.cat([prefix_mask[owner], mask], dim=1),
            position_ids=positions,
            use_cache=True,
            logits_to_keep=keep,
            **{self._cache_argument: cache},
        )
        return _split(self._scores(out.logits, rows, [r.targets for r in requests]), documents)

    def _score_whole(self, requests: list[Encoded]) -> list[Score]:
        """Whole requests in one right-padded pass (causal attention: no mask needed)."""
        rows = [r.inputs for r in requests]
        ids, _ = self._padded(rows)
        keep = ids.shape[1] - min(len(r.inputs) - len(r.targets) for r in requests)
        out = self.model(ids, use_cache=False, logits_to_keep=keep)
        return self._scores(out.logits, rows, [r.targets for r in requests])

    def _padded(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ids ``[len(rows), width]`` and the mask of real tokens."""
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [self._pad] * (width - len(r)) for r in rows], dtype=torch.long)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], dtype=torch.long)
        return ids, mask

    @staticmethod
    def _scores(logits: torch.Tensor, rows: list[list[int]], targets: list[list[int]]) -> list[Score]:
        """Scores from logits of the last ``logits.shape[1]`` positions of right-padded ``rows``."""
        width = max(len(r) for r in rows)
        skipped = width - logits.shape[1]
        scores = []
        for b, (row, target) in enumerate(zip(rows, targets, strict=True)):
            end = len(row) - skipped
            scores.append(scores_from_logits(logits[b, end - len(target) : end], target))
        return scores


def _split(scores: list[Score], documents: list[list[Encoded]]) -> list[list[Score]]:
    """Flat scores back into one list per document."""
    grouped, at = [], 0
    for document in documents:
        grouped.append(scores[at : at + len(document)])
        at += len(document)
    return grouped


def _model_max_length(model: nn.Module) -> int:
    """The harness's rule: the config's context length, else 2048."""
    return context_length(model) or 2048
