"""A real Prometheus (Debian's ``prometheus`` package) scrapes the gateway and two embedded engines
during a short mixed load, with the shipped scrape config (targets and intervals rewritten for the
test) and the shipped rules; then every PromQL expression of the Grafana dashboard, every recording
rule and every alert's expression (left of its threshold) must return data without error.

The load: chat and completions, streaming or not, a worker answering 500s (``FailingUpstream``, a
fake: a real engine cannot be made to fail on demand), a worker that is down, bad keys, an unknown
model, bursts over the concurrency cap, and a client that leaves mid-stream. Skipped when the
``prometheus`` binary is absent (install: ``apt-get install -y prometheus``)."""

from __future__ import annotations

import asyncio
import json
import math
import re
import shutil
import subprocess
import time
import urllib.parse
from pathlib import Path

import aiohttp
import pytest
import yaml
from gateway_harness import (
    API_KEY,
    MODEL_NAME,
    ROOT,
    FailingUpstream,
    Server,
    free_port,
    http,
    start_gateway,
    wait_until,
)

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None or PROMTOOL is None,
    reason="needs the Prometheus server and promtool: apt-get install -y prometheus",
)
DEPLOY = ROOT / "deploy"
RULES = DEPLOY / "prometheus" / "rules" / "arctl-gateway.rules.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "arctl-gateway.json"
RATE_INTERVAL = "30s"
LOAD_SECONDS = 8.0
_COMPARISON = re.compile(r"^(?P<left>.+?)\s*(==|!=|>=|<=|>|<)\s*-?[0-9.e+]+$", re.DOTALL)
_LABEL_VALUES = re.compile(r"^label_values\((?P<metric>[^,]+),\s*(?P<label>\w+)\)$")


def dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            queries.append((panel["title"], target["expr"]))
    return queries


def grafana_to_promql(expr: str) -> str:
    return expr.replace("$__rate_interval", RATE_INTERVAL).replace("$model", ".*").replace("$backend", ".*")


def prometheus_config(template: Path, gateway_port: int, engine_ports: list[int], rules: Path) -> dict:
    config = yaml.safe_load(template.read_text())
    config["global"].update({"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"})
    config["rule_files"] = [str(rules)]
    targets = {"arctl-gateway": [f"127.0.0.1:{gateway_port}"], "sglang": [f"127.0.0.1:{port}" for port in engine_ports]}
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == set(targets), "the shipped scrape config should name the jobs the rules and dashboard use"
    for name, job in jobs.items():
        job["static_configs"] = [{"targets": targets[name]}]
    return config


def query(prometheus: str, promql: str) -> list[dict]:
    status, _, raw = http("GET", f"{prometheus}/api/v1/query?query={urllib.parse.quote(promql)}")
    body = json.loads(raw)
    assert status == 200 and body["status"] == "success", f"{promql}: {body.get('error')}"
    return body["data"]["result"]


async def _load(gateway: str, seconds: float) -> dict[int, int]:
    auth = {"Authorization": f"Bearer {API_KEY}"}
    statuses: dict[int, int] = {}

    async def call(session: aiohttp.ClientSession, path: str, body: dict, headers: dict | None = None,
                   leave_after: int | None = None) -> None:
        async with session.post(gateway + path, json=body, headers=headers or auth) as response:
            statuses[response.status] = statuses.get(response.status, 0) + 1
            if leave_after is None:
                await response.read()
                return
            seen = 0
            async for line in response.content:
                seen += line.startswith(b"data: ")
                if seen >= leave_after:
                    response.close()
                    return

    chat = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "w1 w2 w3"}], "temperature": 0, "ignore_eos": True}
    completion = {"model": MODEL_NAME, "prompt": "w4 w5", "temperature": 0, "ignore_eos": True}
    deadline = time.monotonic() + seconds
    async with aiohttp.ClientSession() as session:
        round_ = 0
        while time.monotonic() < deadline:
            round_ += 1
            calls = [
                call(session, "/v1/chat/completions", {**chat, "max_tokens": 12, "stream": True}),
                call(session, "/v1/chat/completions", {**chat, "max_tokens": 8}),
                call(session, "/v1/completions", {**completion, "max_tokens": 10, "stream": True,
                                                  "stream_options": {"include_usage": True}}),
                call(session, "/v1/completions", {**completion, "max_tokens": 6}),
                call(session, "/v1/chat/completions", {**chat, "max_tokens": 4}, {"Authorization": "Bearer wrong"}),
                call(session, "/v1/chat/completions", {**chat, "model": "no-such-model"}),
            ]
            if round_ % 3 == 0:  # a burst over the cap (4 running + 2 queued)
                calls += [call(session, "/v1/completions", {**completion, "max_tokens": 24}) for _ in range(10)]
            if round_ % 4 == 0:  # a client that leaves mid-stream
                calls.append(call(session, "/v1/chat/completions", {**chat, "max_tokens": 2000, "stream": True}, leave_after=3))
            await asyncio.gather(*calls)
    return statuses


