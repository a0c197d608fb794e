"""Evaluation tasks: prompts (harness protocols), files, scoring against lm-evaluation-harness's own
HF backend on a tiny model, metrics by hand, and the ``arctl eval`` / ``arctl report`` commands."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_bpe_tokenizer, tiny_llama
from typer.testing import CliRunner

from arctl.data import DataError
from arctl.tasks.items import Item, Request, multiple_choice
from arctl.tasks.metrics import Metric, choice_metrics, loglikelihood_metrics, mean_with_stderr
from arctl.tasks.prompts import (
    RecordError,
    arc_item,
    hellaswag_item,
    lambada_item,
    piqa_item,
    winogrande_item,
)
from arctl.tasks.registry import TASKS, UnknownTaskError, check_files, parse_tasks, read_items
from arctl.tasks.runner import TaskSettings, run_tasks, zero_shot_average
from arctl.tasks.scoring import LoglikelihoodScorer, Score, encode_request, shared_prefix_length
from arctl_cli.main import app

PIQA = [
    {"goal": "How do you boil an egg?", "sol1": "Put it in boiling water for ten minutes.", "sol2": "Put it in the freezer."},
    {"goal": "To dry wet shoes,", "sol1": "stuff them with newspaper.", "sol2": "fill them with water."},
    {"goal": "Keep bread fresh", "sol1": "in a sealed bag", "sol2": "in the rain"},
]
WINOGRANDE = [
    {"qID": "a", "sentence": "The trophy does not fit in the case because _ is too big.", "option1": "the trophy",
     "option2": "the case", "answer": "1"},
    {"qID": "b", "sentence": "Sam gave Tom the book because _ had finished it.", "option1": "Sam", "option2": "Tom",
     "answer": "1"},
]
ARC = [
    {"id": "q1", "question": {"stem": "Which gas do plants take in?", "choices": [
        {"text": "oxygen", "label": "A"}, {"text": "carbon dioxide", "label": "B"}, {"text": "helium", "label": "C"}]},
     "answerKey": "B"},
    {"id": "q2", "question": {"stem": "What melts ice?", "choices": [
        {"text": "heat", "label": "1"}, {"text": "cold", "label": "2"}, {"text": "dark", "label": "3"}, {"text": "salt water", "label": "4"}]},
     "answerKey": "1"},
]
HELLASWAG = [
    "Baking cookies: A woman mixes flour and sugar in a bowl. she", "2",
    "throws the bowl at the wall.", "eats the flour.", "adds eggs and stirs the dough.", "sings to the oven.",
    "Running: A man ties his shoes. he", "0", "starts to jog down the road.", "falls asleep.", "paints the shoe.", "cries.",
]
LAMBADA = ["He opened the door and saw his old friend standing there, smiling at him. It was John",
           "She poured the tea into the cup and handed it to her grandmother"]
WIKITEXT = " = Title = \n \n The cat sat on the mat . It was a sunny day . \n" * 40


def _corpus() -> list[str]:
    texts = [v for r in PIQA for v in r.values()] + [r["sentence"] + " " + r["option1"] + r["option2"] for r in WINOGRANDE]
    texts += [r["question"]["stem"] + " " + " ".join(c["text"] for c in r["question"]["choices"]) for r in ARC]
    return texts + HELLASWAG + LAMBADA + ["Question: Answer:", WIKITEXT]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_bpe_tokenizer(_corpus())


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=3)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("task-data")
    files = {
        "piqa/valid.jsonl": "".join(json.dumps(r) + "\n" for r in PIQA),
        "piqa/valid-labels.lst": "0\n0\n0\n",
        "winogrande_1.1/dev.jsonl": "".join(json.dumps(r) + "\n" for r in WINOGRANDE),
        "arc/ARC-Easy-Test.jsonl": "".join(json.dumps(r) + "\n" for r in ARC),
        "arc/ARC-Challenge-Test.jsonl": "".join(json.dumps(r) + "\n" for r in ARC[::-1]),
        "hellaswag/hellaswag_val_full.txt": "\n".join(HELLASWAG) + "\n",
        "lambada_openai/lambada_test.jsonl": "".join(json.dumps({"text": t}) + "\n" for t in LAMBADA),
        "wikitext-2-raw/wiki.test.raw": WIKITEXT,
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    return root


# --------------------------------------------------------------------------- prompts


def test_prompts_follow_the_harness_templates() -> None:
    lam = lambada_item(LAMBADA[0])
    assert lam.requests == (Request(LAMBADA[0][: -len(" John")], " John"),)
    piqa = piqa_item(PIQA[0], 0)
    assert [r.context for r in piqa.requests] == ["Question: How do you boil an egg?\nAnswer:"] * 2
    assert [r.continuation for r in piqa.requests] == [" " + PIQA[0]["sol1"], " " + PIQA[0]["sol2"]]
    assert piqa.choice_chars == (len(PIQA[0]["sol1"]), len(PIQA[0]["sol2"]))
    arc = arc_item(ARC[1])
    assert arc.gold == 0 and arc.requests[3] == Request("Question: What melts ice?\nAnswer:", " salt water")
    assert arc_item(ARC[0]).gold == 1
    wino = winogrande_item(WINOGRANDE[0])
    assert wino.requests == (
        Request("The trophy does not fit in the case because the trophy", " is too big."),
        Request("The trophy does not fit in the case because the case", " is too big."),
    )
    assert wino.gold == 0
    hella = hellaswag_item(HELLASWAG[0], 2, HELLASWAG[2:6])
    assert hella.gold == 2 and hella.requests[2].continuation == " adds eggs and stirs the dough."


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: lambada_item("single"), "two words"),
        (lambda: piqa_item({"goal": "g", "sol1": "a"}, 0), "'sol2'"),
        (lambda: piqa_item(PIQA[0], 2), "label"),
        (lambda: arc_item({**ARC[0], "answerKey": "Z"}), "answerKey"),
        (lambda: winogrande_item({**WINOGRANDE[0], "sentence": "no blank"}), "blank"),
        (lambda: hellaswag_item("q", 1, ["a", "b"]), "4 endings"),
    ],
)
def test_bad_records_name_the_problem(build, message: str) -> None:
    with pytest.raises(RecordError, match=message):
        build()


def test_item_checks_its_gold_index() -> None:
    with pytest.raises(ValueError, match="gold"):
        Item((Request("a", " b"),), 1, (1,))


# --------------------------------------------------------------------------- files


def test_unknown_task_lists_the_known_ones() -> None:
    with pytest.raises(UnknownTaskError, match="known tasks: wikitext2, lambada_openai, hellaswag"):
        parse_tasks("piqa,mmlu")
    assert [s.name for s in parse_tasks("piqa, arc_easy,piqa")] == ["piqa", "arc_easy"]


def test_missing_file_names_it_and_lists_available_tasks(data_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "valid.jsonl").write_text(json.dumps(PIQA[0]) + "\n")
    (tmp_path / "winogrande_1.1").mkdir()
    (tmp_path / "winogrande_1.1" / "dev.jsonl").write_text(json.dumps(WINOGRANDE[0]) + "\n")
    with pytest.raises(DataError, match=r"piqa: piqa/valid-labels.lst.*tasks available there: winogrande"):
        check_files(parse_tasks("piqa,winogrande"), tmp_path)
    assert check_files(parse_tasks("piqa,hellaswag"), data_dir) == data_dir


def test_reading_keeps_file_order_and_limit(data_dir: Path) -> None:
    items = read_items(TASKS["hellaswag"], data_dir)
    assert [i.gold for i in items] == [2, 0]
    assert items[1].requests[0] == Request("Running: A man ties his shoes. he", " starts to jog down the road.")
    assert len(read_items(TASKS["piqa"], data_dir, limit=2)) == 2
    assert read_items(TASKS["arc_challenge"], data_dir)[0].gold == 0


def test_malformed_file_names_file_and_record(tmp_path: Path) -> None:
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "valid.jsonl").write_text(json.dumps(PIQA[0]) + "\n" + json.dumps(PIQA[1]) + "\n")
    (tmp_path / "piqa" / "valid-labels.lst").write_text("0\n")
    with pytest.raises(DataError, match="2 records but piqa/valid-labels.lst has 1 labels"):
        read_items(TASKS["piqa"], tmp_path)
    (tmp_path / "piqa" / "valid-labels.lst").write_text("0\n5\n")
    with pytest.raises(DataError, match=r"valid.jsonl: record 2: PIQA label 5"):
        read_items(TASKS["piqa"], tmp_path)


# --------------------------------------------------------------------------- scoring


def _all_items(data_dir: Path) -> list[Item]:
    return [item for name in ("lambada_openai", "hellaswag", "piqa", "winogrande", "arc_easy") for item in read_items(TASKS[name], data_dir)]


def _naive_score(model, tokenizer, request: Request) -> Score:
    """One request alone, whole sequence, no cache, no batching, no logit skipping."""
    encoded = encode_request(tokenizer, request, 512)
    with torch.no_grad():
        logits = model(torch.tensor([encoded.inputs]), use_cache=False).logits[0, -len(encoded.targets) :]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    target = torch.tensor(encoded.targets)
    return Score(float(logprobs.gather(1, target[:, None]).sum()), bool((logprobs.argmax(-1) == target).all()))


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_batched_prefix_scoring_equals_one_request_at_a_time(model, tokenizer, data_dir: Path, batch_size: int) -> None:
    items = _all_items(data_dir)
    scores = LoglikelihoodScorer(model, tokenizer, batch_size=batch_size).score(items)
    for item, item_scores in zip(items, scores, strict=True):
        for request, score in zip(item.requests, item_scores, strict=True):
            naive = _naive_score(model, tokenizer, request)
            assert score.logprob == pytest.approx(naive.logprob, abs=1e-4)
            assert score.greedy == naive.greedy


def test_scores_equal_lm_evaluation_harness(model, tokenizer, data_dir: Path) -> None:
    """The harness's own HF backend on the same model object and requests."""
    huggingface = pytest.importorskip("lm_eval.models.huggingface")
    from lm_eval.api.instance import Instance

    items = _all_items(data_dir)
    ours = [s for scores in LoglikelihoodScorer(model, tokenizer).score(items) for s in scores]
    harness = huggingface.HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4, device="cpu")
    requests = [Instance("loglikelihood", {}, (r.context, r.continuation), 0) for item in items for r in item.requests]
    theirs = harness.loglikelihood(requests, disable_tqdm=True)
    assert len(ours) == len(theirs) > 20
    for score, (logprob, greedy) in zip(ours, theirs, strict=True):
        assert score.logprob == pytest.approx(logprob, abs=1e-4)
        assert score.greedy == greedy


