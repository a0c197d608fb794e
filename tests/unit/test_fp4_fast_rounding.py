"""The arithmetic E2M1 rounding used on the hot path equals the table definition everywhere."""

from __future__ import annotations

import torch

from arctl.quant.rounding import fp4_codes, fp4_codes_by_table, fp4_values, round_fp4_ste

TIES = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 7.0, 0.0]


def test_fast_codes_equal_table_codes_on_a_dense_grid_and_every_tie() -> None:
    ties = torch.tensor(TIES + [-t for t in TIES])
    x = torch.cat([torch.linspace(-9, 9, 360_001), ties, torch.nextafter(ties, ties + 1), torch.nextafter(ties, ties - 1)])
    assert torch.equal(fp4_codes(x), fp4_codes_by_table(x))
    assert torch.equal(round_fp4_ste(x), fp4_values(fp4_codes_by_table(x)))


def test_negative_zero_has_no_sign_bit() -> None:
    assert fp4_codes(torch.tensor([-0.0, -0.1])).tolist() == [0, 0]