@pytest.fixture
def prometheus(engines, logs, tmp_path):
    with FailingUpstream() as failing:
        gateway = start_gateway(
            [f"a={engines[0].url}", f"b={engines[1].url}", f"f={failing.url}", "dead=http://127.0.0.1:9"], logs,
            {"circuit_breaker.failures": 2, "circuit_breaker.cooldown_s": 5, "limits.max_concurrency": 4,
             "limits.max_queue": 2, "limits.queue_timeout_s": 5},
        )
        config_path = tmp_path / "prometheus.yml"
        config = prometheus_config(DEPLOY / "prometheus" / "prometheus.yml", gateway.port, [e.port for e in engines], RULES)
        config_path.write_text(yaml.safe_dump(config))
        # promtool checks the scrape config and, through rule_files, the shipped rules.
        checked = subprocess.run([PROMTOOL, "check", "config", str(config_path)], capture_output=True, text=True,
                                 timeout=60, check=False)
        assert checked.returncode == 0 and "SUCCESS" in checked.stdout, checked.stdout + checked.stderr
        port = free_port()
        log = logs / f"prometheus-{port}.log"
        with open(log, "wb") as handle:
            process = subprocess.Popen(
                [PROMETHEUS, f"--config.file={config_path}", f"--storage.tsdb.path={tmp_path / 'data'}",
                 f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                stdout=handle, stderr=subprocess.STDOUT,
            )
        server = Server(process, port, log)
        try:
            server.wait_ready("/-/ready", timeout=60)
            yield server.url, gateway
        finally:
            server.stop()
            gateway.stop()


def test_every_dashboard_and_alert_query_returns_data(prometheus):
    url, gateway = prometheus
    assert wait_until(lambda: query(url, 'up{job="arctl-gateway"} == 1') and len(query(url, 'up{job="sglang"} == 1')) == 2,
                      timeout=30)
    statuses = asyncio.run(_load(gateway.url, LOAD_SECONDS))
    assert {200, 401, 404, 429} <= set(statuses), statuses
    time.sleep(3)  # two more scrapes and rule evaluations after the load

    failures = []
    for title, expr in dashboard_queries():
        promql = grafana_to_promql(expr)
        result = query(url, promql)
        if not result:
            failures.append(f"{title}: no data: {promql}")
        elif promql.startswith("histogram_quantile") and not any(math.isfinite(float(r["value"][1])) for r in result):
            failures.append(f"{title}: only NaN: {promql}")

    dashboard = json.loads(DASHBOARD.read_text())
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        match = _LABEL_VALUES.match(variable["query"]["query"])
        assert match, variable["query"]
        values = query(url, f'count by ({match["label"]}) ({match["metric"]})')
        if not values:
            failures.append(f"variable {variable['name']}: no values")

    groups = yaml.safe_load(RULES.read_text())["groups"]
    for group in groups:
        for rule in group["rules"]:
            expr = " ".join(rule["expr"].split())
            if "record" in rule:
                if not query(url, expr):
                    failures.append(f"record {rule['record']}: no data: {expr}")
                if not query(url, rule["record"]):
                    failures.append(f"record {rule['record']}: not evaluated by Prometheus")
            else:
                query(url, expr)  # the full alert expression evaluates without error
                left = _COMPARISON.match(expr)
                assert left, f"alert {rule['alert']} should be '<expression> <comparison> <threshold>'"
                if not query(url, left["left"]):
                    failures.append(f"alert {rule['alert']}: no data: {left['left']}")

    _, _, raw = http("GET", url + "/api/v1/rules")
    for group in json.loads(raw)["data"]["groups"]:
        for rule in group["rules"]:
            if rule["health"] != "ok":
                failures.append(f"rule {rule['name']}: {rule['health']} {rule.get('lastError')}")
    assert not failures, "\n".join(failures)