def test_encoding_moves_trailing_spaces_and_truncates_left(tokenizer) -> None:
    spaced = encode_request(tokenizer, Request("the cat sat ", "on"), 512)
    plain = encode_request(tokenizer, Request("the cat sat", " on"), 512)
    assert spaced == plain
    assert plain.targets == tokenizer.encode("the cat sat on")[len(tokenizer.encode("the cat sat")) :]
    full = encode_request(tokenizer, Request("the cat sat on the mat", " today"), 512)
    short = encode_request(tokenizer, Request("the cat sat on the mat", " today"), 4)
    assert short.inputs == full.inputs[-4:] and short.targets == full.targets


def test_shared_prefix_stops_before_the_first_scored_position(tokenizer) -> None:
    a = encode_request(tokenizer, Request("Question: x\nAnswer:", " yes"), 512)
    b = encode_request(tokenizer, Request("Question: x\nAnswer:", " no way"), 512)
    length = shared_prefix_length([a, b])
    assert length == len(a.inputs) - len(a.targets)
    assert a.inputs[:length] == b.inputs[:length]


# --------------------------------------------------------------------------- metrics


def test_choice_metrics_by_hand() -> None:
    items = [multiple_choice("c", ["aa", "b"], 0), multiple_choice("c", ["aaaa", "b"], 1), multiple_choice("c", ["x", "y"], 1)]
    scores = [
        [Score(-2.0, False), Score(-3.0, False)],  # acc 1; norm -1 vs -3 -> 1
        [Score(-4.0, False), Score(-3.0, False)],  # acc 1; norm -1 vs -3 -> 0
        [Score(-1.0, False), Score(-1.0, False)],  # tie -> first -> 0 for both
    ]
    metrics = choice_metrics(items, scores)
    assert metrics["acc"].value == pytest.approx(2 / 3)
    assert metrics["acc_norm"].value == pytest.approx(1 / 3)
    assert metrics["acc"].stderr == pytest.approx(math.sqrt((2 * (1 / 3) ** 2 + (2 / 3) ** 2) / 2 / 3))


