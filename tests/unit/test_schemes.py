"""Schemes: presets, names, lookup errors, validation, shape fit and the dict round trip."""

from __future__ import annotations

import pytest

from arctl.schemes import DATA_TYPES, PER_CHANNEL, PRESETS, Scheme, UnknownSchemeError, get_scheme


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("W4A16", Scheme("int", 4, 128, sym=True)),
        ("W4A16G64", Scheme("int", 4, 64, sym=True)),
        ("W2A16G32_ASYM", Scheme("int", 2, 32, sym=False)),
        ("W3A16G32", Scheme("int", 3, 32, sym=True)),
        ("W8A16_ASYM", Scheme("int", 8, 128, sym=False)),
        ("W4A16C", Scheme("int", 4, PER_CHANNEL, sym=True)),
        ("MXFP4", Scheme("mxfp", 4, 32)),
        ("MXFP8", Scheme("mxfp", 8, 32)),
        ("NVFP4", Scheme("nvfp", 4, 16)),
        ("FP8", Scheme("fp8", 8, PER_CHANNEL)),
        ("BF16", Scheme("bf16", 16, 0)),
    ],
)
def test_preset_values(name: str, expected: Scheme) -> None:
    scheme = get_scheme(name)
    assert scheme == expected
    assert (scheme.dtype, scheme.bits, scheme.group_size, scheme.sym) == (
        expected.dtype,
        expected.bits,
        expected.group_size,
        expected.sym,
    )


def test_w4a16_is_int4_g128_sym() -> None:
    scheme = PRESETS["W4A16"]
    assert scheme.dtype == "int"
    assert scheme.bits == 4
    assert scheme.group_size == 128
    assert scheme.sym is True
    assert scheme.quantized


def test_every_design_candidate_is_a_preset() -> None:
    for bits in (2, 3, 4, 8):
        for group in (32, 64, 128):
            for sym in (True, False):
                scheme = Scheme("int", bits, group, sym)
                assert PRESETS[scheme.name] == scheme
    for name in ("MXFP4", "MXFP8", "NVFP4", "FP8", "BF16"):
        assert name in PRESETS


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_names_round_trip(name: str) -> None:
    scheme = PRESETS[name]
    assert scheme.name == name
    assert get_scheme(scheme.name) == scheme


def test_names_are_unique() -> None:
    assert len({s for s in PRESETS.values()}) == len(PRESETS)


def test_int_names() -> None:
    assert Scheme("int", 4, 128).name == "W4A16"
    assert Scheme("int", 4, 64).name == "W4A16G64"
    assert Scheme("int", 2, 32, sym=False).name == "W2A16G32_ASYM"
    assert Scheme("int", 3, PER_CHANNEL).name == "W3A16C"
    assert Scheme("int", 8, 128, sym=False).name == "W8A16_ASYM"


@pytest.mark.parametrize("spelling", ["w4a16g64", "W4a16G64", "  w4a16g64 ", "mxfp4", "NvFp4", "bf16"])
def test_lookup_is_case_insensitive(spelling: str) -> None:
    assert get_scheme(spelling) == PRESETS[spelling.strip().upper()]


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(UnknownSchemeError) as info:
        get_scheme("W5A16G7")
    message = str(info.value)
    assert "W5A16G7" in message
    for name in ("W4A16", "W4A16G64", "W2A16G32_ASYM", "MXFP4", "MXFP8", "NVFP4", "FP8", "BF16"):
        assert name in message
    # Every preset is listed, not just a few.
    assert all(name in message for name in PRESETS)


def test_unknown_scheme_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        get_scheme("INT4")


