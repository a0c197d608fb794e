"""``arctl inspect``: what a plan file or a checkpoint folder holds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from arctl.checkpoint import read_checkpoint
from arctl.plan import Plan
from arctl_cli.pipeline import folder_bytes, plan_summary


def plan_rows(plan: Plan) -> list[dict[str, Any]]:
    return [
        {
            "name": layer.name,
            "shape": list(layer.shape),
            "scheme": layer.scheme.name,
            "bits": round(layer.bits.per_weight, 4),
            "fused_group": layer.fused_group,
        }
        for layer in plan.layers
    ]


def read_plan(path: Path) -> Plan:
    """The plan of a plan.json or of a checkpoint folder."""
    return read_checkpoint(Path(path)).plan if Path(path).is_dir() else Plan.load(Path(path))


def inspect_path(path: Path) -> dict[str, Any]:
    """A summary of a plan.json or a checkpoint folder (verified against its manifest)."""
    path = Path(path)
    if path.is_dir():
        checkpoint = read_checkpoint(path)
        plan = checkpoint.plan
        return {
            "kind": "checkpoint",
            "path": str(path),
            "model": plan.model_id,
            "summary": plan_summary(plan),
            "size_bytes": folder_bytes(path),
            "metadata": {k: v for k, v in checkpoint.metadata.items() if k != "aliases"},
            "layers": plan_rows(plan),
        }
    plan = Plan.load(path)
    return {
        "kind": "plan",
        "path": str(path),
        "model": plan.model_id,
        "summary": plan_summary(plan),
        "layers": plan_rows(plan),
    }
