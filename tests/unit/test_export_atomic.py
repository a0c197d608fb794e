"""Every writer is all-or-nothing: a corrupted write fails its read-back verification and leaves
nothing behind, and an export killed (SIGKILL) after writing everything but before the rename leaves no
folder at the destination."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from test_export_auto_round import linear_names, make_checkpoint, tiny_model

from arctl_exporter import gguf_format, packing
from arctl_exporter.engine import export
from arctl_exporter.errors import ExportVerificationError
from arctl_exporter.registry import WRITERS, UnknownFormatError, get_writer

FORMATS = ["auto_round", "auto_gptq", "auto_awq", "compressed-tensors", "gguf"]
UNIT_DIR = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """W4A16G32 symmetric everywhere: a plan every format can hold."""
    model = tiny_model(tie=True)
    schemes = {name: "W4A16G32" for name in linear_names(model, with_lm_head=False)}
    path, _ = make_checkpoint(model, schemes, tmp_path_factory.mktemp("atomic") / "checkpoint")
    return path


def test_every_format_is_registered():
    assert sorted(WRITERS) == sorted(FORMATS)
    for name in FORMATS:
        writer = get_writer(name)
        assert writer.name == name and callable(writer.check) and callable(writer.write)
    with pytest.raises(
        UnknownFormatError, match="valid: auto_round, auto_gptq, auto_awq, compressed-tensors, gguf"
    ):
        get_writer("exl2")


def test_all_formats_in_one_call(checkpoint, tmp_path):
    written = export(checkpoint, FORMATS, tmp_path / "out")
    assert list(written) == FORMATS
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(FORMATS)
    assert (written["gguf"] / "model.gguf").is_file()


def _flip_first_bit(function):
    def corrupted(*args, **kwargs):
        result = function(*args, **kwargs)
        flipped = result.clone() if isinstance(result, torch.Tensor) else result.copy()
        flipped.reshape(-1)[0] ^= 1  # a view: both are contiguous
        return flipped

    return corrupted


@pytest.mark.parametrize(
    ("name", "target", "attribute"),
    [
        ("auto_gptq", packing, "pack_qweight"),
        ("auto_awq", packing, "pack_awq_qweight"),
        ("compressed-tensors", packing, "pack_stream"),
        ("gguf", gguf_format, "kept_code_rows"),
    ],
)
def test_a_corrupted_write_fails_verification_and_leaves_nothing(
    checkpoint, tmp_path, monkeypatch, name, target, attribute
):
    monkeypatch.setattr(target, attribute, _flip_first_bit(getattr(target, attribute)))
    with pytest.raises(ExportVerificationError):
        export(checkpoint, [name], tmp_path / "model")
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its temporary


@pytest.mark.parametrize("name", FORMATS)
def test_a_killed_export_leaves_no_folder(checkpoint, tmp_path, name):
    """The export runs in a child whose last step before the rename blocks; SIGKILL it there."""
    destination = tmp_path / "model"
    script = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(UNIT_DIR)!r})
        import arctl.atomic
        def stall(folder):
            print("written", flush=True)
            time.sleep(120)
        arctl.atomic._make_readable = stall
        from arctl_exporter.engine import export
        export({str(checkpoint)!r}, [{name!r}], {str(destination)!r})
        """
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "written"  # every file is in the temporary folder
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    time.sleep(0.1)
    assert not destination.exists()
    leftovers = [path.name for path in tmp_path.iterdir()]
    assert all(entry.startswith(".model.tmp-") for entry in leftovers)  # only a hidden temporary remains
