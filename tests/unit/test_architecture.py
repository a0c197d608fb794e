"""Dependency rules of STYLE.md, checked: import-linter contracts, and what `import arctl` loads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_import_linter_contracts_hold() -> None:
    completed = subprocess.run(
        [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())",
         "--no-cache"],
        cwd=ROOT, check=False, capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "broken" not in completed.stdout.lower() or " 0 broken" in completed.stdout


def _modules_after(statement: str) -> set[str]:
    code = f"{statement}; import sys; print('\\n'.join(sys.modules))"
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return set(completed.stdout.split())


def test_import_arctl_loads_no_torch() -> None:
    loaded = _modules_after("import arctl, arctl.schemes, arctl.bits, arctl.plan, arctl.v1.common_pb2")
    assert "torch" not in loaded
    assert "transformers" not in loaded


def test_the_gateway_package_loads_no_torch() -> None:
    assert "torch" not in _modules_after("import arctl_gateway")
