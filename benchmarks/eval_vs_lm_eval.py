"""arctl's task evaluation against lm-evaluation-harness on the same model, items and protocols.

One process loads SmolLM2-135M-Instruct (float32, from the embedded GGUF) once; for each task both
sides score the first ``--limit`` documents of the shared data folder's file:

- arctl: ``arctl.tasks.runner.run_tasks`` (what ``arctl eval --tasks`` runs);
- lm-eval (PyPI ``lm-eval``, HF backend ``HFLM`` around the same model object): the harness's own task
  YAML, ``include``d unchanged, with only the data source swapped for a local JSON file (the hub is
  not reachable here). The local files are converted to the Hugging Face schema the YAML reads, in a
  temporary folder: PIQA gets its labels from ``valid-labels.lst``, ARC's ``question`` object is
  flattened into ``question`` + ``choices{text,label}``. HellaSwag is the exception: the shared file
  is llama.cpp's text form without the ``ctx_a``/``ctx_b`` split that the harness's ``process_docs``
  needs, so both sides use the same prebuilt ``query``/``choices``/``label`` with the harness's
  metrics (the prompt then differs from the official task only in ``ctx_b.capitalize()``).

Prints a table and writes ``benchmarks/results/eval_vs_lm_eval.json``: per task and metric both
values, lm-eval's standard error, and whether arctl is within it; wall time of each side and their
ratio.

    python benchmarks/eval_vs_lm_eval.py [--limit 200] [--batch-size 16] [--tasks ...]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import lm_eval
import torch
import yaml
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from arctl.data import require_data_dir
from arctl.models import load_model
from arctl.tasks.registry import (
    ARC_CHALLENGE_FILE,
    ARC_EASY_FILE,
    HELLASWAG_FILE,
    LAMBADA_FILE,
    PIQA_FILE,
    PIQA_LABELS,
    WINOGRANDE_FILE,
    parse_tasks,
)
from arctl.tasks.runner import TaskSettings, run_tasks

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "eval_vs_lm_eval.json"
HARNESS_TASKS = Path(lm_eval.__file__).parent / "tasks"
TASKS = ("lambada_openai", "hellaswag", "piqa", "winogrande", "arc_easy", "arc_challenge")


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _write_jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def _local(include: Path, name: str, split: str, data_file: str, **overrides: object) -> dict:
    """A task YAML that includes the harness's own and swaps only the data source."""
    return {
        "include": str(include),
        "task": name,
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {split: data_file}},
        "training_split": None,
        "validation_split": split if split == "validation" else None,
        "test_split": split if split == "test" else None,
        "fewshot_split": None,
        **overrides,
    }


