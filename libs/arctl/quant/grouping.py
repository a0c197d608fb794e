"""Reshaping a weight matrix into scale groups and back."""

from __future__ import annotations

import torch

from arctl.schemes import PER_CHANNEL, Scheme


class SchemeShapeError(ValueError):
    """The scheme's groups do not tile the weight's rows."""


def group_width(scheme: Scheme, in_features: int) -> int:
    """Inputs per scale group for a row of ``in_features``."""
    if scheme.group_size in (0, PER_CHANNEL):
        return in_features
    return scheme.group_size


def to_groups(weight: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """``[out, in]`` -> ``[out, groups, group_width]``.

    Raises:
        SchemeShapeError: when ``in`` is not a multiple of the group size.
    """
    if weight.dim() != 2:
        raise SchemeShapeError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    if not scheme.fits(in_features):
        raise SchemeShapeError(
            f"{scheme.name}: in_features {in_features} is not a multiple of group size {scheme.group_size}"
        )
    width = group_width(scheme, in_features)
    return weight.reshape(out_features, in_features // width, width)


def from_groups(grouped: torch.Tensor) -> torch.Tensor:
    """``[out, groups, group_width]`` -> ``[out, in]``."""
    return grouped.reshape(grouped.shape[0], -1)
