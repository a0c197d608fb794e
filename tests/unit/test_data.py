"""Text readers, dataset names, the WikiText-2 test protocol and calibration sampling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from arctl.data import (
    DATA_DIR_ENV,
    LOCAL_DATASETS,
    DataError,
    calibration_samples,
    default_data_dir,
    load_texts,
    read_texts,
    resolve_dataset,
    wikitext2_rows,
    wikitext2_test_text,
)

VOCAB = 300


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over ``w0..w299``: one token per word; adds ``<s>`` (id 1) by default;
    eos ``</s>`` is id 2."""
    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="[UNK]"
    )


def doc(n_words: int, offset: int = 0) -> str:
    return " ".join(f"w{(offset + i) % VOCAB}" for i in range(n_words))


@pytest.fixture
def shared_data() -> Path:
    found = default_data_dir()
    if found is None or not (found / LOCAL_DATASETS["wikitext2"]["test"]).is_file():
        pytest.skip(f"offline data folder not found (set {DATA_DIR_ENV} or provide ../shared/data)")
    return found


# --------------------------------------------------------------------------- readers


def test_read_txt_one_text_per_non_empty_line(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("first line\n\n   \nsecond \u2028 line\r\nthird", encoding="utf-8")
    assert read_texts(path) == ["first line", "second \u2028 line", "third"]


def test_read_jsonl_default_and_named_field(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    rows = [{"text": "alpha", "body": "A"}, {"text": "beta", "body": "B"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    assert read_texts(path) == ["alpha", "beta"]
    assert read_texts(path, field="body") == ["A", "B"]


def test_bad_json_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:3: invalid JSON"):
        read_texts(path)


def test_missing_field_names_line_and_fields(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "ok"}\n{"body": "no text"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"a\.jsonl:2: no field 'text' \(fields: body\)"):
        read_texts(path)
    path.write_text('{"text": 3}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r":1: field 'text' is int"):
        read_texts(path)
    path.write_text("[1, 2]\n", encoding="utf-8")
    with pytest.raises(DataError, match=r":1: expected a JSON object"):
        read_texts(path)


def test_missing_unreadable_and_unsupported_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.txt does not exist"):
        read_texts(tmp_path / "nope.txt")
    (tmp_path / "dir.txt").mkdir()
    with pytest.raises(DataError, match="is not a file"):
        read_texts(tmp_path / "dir.txt")
    binary = tmp_path / "b.txt"
    binary.write_bytes(b"ok\n\xff\xfe\n")
    with pytest.raises(DataError, match="not UTF-8"):
        read_texts(binary)
    other = tmp_path / "a.csv"
    other.write_text("x\n")
    with pytest.raises(DataError, match=r"unsupported format '\.csv'.*\.jsonl"):
        read_texts(other)


# --------------------------------------------------------------------------- names and folders


def test_unknown_dataset_name_lists_valid_names_and_never_goes_online(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        resolve_dataset("allenai/c4", data_dir=tmp_path)
    message = str(info.value)
    assert "c4" in message and "wikitext2" in message
    assert "network" in message


def test_names_resolve_under_the_data_dir(tmp_path: Path) -> None:
    target = tmp_path / LOCAL_DATASETS["c4"]["train"]
    with pytest.raises(DataError, match="does not exist"):
        resolve_dataset("c4", data_dir=tmp_path)
    target.parent.mkdir(parents=True)
    target.write_text('{"text": "doc"}\n')
    assert resolve_dataset("c4", data_dir=tmp_path) == target
    assert load_texts("c4", data_dir=tmp_path) == ["doc"]
    with pytest.raises(DataError, match="no split 'test'; valid splits: train"):
        resolve_dataset("c4", data_dir=tmp_path, split="test")
    with pytest.raises(DataError, match="does not exist or is not a folder"):
        resolve_dataset("c4", data_dir=tmp_path / "missing")


def test_a_file_path_resolves_to_itself(tmp_path: Path) -> None:
    path = tmp_path / "mine.txt"
    path.write_text("x\n")
    assert resolve_dataset(path) == path
    assert resolve_dataset(str(path)) == path


def test_default_data_dir_prefers_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    assert default_data_dir() == tmp_path


# --------------------------------------------------------------------------- WikiText-2 protocol


def test_wikitext2_rows_follow_the_hf_layout() -> None:
    raw = " \n = Title = \n \n Body text . \n"
    assert wikitext2_rows(raw) == ["", " = Title = \n", "", " Body text . \n"]
    assert "\n\n".join(wikitext2_rows(raw)) == "\n\n = Title = \n\n\n\n\n Body text . \n"


def test_shared_wikitext2_test_text(shared_data: Path) -> None:
    raw = (shared_data / LOCAL_DATASETS["wikitext2"]["test"]).read_bytes().decode("utf-8")
    rows = wikitext2_rows(raw)
    assert len(rows) == 4358  # README: 4358 lines
    assert sum(1 for row in rows if row == "") == 1467  # README: 1467 blank rows
    assert rows[0] == "" and rows[1] == " = Robert Boulter = \n"
    assert sum(len(line.split()) for line in raw.split("\n")) == 241_211  # README: whitespace words
    text = wikitext2_test_text(shared_data)
    assert text.startswith("\n\n = Robert Boulter = \n\n\n\n\n Robert Boulter is an English film")
    assert text == "\n\n".join(rows)


def test_shared_calibration_files_read(shared_data: Path) -> None:
    c4 = load_texts("c4", data_dir=shared_data)
    assert len(c4) == 1000
    assert c4[0].startswith("Beginners BBQ Class Taking Place in Missoula!")
    train = load_texts("wikitext2", data_dir=shared_data)
    assert len(train) == 1065
    assert train[0] == " = Valkyria Chronicles III = "


# --------------------------------------------------------------------------- calibration


def test_calibration_is_reproducible_and_seeded(tokenizer: PreTrainedTokenizerFast) -> None:
    texts = [doc(40 + 7 * i, offset=11 * i) for i in range(12)]
    a = calibration_samples(tokenizer, texts, nsamples=4, seqlen=16, seed=0)
    b = calibration_samples(tokenizer, texts, nsamples=4, seqlen=16, seed=0)
    c = calibration_samples(tokenizer, texts, nsamples=4, seqlen=16, seed=1)
    assert a.input_ids.shape == (4, 16) and a.input_ids.dtype == torch.long
    assert torch.equal(a.input_ids, b.input_ids)
    assert not torch.equal(a.input_ids, c.input_ids)
    assert (a.mode, a.skipped_short, a.documents_used, a.seed) == ("documents", 0, 4, 0)
    assert a.source == "<12 texts>"
    assert not (a.input_ids == tokenizer.bos_token_id).any()  # no special tokens inside windows


def test_windows_come_from_one_document(tokenizer: PreTrainedTokenizerFast) -> None:
    texts = [doc(50, offset=100 * i) for i in range(3)]  # disjoint, consecutive ids per document
    samples = calibration_samples(tokenizer, texts, nsamples=3, seqlen=10, seed=5)
    steps = samples.input_ids[:, 1:] - samples.input_ids[:, :-1]
    assert bool((steps == 1).all())


def test_short_documents_are_skipped_and_counted(tokenizer: PreTrainedTokenizerFast) -> None:
    long_docs = [doc(30, 0), doc(31, 100), doc(33, 200)]  # ids 3..35, 103..136, 203..238
    texts = [doc(3), long_docs[0], doc(5), long_docs[1], doc(2), long_docs[2], ""]  # 4 short ones
    skipped = set()
    for seed in range(20):
        samples = calibration_samples(tokenizer, texts, nsamples=3, seqlen=20, seed=seed)
        assert samples.mode == "documents" and samples.documents_used == 3
        firsts = sorted(int(row[0]) // 100 for row in samples.input_ids)
        assert firsts == [0, 1, 2]  # one window from each long document, none from a short one
        skipped.add(samples.skipped_short)
    # the short documents visited before the third long one are counted: all 4 when it comes last
    assert skipped <= {0, 1, 2, 3, 4} and 4 in skipped


def test_too_few_long_documents_fall_back_to_the_joined_stream(tokenizer: PreTrainedTokenizerFast) -> None:
    texts = [doc(6, 10 * i) for i in range(10)]  # 60 tokens + 9 eos
    samples = calibration_samples(tokenizer, texts, nsamples=5, seqlen=16, seed=3)
    assert samples.mode == "concatenated"
    assert samples.input_ids.shape == (5, 16)
    assert (samples.skipped_short, samples.documents_used, samples.stream_tokens) == (0, 10, 69)
    assert bool((samples.input_ids == tokenizer.eos_token_id).any())
    again = calibration_samples(tokenizer, texts, nsamples=5, seqlen=16, seed=3)
    assert torch.equal(samples.input_ids, again.input_ids)


def test_calibration_errors(tokenizer: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="yields no tokens"):
        calibration_samples(tokenizer, ["", "  "], nsamples=1, seqlen=4, seed=0)
    with pytest.raises(DataError, match="fewer than one window"):
        calibration_samples(tokenizer, [doc(3)], nsamples=1, seqlen=4, seed=0)
    with pytest.raises(ValueError, match="must be positive"):
        calibration_samples(tokenizer, [doc(30)], nsamples=0, seqlen=4, seed=0)
    with pytest.raises(DataError, match="valid names"):
        calibration_samples(tokenizer, "no-such-dataset", nsamples=1, seqlen=4, seed=0, data_dir=tmp_path)


def test_calibration_from_a_jsonl_file(tokenizer: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    path = tmp_path / "cal.jsonl"
    path.write_text("\n".join(json.dumps({"text": doc(25, i)}) for i in range(4)) + "\n")
    samples = calibration_samples(tokenizer, path, nsamples=2, seqlen=8, seed=0)
    assert samples.input_ids.shape == (2, 8)
    assert samples.source == str(path)