@pytest.mark.parametrize(
    "args",
    [
        ("float", 4, 32, True),  # unknown data type
        ("int", 1, 128, True),  # too few bits
        ("int", 9, 128, True),  # too many bits
        ("int", 16, 128, True),
        ("int", 4, 0, True),  # group 0 is only for bf16
        ("int", 4, -2, True),
        ("mxfp", 6, 32, True),
        ("mxfp", 4, 16, True),
        ("mxfp", 4, 32, False),  # MX is symmetric
        ("mxfp", 8, 64, True),
        ("nvfp", 8, 16, True),
        ("nvfp", 4, 32, True),
        ("nvfp", 4, 16, False),
        ("fp8", 8, 128, True),  # FP8 is per channel
        ("fp8", 4, PER_CHANNEL, True),
        ("fp8", 8, PER_CHANNEL, False),
        ("bf16", 8, 0, True),
        ("bf16", 16, 128, True),
        ("bf16", 16, 0, False),
    ],
)
def test_invalid_combinations_raise(args: tuple) -> None:
    with pytest.raises(ValueError):
        Scheme(*args)


def test_unknown_data_type_message_lists_valid_types() -> None:
    with pytest.raises(ValueError) as info:
        Scheme("float", 4, 32)  # type: ignore[arg-type]
    assert all(dtype in str(info.value) for dtype in DATA_TYPES)


def test_schemes_are_frozen_and_hashable() -> None:
    scheme = get_scheme("W4A16")
    with pytest.raises(AttributeError):
        scheme.bits = 3  # type: ignore[misc]
    assert {scheme: 1}[Scheme("int", 4, 128)] == 1


def test_quantized_flag() -> None:
    assert not get_scheme("BF16").quantized
    assert all(s.quantized for n, s in PRESETS.items() if n != "BF16")


# SmolLM2 rows are 576 wide: 576 = 4.5 * 128 = 9 * 64 = 18 * 32 = 36 * 16.
@pytest.mark.parametrize(
    ("name", "fits", "groups"),
    [
        ("W4A16G64", True, 9),
        ("W4A16G32", True, 18),
        ("W2A16G32_ASYM", True, 18),
        ("MXFP4", True, 18),
        ("MXFP8", True, 18),
        ("NVFP4", True, 36),
        ("FP8", True, 1),
        ("W4A16C", True, 1),
        ("BF16", True, 1),
    ],
)
def test_fits_and_groups_for_576(name: str, fits: bool, groups: int) -> None:
    scheme = get_scheme(name)
    assert scheme.fits(576) is fits
    assert scheme.groups(576) == groups


@pytest.mark.parametrize("name", ["W4A16", "W2A16_ASYM", "W8A16"])
def test_g128_does_not_fit_576(name: str) -> None:
    assert get_scheme(name).fits(576) is False
    assert get_scheme(name).fits(1536) is True  # 12 * 128
    assert get_scheme(name).groups(1536) == 12


def test_mx_does_not_fit_odd_widths() -> None:
    assert not get_scheme("MXFP4").fits(48)
    assert get_scheme("NVFP4").fits(48)
    assert not get_scheme("NVFP4").fits(40)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_dict_round_trip(name: str) -> None:
    scheme = PRESETS[name]
    data = scheme.to_dict()
    assert set(data) == {"dtype", "bits", "group_size", "sym"} | ({"act"} if scheme.act is not None else set())
    assert Scheme.from_dict(data) == scheme


def test_to_dict_values() -> None:
    assert get_scheme("W2A16G32_ASYM").to_dict() == {
        "dtype": "int",
        "bits": 2,
        "group_size": 32,
        "sym": False,
    }
    assert get_scheme("FP8").to_dict() == {"dtype": "fp8", "bits": 8, "group_size": -1, "sym": True}


def test_from_dict_sym_defaults_to_true() -> None:
    assert Scheme.from_dict({"dtype": "int", "bits": 4, "group_size": 64}) == get_scheme("W4A16G64")


def test_from_dict_rejects_unknown_keys() -> None:
    data = {"dtype": "int", "bits": 4, "group_size": 64, "sym": True, "act_bits": 16}
    with pytest.raises(ValueError) as info:
        Scheme.from_dict(data)
    assert "act_bits" in str(info.value)


def test_from_dict_validates_values() -> None:
    with pytest.raises(ValueError):
        Scheme.from_dict({"dtype": "mxfp", "bits": 4, "group_size": 64, "sym": True})
