"""The CLI side: ``arctl services up`` starts the three services, remote quantize runs through
them, bad addresses give one line and exit 2."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import structlog
import typer

from arctl.logs import configure_logging
from arctl_cli import remote
from arctl_cli.remote import PlanChoice, ServiceAddresses, quantize_remote, run_quantize_remote

APP = "import typer; from arctl_cli import remote; app = typer.Typer(); remote.register(app); app()"


def free_port_run(count: int) -> int:
    """A port p with p .. p+count-1 free on 127.0.0.1."""
    for _ in range(100):
        base = random.randint(20000, 60000)
        sockets = []
        try:
            for port in range(base, base + count):
                sock = socket.socket()
                sock.bind(("127.0.0.1", port))
                sockets.append(sock)
            return base
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise RuntimeError("no free ports")


def test_services_up_serves_a_remote_quantize_and_stops_on_sigterm(root: Path, tmp_path: Path, tiny_model: Path) -> None:
    base = free_port_run(3)
    process = subprocess.Popen(
        [sys.executable, "-c", APP, "services", "up", "--base-port", str(base), "--state-dir", str(tmp_path / "state"),
         "--allowed-root", str(root), "--metrics-base-port", "-1"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env={**os.environ, "ARCTL_LOG_FORMAT": "json"},
    )
    try:
        assert process.stdout is not None
        deadline = time.monotonic() + 180
        line = ""
        while time.monotonic() < deadline and "remote mode:" not in line:
            line = process.stdout.readline()
            assert line or process.poll() is None, "services up exited"
        addresses = dict(item.split("=", 1) for item in line.split("remote mode:", 1)[1].split("(")[0].split())
        assert addresses["ARCTL_PLANNER_ADDR"] == f"127.0.0.1:{base}"
        report = run_quantize_remote(
            str(tiny_model), PlanChoice(scheme="W8A16"), root / "out", ["auto_round"], None, lambda _: None,
            ServiceAddresses(addresses["ARCTL_PLANNER_ADDR"], addresses["ARCTL_TUNER_ADDR"], addresses["ARCTL_EXPORTER_ADDR"]),
        )
        assert report.plan["schemes"] == {"W8A16": 14}
        assert (root / "out" / "checkpoint" / "manifest.json").is_file()
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0


def test_quantize_remote_prints_the_same_json_report(start_services, tiny_model: Path, root: Path, capsys) -> None:
    configure_logging("warning", "json")  # logs off stdout, as the CLI sets them up
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=sys.__stderr__))
    services = start_services("planner", "tuner", "exporter")
    addresses = ServiceAddresses(*(services.address(name) for name in ("planner", "tuner", "exporter")))
    quantize_remote(addresses, str(tiny_model), root / "out", PlanChoice(avg_bits=4.5, sensitivity="weight"), ["auto_round"], None, True)
    report = json.loads(capsys.readouterr().out)
    assert report["out_dir"] == str(root / "out") and 4.125 < report["plan"]["avg_bits"] <= 4.5


def test_unreachable_service_is_one_line_and_exit_2(tiny_model: Path, root: Path, capsys) -> None:
    dead = f"127.0.0.1:{free_port_run(1)}"
    with pytest.raises(typer.Exit) as exited:
        quantize_remote(ServiceAddresses(dead, dead, dead), str(tiny_model), root / "out", PlanChoice(scheme="W4A16"),
                        ["auto_round"], None, True)
    assert exited.value.exit_code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: unavailable"), lines
    assert not (root / "out").exists()


def test_bad_input_from_a_service_is_one_line_and_exit_2(start_services, tiny_model: Path, root: Path, capsys) -> None:
    services = start_services("planner", "tuner", "exporter")
    addresses = ServiceAddresses(*(services.address(name) for name in ("planner", "tuner", "exporter")))
    with pytest.raises(typer.Exit) as exited:
        quantize_remote(addresses, str(tiny_model), root / "out", PlanChoice(avg_bits=1.0, sensitivity="weight"), ["auto_round"], None, True)
    assert exited.value.exit_code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith(("error", "Traceback"))]
    assert len(err) == 1 and "planner job" in err[0] and "failed" in err[0] and "outside what the schemes can reach" in err[0]


def test_all_three_addresses_are_needed() -> None:
    assert ServiceAddresses.given(None, None, None) is None
    with pytest.raises(typer.Exit):
        ServiceAddresses.given("a:1", None, "c:3")
    assert remote.SERVICES == ("planner", "tuner", "exporter")
