"""Workers added and removed at run time with the admin key, /ready, and the gateway's settings
(YAML < environment < flags, keys kept only as sha256 digests)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
from gateway_harness import (
    ADMIN_KEY,
    API_KEY,
    MODEL_NAME,
    ROOT,
    http,
    metric_value,
    start_gateway,
    wait_until,
)

from arctl_gateway.config import ConfigError, hash_key, load_config

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def test_workers_added_and_removed_at_run_time(engines, logs):
    gateway = start_gateway([], logs, admin=True, wait_path="/health")
    try:
        assert http("GET", gateway.url + "/ready")[0] == 503
        body = {"id": "a", "url": engines[0].url}
        assert http("POST", gateway.url + "/admin/workers", body, AUTH)[0] == 401  # an API key is not the admin key
        assert http("POST", gateway.url + "/admin/workers", body)[0] == 401
        status, _, raw = http("POST", gateway.url + "/admin/workers", body, ADMIN)
        assert status == 201 and json.loads(raw)["up"] is True
        assert http("POST", gateway.url + "/admin/workers", body, ADMIN)[0] == 409
        assert http("POST", gateway.url + "/admin/workers", {"url": "ftp://nope"}, ADMIN)[0] == 400
        assert http("GET", gateway.url + "/ready")[0] == 200
        status, _, raw = http("POST", gateway.url + "/v1/completions", {"model": MODEL_NAME, "prompt": "w1", "max_tokens": 2}, AUTH)
        assert status == 200
        listed = json.loads(http("GET", gateway.url + "/admin/workers", headers=ADMIN)[2])["data"]
        assert [worker["id"] for worker in listed] == ["a"] and listed[0]["models"] == [MODEL_NAME]
        assert metric_value(gateway.metrics(), "arctl_gateway_backend_up", backend="a") == 1
        assert http("DELETE", gateway.url + "/admin/workers/a", headers=ADMIN)[0] == 200
        assert http("DELETE", gateway.url + "/admin/workers/a", headers=ADMIN)[0] == 404
        assert json.loads(http("GET", gateway.url + "/v1/models", headers=AUTH)[2])["data"] == []
        assert 'backend="a"' not in gateway.metrics()
        status, _, raw = http("POST", gateway.url + "/v1/completions", {"model": MODEL_NAME, "prompt": "w1"}, AUTH)
        assert status == 404 and json.loads(raw)["error"]["code"] == "model_not_found"
    finally:
        gateway.stop()


def test_admin_api_is_off_without_an_admin_key(engines, logs):
    gateway = start_gateway([f"a={engines[0].url}"], logs)
    try:
        status, _, raw = http("GET", gateway.url + "/admin/workers", headers=ADMIN)
        assert status == 403 and json.loads(raw)["error"]["code"] == "admin_disabled"
    finally:
        gateway.stop()


def test_ready_follows_worker_health(logs):
    gateway = start_gateway(["dead=http://127.0.0.1:9"], logs, wait_path="/health")
    try:
        assert wait_until(lambda: http("GET", gateway.url + "/ready")[0] == 503)
        status, _, _ = http("POST", gateway.url + "/v1/completions", {"model": "m", "prompt": "w1"}, AUTH)
        assert status == 404  # no worker lists it
        text = gateway.metrics()
        assert metric_value(text, "arctl_gateway_backend_up", backend="dead") == 0
        assert 'arctl_gateway_build_info{git_sha="unknown",version="0.1.0"} 1.0' in text
    finally:
        gateway.stop()


def test_settings_precedence_and_hashed_keys(tmp_path):
    path = tmp_path / "gateway.yaml"
    digest = hash_key("from-yaml")
    path.write_text(
        "port: 9000\n"
        "workers: [{id: w1, url: 'http://127.0.0.1:30000'}]\n"
        f"auth: {{api_key_sha256: [{digest}]}}\n"
        "limits: {max_concurrency: 8}\n"
        "metrics: {buckets: {ttft: [0.5, 1, 2]}}\n"
    )
    env = {"ARCTL_GATEWAY_PORT": "9100", "ARCTL_GATEWAY_LIMITS_MAX_QUEUE": "3", "ARCTL_GATEWAY_API_KEYS": "plain-env-key"}
    config = load_config(path, {"port": 9200}, env)
    assert config.port == 9200
    assert config.limits.max_concurrency == 8 and config.limits.max_queue == 3
    assert config.workers[0].id == "w1"
    assert config.metrics.buckets.ttft == (0.5, 1.0, 2.0)
    assert config.auth.api_key_sha256 == (digest, hashlib.sha256(b"plain-env-key").hexdigest())
    assert "plain-env-key" not in repr(config)


def test_example_settings_file_loads():
    config = load_config(ROOT / "services" / "gateway" / "gateway.example.yaml", {}, {})
    assert config.workers[0].id == "sglang-0" and config.routing.policy == "least_in_flight"
    assert config.metrics.buckets.ttft[0] == 0.01 and config.metrics.buckets.e2e[-1] == 1800


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("limits: {max_concurency: 3}", "unknown setting limits.max_concurency; valid: max_concurrency"),
        ("limits: {max_concurrency: many}", "limits.max_concurrency must be an integer"),
        ("routing: {policy: random}", "routing.policy 'random'; valid: least_in_flight"),
        ("workers: ['localhost:80']", "must look like http://host:port"),
        ("workers: [{url: 'http://a:1', health_path: v1/models}]", "health_path 'v1/models' must start with '/'"),
        ("metrics: {buckets: {e2e: [2, 1]}}", "strictly increasing"),
        ("auth: {api_key_sha256: [not-a-digest]}", "not a lowercase sha256"),
        ("- a list", "must hold a mapping"),
    ],
)
def test_bad_settings_are_refused_with_the_key_named(tmp_path, text, message):
    path = tmp_path / "gateway.yaml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_config(path, {}, {})


def test_python_m_entry_reports_bad_settings_in_one_line(tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "arctl_gateway", "--worker", "http://127.0.0.1:1", "--set", "limits.max_queue=-1"],
        capture_output=True, text=True, cwd=ROOT, timeout=60, check=False,
    )
    assert completed.returncode == 2
    assert completed.stderr.strip() == "error: limits.max_queue must be >= 0, got -1"
    hashed = subprocess.run([sys.executable, "-m", "arctl_gateway", "hash-key"], input="secret\n", capture_output=True,
                            text=True, cwd=ROOT, timeout=60, check=True)
    assert hashed.stdout.strip() == hash_key("secret")
