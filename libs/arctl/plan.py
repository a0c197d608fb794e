"""The Plan: which scheme each quantizable layer gets. Versioned, allow-listed JSON round trip.

```json
{"format": "arctl.plan", "version": 1,
 "model": {"id": "...", "sha256": "..."},
 "target_avg_bits": 4.5, "avg_bits": 4.49, "avg_bits_codes_only": 4.4,
 "layers": [{"name": "model.layers.0.self_attn.q_proj", "shape": [576, 576],
             "scheme": {"dtype": "int", "bits": 4, "group_size": 64, "sym": true},
             "fused_group": "model.layers.0.self_attn.qkv"}, ...],
 "notes": {...}}
```
``avg_bits`` is the true average (codes + scales + zeros); it is recomputed on load and a file whose
stored value disagrees is rejected. Imports no torch.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from arctl.atomic import atomic_write_text
from arctl.bits import LayerBits, ModelBits, layer_bits, model_bits
from arctl.schemes import Scheme

PLAN_FORMAT = "arctl.plan"
PLAN_VERSION = 1


class PlanError(ValueError):
    """A plan file that cannot be read: wrong format, version or content."""


@dataclass(frozen=True)
class LayerPlan:
    """One quantizable linear layer and its scheme.

    ``shape`` is the weight's ``(out_features, in_features)``; ``fused_group`` names the group of
    layers a runtime fuses into one kernel (q/k/v, gate/up, the experts of one MoE layer), or None.
    """

    name: str
    shape: tuple[int, int]
    scheme: Scheme
    fused_group: str | None = None

    @property
    def bits(self) -> LayerBits:
        return layer_bits(self.scheme, *self.shape)


@dataclass(frozen=True)
class Plan:
    model_id: str
    model_sha256: str
    layers: tuple[LayerPlan, ...]
    target_avg_bits: float | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def bits(self) -> ModelBits:
        return model_bits([layer.bits for layer in self.layers])

    @property
    def avg_bits(self) -> float:
        return self.bits.average

    def scheme_of(self, name: str) -> Scheme:
        for layer in self.layers:
            if layer.name == name:
                return layer.scheme
        raise KeyError(name)

    @property
    def needs_calibrated_activations(self) -> bool:
        """Whether some layer's activation scale is calibrated on data (FP8_STATIC, NVFP4_A4): then
        even round-to-nearest reads calibration samples."""
        return any(layer.scheme.act is not None and layer.scheme.act.static for layer in self.layers)

    def scheme_counts(self) -> dict[str, int]:
        """How many layers use each scheme, by preset name."""
        return dict(Counter(layer.scheme.name for layer in self.layers))

    def to_dict(self) -> dict[str, Any]:
        bits = self.bits
        return {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "model": {"id": self.model_id, "sha256": self.model_sha256},
            "target_avg_bits": self.target_avg_bits,
            "avg_bits": round(bits.average, 6),
            "avg_bits_codes_only": round(bits.average_codes_only, 6),
            "layers": [
                {
                    "name": layer.name,
                    "shape": list(layer.shape),
                    "scheme": layer.scheme.to_dict(),
                    "fused_group": layer.fused_group,
                }
                for layer in self.layers
            ],
            "notes": self.notes,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise PlanError(f"not an arctl plan (expected \"format\": \"{PLAN_FORMAT}\")")
        if data.get("version") != PLAN_VERSION:
            raise PlanError(f"plan version {data.get('version')!r} is not supported (this arctl reads {PLAN_VERSION})")
        allowed = {"format", "version", "model", "target_avg_bits", "avg_bits", "avg_bits_codes_only", "layers", "notes"}
        extra = set(data) - allowed
        if extra:
            raise PlanError(f"unknown plan keys {sorted(extra)}")
        layer_keys = {"name", "shape", "scheme", "fused_group"}
        for entry in data.get("layers") or ():
            unknown = sorted(set(entry) - layer_keys) if isinstance(entry, dict) else []
            if unknown:
                raise PlanError(f"unknown keys {unknown} in plan layer {entry.get('name')!r}")
        try:
            layers = tuple(
                LayerPlan(
                    name=str(entry["name"]),
                    shape=(int(entry["shape"][0]), int(entry["shape"][1])),
                    scheme=Scheme.from_dict(entry["scheme"]),
                    fused_group=entry.get("fused_group"),
                )
                for entry in data["layers"]
            )
            plan = cls(
                model_id=str(data["model"]["id"]),
                model_sha256=str(data["model"].get("sha256", "")),
                layers=layers,
                target_avg_bits=data.get("target_avg_bits"),
                notes=dict(data.get("notes") or {}),
            )
        except (KeyError, TypeError, IndexError, ValueError) as exc:
            raise PlanError(f"malformed plan: {exc}") from exc
        names = [layer.name for layer in layers]
        repeated = sorted(name for name, count in Counter(names).items() if count > 1)
        if repeated:
            raise PlanError(f"layers appear twice in the plan: {repeated}")
        stored = data.get("avg_bits")
        if stored is not None and (not isinstance(stored, int | float) or abs(stored - plan.avg_bits) > 1e-4):
            raise PlanError(f"plan says avg_bits {stored} but its layers add up to {plan.avg_bits:.6f}")
        return plan

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PlanError(f"plan is not valid JSON: {exc}") from exc
        return cls.from_dict(data)

    def save(self, path: Path) -> None:
        atomic_write_text(Path(path), self.to_json())

    @classmethod
    def load(cls, path: Path) -> Plan:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise PlanError(f"cannot read plan {path}: {exc.strerror or exc}") from exc
        return cls.from_json(text)
