"""What every service's server does: health and reflection, interceptors (logs, metrics, status
mapping), token auth and TLS, graceful drain on SIGTERM."""

from __future__ import annotations

import datetime
import ipaddress
import json
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from arctl.rpc import client as rpc_client
from arctl.v1 import (
    common_pb2,
    exporter_pb2,
    exporter_pb2_grpc,
    planner_pb2,
    planner_pb2_grpc,
    tuner_pb2_grpc,
)
from tests.services.conftest import spawn_service
from tests.services.test_faults import tune_request, watch_until

SERVICE_NAMES = {
    "planner": "arctl.v1.PlannerService",
    "tuner": "arctl.v1.TunerService",
    "exporter": "arctl.v1.ExporterService",
}


@pytest.mark.parametrize("service", sorted(SERVICE_NAMES))
def test_health_and_reflection(start_services, service: str) -> None:
    services = start_services(service)
    channel = services.channels[service]
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", SERVICE_NAMES[service]):
        answer = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    answers = list(reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
    listed = {s.name for s in answers[0].list_services_response.service}
    assert {SERVICE_NAMES[service], "grpc.health.v1.Health"} <= listed


def test_list_formats(start_services) -> None:
    exporter = start_services("exporter").stub("exporter")
    formats = exporter.ListFormats(exporter_pb2.ListFormatsRequest(), timeout=5).formats
    assert [f.name for f in formats] == sorted(f.name for f in formats)
    assert "auto_round" in [f.name for f in formats]
    assert list(formats[[f.name for f in formats].index("auto_round")].int_bits) == [2, 3, 4, 8]


def test_metrics_count_calls_and_jobs(start_services, tiny_model: Path) -> None:
    services = start_services("planner", metrics_port=0)
    server = services.servers["planner"]
    planner = services.stub("planner")
    job = planner.StartPlan(planner_pb2.PlanRequest(model=str(tiny_model), target_avg_bits=4.5, sensitivity="weight"), timeout=10)
    list(planner.Watch(common_pb2.WatchRequest(job_id=job.job_id), timeout=30))
    with pytest.raises(grpc.RpcError):
        planner.StartPlan(planner_pb2.PlanRequest(), timeout=10)
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read().decode()
    assert 'arctl_rpc_calls_total{code="OK",method="StartPlan",service="planner"}' in text
    assert 'arctl_rpc_calls_total{code="INVALID_ARGUMENT",method="StartPlan",service="planner"}' in text
    assert 'arctl_rpc_latency_seconds_bucket{le="0.001",method="StartPlan",service="planner"}' in text
    assert 'arctl_job_duration_seconds_count{kind="plan",service="planner",state="SUCCEEDED"}' in text
    assert 'arctl_jobs_in_flight{service="planner"}' in text


def test_plan_request_sets_the_refinement(start_services, tiny_model: Path) -> None:
    """refine_evaluations travels to the engine: 2 measured swaps, or none with 0."""
    planner = start_services("planner").stub("planner")
    measured = {}
    for evaluations in (2, 0):
        request = planner_pb2.PlanRequest(model=str(tiny_model), target_avg_bits=4.5, nsamples=2, seqlen=32,
                                          calibration_data=common_pb2.ArtifactRef(uri="wikitext2"),
                                          refine_evaluations=evaluations)
        job = planner.StartPlan(request, timeout=10)
        list(planner.Watch(common_pb2.WatchRequest(job_id=job.job_id), timeout=60))
        status = planner.Get(common_pb2.GetRequest(job_id=job.job_id), timeout=10)
        assert status.status.state == common_pb2.JOB_STATE_SUCCEEDED, status.status.error
        notes = json.loads(status.plan.plan_json)["notes"]
        measured[evaluations] = notes["refine_evaluations"]
        assert notes["measured_kl"] <= notes["measured_kl_before_refine"]
    assert measured == {2: 2, 0: 0}


def test_plan_request_plans_the_head_and_the_embeddings(start_services, tiny_model: Path) -> None:
    planner = start_services("planner").stub("planner")
    request = planner_pb2.PlanRequest(model=str(tiny_model), target_avg_bits=5.0, sensitivity="weight", target_runtime="gguf",
                                      plan_lm_head=True, plan_embeddings=True)
    job = planner.StartPlan(request, timeout=10)
    list(planner.Watch(common_pb2.WatchRequest(job_id=job.job_id), timeout=60))
    status = planner.Get(common_pb2.GetRequest(job_id=job.job_id), timeout=10)
    assert status.status.state == common_pb2.JOB_STATE_SUCCEEDED, status.status.error
    names = [layer["name"] for layer in json.loads(status.plan.plan_json)["layers"]]
    assert names[0] == "model.embed_tokens" and names[-1] == "lm_head"
    request.target_runtime = "sglang"
    with pytest.raises(grpc.RpcError) as refused:
        planner.StartPlan(request, timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "sglang runs no quantized embeddings" in refused.value.details()


def test_internal_errors_do_not_leak_details(start_services, tiny_model: Path) -> None:
    """A failing job is FAILED with its reason; the RPC layer never returns a traceback."""
    planner = start_services("planner").stub("planner")
    job = planner.StartPlan(planner_pb2.PlanRequest(model=str(tiny_model), target_avg_bits=30.0, sensitivity="weight"), timeout=10)
    events = list(planner.Watch(common_pb2.WatchRequest(job_id=job.job_id), timeout=30))
    status = planner.Get(common_pb2.GetRequest(job_id=job.job_id), timeout=10).status
    assert events[-1].state == status.state == common_pb2.JOB_STATE_FAILED
    assert "outside what the schemes can reach" in status.error and "Traceback" not in status.error


def _self_signed(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost (skips without ``cryptography``)."""
    x509 = pytest.importorskip("cryptography.x509")
    hashes = pytest.importorskip("cryptography.hazmat.primitives.hashes")
    serialization = pytest.importorskip("cryptography.hazmat.primitives.serialization")
    ec = pytest.importorskip("cryptography.hazmat.primitives.asymmetric.ec")
    name_oid = x509.NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(name_oid.COMMON_NAME, "arctl-test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "tls.crt", folder / "tls.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return cert_path, key_path


def test_tls_and_token_auth(start_services, tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    services = start_services("exporter", tls_cert=cert, tls_key=key, auth_tokens=("s3cret",))
    address = services.address("exporter")
    services.channels["exporter"].close()
    request = exporter_pb2.ListFormatsRequest()

    with rpc_client.channel(address, rpc_client.ClientSettings(tls_ca=cert, token="s3cret")) as channel:
        assert exporter_pb2_grpc.ExporterServiceStub(channel).ListFormats(request, timeout=5).formats
        # probes need no token
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    for token in (None, "wrong"):
        with rpc_client.channel(address, rpc_client.ClientSettings(tls_ca=cert, token=token)) as channel:
            with pytest.raises(grpc.RpcError) as refused:
                exporter_pb2_grpc.ExporterServiceStub(channel).ListFormats(request, timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with rpc_client.channel(address, rpc_client.ClientSettings(token="s3cret")) as plaintext:
        with pytest.raises(grpc.RpcError) as no_tls:
            exporter_pb2_grpc.ExporterServiceStub(plaintext).ListFormats(request, timeout=5)
        assert no_tls.value.code() == grpc.StatusCode.UNAVAILABLE


def test_sigterm_drains_and_exits_cleanly(root: Path, tmp_path: Path, tiny_model: Path) -> None:
    process = spawn_service("planner", root, tmp_path / "state", "--drain-seconds", "5")
    with rpc_client.channel(process.address) as channel:
        planner = planner_pb2_grpc.PlannerServiceStub(channel)
        job = planner.StartPlan(planner_pb2.PlanRequest(model=str(tiny_model), target_avg_bits=4.5, sensitivity="weight"), timeout=30)
        list(planner.Watch(common_pb2.WatchRequest(job_id=job.job_id), timeout=60))
        process.process.send_signal(signal.SIGTERM)
        assert process.process.wait(timeout=30) == 0
    restarted = spawn_service("planner", root, tmp_path / "state")
    try:
        with rpc_client.channel(restarted.address) as channel:
            status = planner_pb2_grpc.PlannerServiceStub(channel).Get(common_pb2.GetRequest(job_id=job.job_id), timeout=10)
            assert status.status.state == common_pb2.JOB_STATE_SUCCEEDED
    finally:
        assert restarted.terminate() == 0


def test_python_m_entry_points() -> None:
    """``python -m arctl_<service> --help`` for the three, in one interpreter (one torch import)."""
    code = (
        "import runpy, sys\n"
        "for name in ('arctl_planner', 'arctl_tuner', 'arctl_exporter'):\n"
        "    sys.argv = [name, '--help']\n"
        "    try:\n"
        "        runpy.run_module(name, run_name='__main__')\n"
        "    except SystemExit as done:\n"
        "        assert done.code == 0, (name, done.code)\n"
    )
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert shown.returncode == 0, shown.stderr
    for service in SERVICE_NAMES:
        assert f"python -m arctl_{service}" in shown.stdout
    assert shown.stdout.count("--allowed-root") >= 3


def test_sigterm_mid_job_interrupts_it_and_the_next_server_resumes_it(root: Path, tmp_path: Path, deep_model: Path) -> None:
    state = tmp_path / "state"
    first = spawn_service("tuner", root, state, "--drain-seconds", "0")
    with rpc_client.channel(first.address) as channel:
        tuner = tuner_pb2_grpc.TunerServiceStub(channel)
        job = tuner.StartTune(tune_request(deep_model, root / "ckpt"), timeout=30)
        seen = watch_until(tuner, job.job_id, 40)
        assert first.terminate(timeout=30) == 0
    second = spawn_service("tuner", root, state)
    try:
        with rpc_client.channel(second.address) as channel:
            tuner = tuner_pb2_grpc.TunerServiceStub(channel)
            status = rpc_client.follow(tuner, job.job_id, lambda _: None, from_sequence=seen[-1].sequence + 1)
            stages = [e.stage for e in tuner.Watch(common_pb2.WatchRequest(job_id=job.job_id), timeout=30)]
    finally:
        second.terminate()
    assert status.status.state == common_pb2.JOB_STATE_SUCCEEDED
    assert stages.index("interrupted") < stages.index("resume") < len(stages) - 1