def test_lambada_metrics_by_hand() -> None:
    metrics = loglikelihood_metrics([[Score(-1.0, True)], [Score(-3.0, False)]])
    assert metrics["acc"] == Metric(0.5, pytest.approx(0.5))
    assert metrics["perplexity"].value == pytest.approx(math.exp(2.0))
    assert metrics["perplexity"].stderr == pytest.approx(math.exp(2.0) * 1.0)
    assert mean_with_stderr([1.0]).stderr is None


def test_runner_reports_every_task_and_the_average(model, tokenizer, data_dir: Path) -> None:
    specs = parse_tasks("wikitext2,lambada_openai,hellaswag,piqa,winogrande,arc_easy")
    results = run_tasks(model, tokenizer, specs, TaskSettings(limit=2, wikitext_seqlen=64, wikitext_windows=2, data_dir=data_dir))
    assert [r.task for r in results] == [s.name for s in specs]
    assert {r.task: r.items for r in results} == {"wikitext2": 2, "lambada_openai": 2, "hellaswag": 2, "piqa": 2, "winogrande": 2, "arc_easy": 2}
    assert set(results[3].metrics) == {"acc", "acc_norm"} and set(results[4].metrics) == {"acc"}
    average = zero_shot_average(results)
    assert average == pytest.approx(sum(r.metrics["acc"].value for r in results[1:]) / 5)


