"""Artefact references: the policy on its own, and artefacts moving through fsspec URLs
(``memory://``, shared by the in-process servers and the test) instead of a shared volume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import fsspec
import grpc
import pytest

from arctl.checkpoint import read_checkpoint
from arctl.models import load_model
from arctl.rpc import client as rpc_client
from arctl.rpc import convert
from arctl.rpc.artefacts import ArtefactPolicy, sha256_of
from arctl.rpc.errors import ArtefactNotFound, InvalidArgument, OutsideAllowedRoots
from arctl.schemes import get_scheme
from arctl.v1 import common_pb2, exporter_pb2, tuner_pb2
from arctl_planner.engine import plan_uniform
from arctl_tuner.rtn import quantize_rtn


@pytest.fixture
def policy(root: Path, tmp_path: Path) -> ArtefactPolicy:
    return ArtefactPolicy.create([root], cache_dir=tmp_path / "cache", embedded_models=["smollm2"])


def test_local_references(policy: ArtefactPolicy, root: Path, tmp_path: Path) -> None:
    (root / "a").mkdir()
    (root / "a" / "f.txt").write_text("x")
    assert policy.existing(str(root / "a" / "f.txt"), "x", "file") == root / "a" / "f.txt"
    assert policy.existing(f"file://{root}/a", "x", "dir") == root / "a"
    assert policy.model_reference("smollm2") == "smollm2"
    for bad, error in [
        ("a/f.txt", InvalidArgument),  # relative
        (f"{root}/a/\x00", InvalidArgument),
        ("file://elsewhere/etc/passwd", InvalidArgument),
        (f"{root}/../../etc/passwd", OutsideAllowedRoots),
        ("/etc/passwd", OutsideAllowedRoots),
        (f"{root}/missing", ArtefactNotFound),
        ("s3://bucket/key", OutsideAllowedRoots),  # no URL prefix allowed
    ]:
        with pytest.raises(error):
            policy.existing(bad, "x")
    (root / "link").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(OutsideAllowedRoots):
        policy.output_path(str(root / "link" / "out"), "output")
    with pytest.raises(InvalidArgument):
        policy.output_path(str(root), "output")  # the root itself


def test_checkpoint_completeness(policy: ArtefactPolicy, root: Path, tiny_model: Path) -> None:
    loaded = load_model(str(tiny_model))
    quantize_rtn(loaded, plan_uniform(loaded, get_scheme("W4A16")), root / "ckpt")
    manifest = policy.complete_folder(str(root / "ckpt"), "c", "arctl.quantized_checkpoint") / "manifest.json"
    digest = sha256_of(manifest)
    policy.complete_folder(str(root / "ckpt"), "c", "arctl.quantized_checkpoint", digest)
    with pytest.raises(InvalidArgument, match="sha256"):
        policy.complete_folder(str(root / "ckpt"), "c", "arctl.quantized_checkpoint", "0" * 64)
    with pytest.raises(InvalidArgument, match="not a"):
        policy.complete_folder(str(root / "ckpt"), "c", "arctl.other")
    (root / "ckpt" / "quantized.safetensors").write_bytes(b"short")
    with pytest.raises(InvalidArgument, match="wrong size"):
        policy.complete_folder(str(root / "ckpt"), "c", "arctl.quantized_checkpoint")
    (root / "ckpt" / "manifest.json").unlink()
    with pytest.raises(InvalidArgument, match="no manifest.json"):
        policy.complete_folder(str(root / "ckpt"), "c", "arctl.quantized_checkpoint")


def test_artefacts_through_fsspec_urls(start_services, tiny_model: Path, tmp_path: Path) -> None:
    fs = fsspec.filesystem("memory")
    fs.put(str(tiny_model), "/arctl/models/tiny", recursive=True)
    services = start_services("tuner", "exporter", url_prefixes=("memory://arctl/",))
    tuner, exporter = services.stub("tuner"), services.stub("exporter")
    loaded = load_model(str(tiny_model))
    plan = plan_uniform(loaded, get_scheme("W4A16"))
    job = tuner.StartTune(
        tuner_pb2.TuneRequest(
            model="memory://arctl/models/tiny", plan=convert.plan_to_proto(plan), recipe="rtn",
            output=common_pb2.ArtifactRef(uri="memory://arctl/runs/ckpt"),
        ),
        timeout=10,
    )
    status = rpc_client.follow(tuner, job.job_id, lambda _: None)
    assert status.status.state == common_pb2.JOB_STATE_SUCCEEDED, status.status.error
    assert status.checkpoint.uri == "memory://arctl/runs/ckpt" and fs.exists("/arctl/runs/ckpt/manifest.json")

    job = exporter.StartExport(
        exporter_pb2.ExportRequest(
            checkpoint=status.checkpoint, formats=["auto_round"], output=common_pb2.ArtifactRef(uri="memory://arctl/runs/export")
        ),
        timeout=10,
    )
    exported = rpc_client.follow(exporter, job.job_id, lambda _: None)
    assert exported.status.state == common_pb2.JOB_STATE_SUCCEEDED, exported.status.error
    assert [(e.format, e.artifact.uri) for e in exported.exports] == [("auto_round", "memory://arctl/runs/export/auto_round")]
    fs.get("/arctl/runs/ckpt", str(tmp_path / "ckpt"), recursive=True)
    assert read_checkpoint(tmp_path / "ckpt").plan.scheme_counts() == {"W4A16": 14}
    config = json.loads(fs.cat("/arctl/runs/export/auto_round/config.json"))
    assert config["quantization_config"]["quant_method"] == "auto-round"
    # a URL outside the allowed prefixes is refused
    with pytest.raises(grpc.RpcError) as refused:
        tuner.StartTune(
            tuner_pb2.TuneRequest(model="memory://other/m", plan=convert.plan_to_proto(plan), recipe="rtn",
                                  output=common_pb2.ArtifactRef(uri="memory://arctl/x")),
            timeout=10,
        )
    assert "not under an allowed URL prefix" in refused.value.details()
    fs.rm("/arctl", recursive=True)
    shutil.rmtree(tmp_path / "ckpt")