def harness_task_files(data: Path, folder: Path) -> dict[str, str]:
    """Write the local task YAMLs (and converted data) into ``folder``; arctl task -> harness task."""
    configs: dict[str, dict] = {}
    configs["lambada_openai"] = _local(HARNESS_TASKS / "lambada" / "lambada_openai.yaml", "local_lambada_openai", "test", str(data / LAMBADA_FILE))
    labels = (data / PIQA_LABELS).read_text().split()
    piqa = [{**r, "label": int(label)} for r, label in zip(_jsonl(data / PIQA_FILE), labels, strict=True)]
    configs["piqa"] = _local(HARNESS_TASKS / "piqa" / "piqa.yaml", "local_piqa", "validation", _write_jsonl(folder / "piqa.jsonl", piqa))
    configs["winogrande"] = _local(HARNESS_TASKS / "winogrande" / "default.yaml", "local_winogrande", "validation", str(data / WINOGRANDE_FILE))
    for task, file in (("arc_easy", ARC_EASY_FILE), ("arc_challenge", ARC_CHALLENGE_FILE)):
        records = [
            {
                "id": r["id"],
                "question": r["question"]["stem"],
                "choices": {"text": [c["text"] for c in r["question"]["choices"]], "label": [c["label"] for c in r["question"]["choices"]]},
                "answerKey": r["answerKey"],
            }
            for r in _jsonl(data / file)
        ]
        configs[task] = _local(HARNESS_TASKS / "arc" / "arc_easy.yaml", f"local_{task}", "test", _write_jsonl(folder / f"{task}.jsonl", records))
    lines = (data / HELLASWAG_FILE).read_text(encoding="utf-8").splitlines()
    hellaswag = [{"query": lines[i], "label": int(lines[i + 1]), "choices": lines[i + 2 : i + 6]} for i in range(0, len(lines), 6)]
    configs["hellaswag"] = {
        "task": "local_hellaswag",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"validation": _write_jsonl(folder / "hellaswag.jsonl", hellaswag)}},
        "output_type": "multiple_choice",
        "validation_split": "validation",
        "doc_to_text": "{{query}}",
        "doc_to_target": "{{label}}",
        "doc_to_choice": "choices",
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")],
    }
    names = {}
    for task, config in configs.items():
        (folder / f"{config['task']}.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        names[task] = config["task"]
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.manual_seed(0)
    data = require_data_dir(args.data_dir)
    specs = parse_tasks(args.tasks)
    loaded = load_model("smollm2")
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    harness_model = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size)
    rows = []
    with tempfile.TemporaryDirectory(prefix="arctl-lm-eval-") as tmp:
        names = harness_task_files(data, Path(tmp))
        manager = TaskManager(include_path=tmp, include_defaults=True)
        for spec in specs:
            started = time.perf_counter()
            ours = run_tasks(model, tokenizer, [spec], TaskSettings(limit=args.limit, batch_size=args.batch_size, data_dir=data))[0]
            ours_s = time.perf_counter() - started
            started = time.perf_counter()
            output = lm_eval.simple_evaluate(
                model=harness_model, tasks=[names[spec.name]], limit=args.limit, task_manager=manager, bootstrap_iters=1000
            )
            theirs_s = time.perf_counter() - started
            theirs = output["results"][names[spec.name]]
            for metric in spec.metrics:
                value, stderr = theirs[f"{metric},none"], theirs[f"{metric}_stderr,none"]
                mine = ours.metrics[metric].value
                rows.append({
                    "task": spec.name, "metric": metric, "items": ours.items,
                    "arctl": mine, "arctl_stderr": ours.metrics[metric].stderr,
                    "lm_eval": value, "lm_eval_stderr": stderr,
                    "within_stderr": abs(mine - value) <= stderr,
                    "arctl_s": round(ours_s, 1), "lm_eval_s": round(theirs_s, 1), "wall_ratio": round(ours_s / theirs_s, 3),
                })
                print(f"{spec.name:15s} {metric:10s} arctl {mine:.4f}  lm-eval {value:.4f} ± {stderr:.4f}  "
                      f"within {rows[-1]['within_stderr']}  time {ours_s:.0f}s / {theirs_s:.0f}s", flush=True)
    print()
    print(f"{'task':15s} {'metric':10s} {'items':>5s} {'arctl':>8s} {'lm-eval':>8s} {'stderr':>7s} {'within':>6s} {'arctl s':>7s} {'lm-eval s':>9s} {'ratio':>5s}")
    for r in rows:
        print(f"{r['task']:15s} {r['metric']:10s} {r['items']:5d} {r['arctl']:8.4f} {r['lm_eval']:8.4f} {r['lm_eval_stderr']:7.4f} "
              f"{r['within_stderr']!s:>6s} {r['arctl_s']:7.1f} {r['lm_eval_s']:9.1f} {r['wall_ratio']:5.2f}")
    result = {
        "settings": {
            "model": "SmolLM2-135M-Instruct (embedded GGUF, dequantized to float32)",
            "limit": args.limit, "batch_size": args.batch_size, "lm_eval": lm_eval.__version__, "torch": torch.__version__,
            "protocol": "harness task YAMLs included unchanged, local JSON data; hellaswag: prebuilt query/choices (see docstring)",
        },
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
