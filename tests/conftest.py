"""Shared fixtures: a tiny random Llama saved as a safetensors folder with a word-level tokenizer,
and the offline data folder (tests that need it skip when it is absent)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_models import tiny_llama, tiny_tokenizer

from arctl.data import default_data_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(str(folder), safe_serialization=True)
    tiny_tokenizer().save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def shared_data() -> Path:
    folder = default_data_dir()
    if folder is None or not (folder / "wikitext-2-raw" / "wiki.test.raw").is_file():
        pytest.skip("offline data folder (../shared/data or ARCTL_DATA_DIR) is absent")
    return folder