# --------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def bpe_model_dir(tmp_path_factory: pytest.TempPathFactory, model, tokenizer) -> Path:
    folder = tmp_path_factory.mktemp("bpe-llama")
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    return folder


def test_cli_eval_writes_a_report_and_report_compares_runs(bpe_model_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    outs = []
    for label, dtype in (("fp32", "float32"), ("bf16", "bfloat16")):
        out = tmp_path / f"{label}.json"
        result = runner.invoke(app, [
            "eval", str(bpe_model_dir), "--tasks", "lambada_openai,hellaswag,piqa,winogrande,arc_easy,arc_challenge",
            "--limit", "2", "--dtype", dtype, "--data-dir", str(data_dir), "--out", str(out), "--label", label, "--json",
        ])
        assert result.exit_code == 0, result.output
        report = json.loads(out.read_text())
        assert report["format"] == "arctl-eval/1" and report["label"] == label and report["settings"]["dtype"] == dtype
        assert set(report["tasks"]) == {"lambada_openai", "hellaswag", "piqa", "winogrande", "arc_easy", "arc_challenge"}
        assert report["tasks"]["piqa"]["items"] == 2 and "acc_norm_stderr" in report["tasks"]["piqa"]
        assert report["average_acc"] is not None
        outs.append(out)
    html = tmp_path / "report.html"
    result = runner.invoke(app, ["report", *map(str, outs), "--out", str(html)])
    assert result.exit_code == 0, result.output
    page = html.read_text()
    assert "<table>" in page and "fp32" in page and "bf16" in page and "data:image/png;base64," in page
    png = tmp_path / "report.png"
    assert runner.invoke(app, ["report", *map(str, outs), "--out", str(png)]).exit_code == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--tasks", "piqa,mmlu"], "unknown task 'mmlu'; known tasks: wikitext2"),
        (["--tasks", "piqa", "--dtype", "int3"], "unknown dtype 'int3'"),
    ],
)
def test_cli_eval_bad_input_exits_2(bpe_model_dir: Path, data_dir: Path, arguments: list[str], message: str) -> None:
    result = CliRunner().invoke(app, ["eval", str(bpe_model_dir), "--data-dir", str(data_dir), *arguments])
    assert result.exit_code == 2
    assert message in result.output


def test_cli_eval_missing_data_lists_available(bpe_model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "winogrande_1.1").mkdir()
    (tmp_path / "winogrande_1.1" / "dev.jsonl").write_text(json.dumps(WINOGRANDE[0]) + "\n")
    result = CliRunner().invoke(app, ["eval", str(bpe_model_dir), "--tasks", "hellaswag", "--data-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "hellaswag: hellaswag/hellaswag_val_full.txt" in result.output and "available there: winogrande" in result.output


def test_cli_report_refuses_bad_runs_and_outputs(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.json"
    bogus.write_text("{}")
    runner = CliRunner()
    result = runner.invoke(app, ["report", str(bogus), "--out", str(tmp_path / "r.html")])
    assert result.exit_code == 2 and "not an `arctl eval --out` report" in result.output
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"format": "arctl-eval/1", "target": "m", "tasks": {}, "average_acc": None}))
    result = runner.invoke(app, ["report", str(good), "--out", str(tmp_path / "r.txt")])
    assert result.exit_code == 2 and "must end in .html or .png" in result.output
    assert not (tmp_path / "r.txt").exists()


def test_cli_eval_reads_a_checkpoint_and_its_export(bpe_model_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "run"
    result = runner.invoke(app, ["quantize", "--model", str(bpe_model_dir), "--scheme", "W4A16G64", "--no-eval", "--out", str(out)])
    assert result.exit_code == 0, result.output
    common = ["--tasks", "wikitext2,piqa,winogrande", "--data-dir", str(data_dir), "--eval-seqlen", "64", "--eval-windows", "2", "--json"]
    result = runner.invoke(app, ["eval", str(out / "checkpoint"), *common])
    assert result.exit_code == 0, result.output
    checkpoint = json.loads(result.stdout)
    assert checkpoint["weights"]["format"] == "arctl_checkpoint" and checkpoint["weights"]["avg_bits"] == pytest.approx(4.25)
    assert checkpoint["reference"] == str(bpe_model_dir)  # the checkpoint's source model, found by itself
    assert checkpoint["tasks"]["wikitext2"]["kl"] > 0 and 0 < checkpoint["tasks"]["wikitext2"]["top1_agreement"] <= 1
    result = runner.invoke(app, ["eval", str(out / "export"), *common])
    assert result.exit_code == 0, result.output
    export = json.loads(result.stdout)
    assert export["weights"]["format"] == "auto_round" and export["weights"]["avg_bits"] == pytest.approx(4.25)
    assert export["tasks"]["piqa"]["items"] == len(PIQA)
