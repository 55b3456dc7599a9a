"""Pretrained weights as users expect them: from a file, the Hugging Face cache or timm's hub (a loopback mirror here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from coughreg.config.loading import load_resolved_config, save_config
from coughreg.model.weights import hub_id
from coughreg.runtime.errors import CoughPipelineError
from coughreg.training import load_members, train
from tests.conftest import HT_YAML, PROJECT, TINY
from tests.helpers.hub_mirror import HubMirror


def _timm_weights(backbone: str, path):
    """Random weights saved the way timm's hub files are: three input channels, a 1000-class classifier."""
    model = timm.create_model(backbone, pretrained=False, in_chans=3, num_classes=1000)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model.state_dict()


@pytest.fixture
def mirror(tmp_path):
    server = HubMirror()
    repo, _ = hub_id("test_efficientnet")
    state = _timm_weights("test_efficientnet", tmp_path / "model.safetensors")
    server.add(repo, "model.safetensors", tmp_path / "model.safetensors")
    server.state = state
    yield server
    server.close()


def _train_cli(tiny_run, out, tmp_path, env, *extra):
    config_path = save_config(load_resolved_config(HT_YAML, TINY), tmp_path)
    return subprocess.run(
        [sys.executable, "pipeline.py", "step", "train", "--input", str(tiny_run["features"]), "--out", str(out),
         "--config", str(config_path), "--set", "architecture.pretrained=true", "--set", "training.epochs=1",
         "--set", "training.learning_rate=1e-12", *extra],  # one epoch that leaves the loaded weights as they were
        cwd=PROJECT, capture_output=True, text=True, timeout=300, env=env,
    )


def _hub_env(mirror, tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_TOKEN")}
    return {**env, "HF_ENDPOINT": mirror.url, "HF_HOME": str(tmp_path / "hf"), **extra}


def test_weights_download_from_the_hub_once_and_load_into_the_backbone(tiny_run, mirror, tmp_path):
    done = _train_cli(tiny_run, tmp_path / "first", tmp_path, _hub_env(mirror, tmp_path))
    assert done.returncode == 0, done.stderr
    assert [r["path"] for r in mirror.downloads()] == [f"/{hub_id('test_efficientnet')[0]}/resolve/main/model.safetensors"]
    member = json.loads((tmp_path / "first" / "model.json").read_text())["members"][0]
    assert member["pretrained_from"].startswith(f"{mirror.url}/timm/test_efficientnet")
    stem = next(k for k in mirror.state if k.endswith("conv_stem.weight"))
    loaded = load_members(tmp_path / "first")[0].backbone.state_dict()
    torch.testing.assert_close(loaded[stem], mirror.state[stem].sum(dim=1, keepdim=True))  # three channels summed into one
    block = next(k for k in mirror.state if k.startswith("blocks.") and k.endswith(".weight"))
    torch.testing.assert_close(loaded[block], mirror.state[block])

    asked = len(mirror.requests)
    again = _train_cli(tiny_run, tmp_path / "second", tmp_path, _hub_env(mirror, tmp_path))
    assert again.returncode == 0, again.stderr
    assert len(mirror.requests) == asked  # the second run reads the Hugging Face cache: no request reaches the mirror
    offline = _train_cli(tiny_run, tmp_path / "offline", tmp_path, _hub_env(mirror, tmp_path, HF_HUB_OFFLINE="1"))
    assert offline.returncode == 0, offline.stderr


def test_a_private_mirror_takes_the_token_and_the_token_stays_out_of_everything(tiny_run, tmp_path):
    token = "hf_planted0token0value0123456789"
    server = HubMirror(token=token)
    repo, _ = hub_id("test_efficientnet")
    _timm_weights("test_efficientnet", tmp_path / "model.safetensors")
    server.add(repo, "model.safetensors", tmp_path / "model.safetensors")
    try:
        refused = _train_cli(tiny_run, tmp_path / "refused", tmp_path, _hub_env(server, tmp_path))
        assert refused.returncode == 2
        assert "error: architecture.pretrained: no weights for 'test_efficientnet'" in refused.stderr and "401" in refused.stderr
        done = _train_cli(tiny_run, tmp_path / "model", tmp_path, _hub_env(server, tmp_path, HF_TOKEN=token))
        assert done.returncode == 0, done.stderr
        assert server.downloads()[-1]["authorization"] == f"Bearer {token}"
    finally:
        server.close()
    written = [p for p in (tmp_path / "model").rglob("*") if p.is_file()]
    assert written and not any(token.encode() in p.read_bytes() for p in written)
    assert token not in done.stdout + done.stderr


def test_no_weights_anywhere_names_the_key_and_what_to_do(tiny_run, tmp_path):
    config = load_resolved_config(HT_YAML, [*TINY, "architecture.pretrained=true", "training.epochs=1"])
    with pytest.raises(CoughPipelineError) as error:  # the tests run with HF_HUB_OFFLINE: the hub is never asked
        train(tiny_run["features"], tmp_path / "model", config)
    message = str(error.value)
    assert message.startswith("architecture.pretrained: no weights for 'test_efficientnet'")
    assert "HF_HUB_OFFLINE is set" in message and "architecture.pretrained_weights" in message and "pretrained=false" in message


def test_weights_of_another_backbone_are_refused_naming_the_file_the_backbone_and_a_tensor(tiny_run, tmp_path):
    _timm_weights("test_resnet", tmp_path / "resnet.safetensors")
    config = load_resolved_config(HT_YAML, [*TINY, "architecture.pretrained=true", "training.epochs=1",
                                            f"architecture.pretrained_weights={tmp_path / 'resnet.safetensors'}"])
    with pytest.raises(CoughPipelineError) as error:
        train(tiny_run["features"], tmp_path / "model", config)
    message = str(error.value)
    assert str(tmp_path / "resnet.safetensors") in message and "backbone 'test_efficientnet'" in message
    assert "is missing from the file" in message or "in the file but not in the backbone" in message or "has shape" in message


def test_weights_that_changed_after_they_were_resolved_are_refused(tiny_run, tmp_path):
    state = _timm_weights("test_efficientnet", tmp_path / "weights.safetensors")
    config = load_resolved_config(HT_YAML, [*TINY, "architecture.pretrained=true", "training.epochs=1",
                                            f"architecture.pretrained_weights={tmp_path / 'weights.safetensors'}",
                                            f"architecture.pretrained_sha256={'f' * 64}"])
    with pytest.raises(CoughPipelineError, match="architecture.pretrained_sha256: .* has SHA-256 [0-9a-f]{64}, not f{64}"):
        train(tiny_run["features"], tmp_path / "model", config)
    assert set(load_file(str(tmp_path / "weights.safetensors"))) == set(state)


@pytest.mark.slow
def test_the_users_yaml_unchanged_trains_resnet50_from_the_hub_mirror(s3_env, bucket, coughvid_zip, tmp_path):
    """run-local with the Hydrogen Torch YAML as it is (resnet50, pretrained: true): the data, the epochs and the
    evaluation's extras shrunk with --set, never the model keys; the weights come from a mirror of the hub in
    timm's layout."""
    server = HubMirror()
    repo, _ = hub_id("resnet50")
    state = _timm_weights("resnet50", tmp_path / "resnet50.safetensors")
    server.add(repo, "model.safetensors", tmp_path / "resnet50.safetensors")
    s3_env.client().upload_file(str(coughvid_zip), bucket, "covid19-cough-audio-classification.zip")

    def run_local():
        return subprocess.run(
            [sys.executable, "pipeline.py", "run-local", "--data", f"s3://{bucket}/covid19-cough-audio-classification.zip",
             "--out", str(tmp_path / "run"), "--set", "training.epochs=1", "--set", "logging.number_of_audios=2",
             "--set", "prediction.robustness_recordings=0"],  # the recording chain is measured in other tests
            cwd=PROJECT, capture_output=True, text=True, timeout=900, env=_hub_env(server, tmp_path),
        )

    try:
        done = run_local()
        assert done.returncode == 0, done.stderr[-3000:]
        assert [r["path"] for r in server.downloads()] == [f"/{repo}/resolve/main/model.safetensors"]
        model = next((tmp_path / "run" / "pipeline-root").glob("cough-regression-*/train/model"))
        info = json.loads((model / "model.json").read_text())
        assert info["backbone"] == "resnet50" and "/weights/sha256/" in info["members"][0]["pretrained_from"]
        assert "scorer:" in done.stdout and "report:" in done.stdout
        trained = load_members(model)[0].backbone.state_dict()
        assert trained["conv1.weight"].shape == (64, 1, 7, 7)  # the stem taken to one channel
        asked = len(server.requests)
        again = run_local()  # a second run: the weights from the cache, every other step from kfp.local's cache
        assert again.returncode == 0, again.stderr[-3000:]
        assert len(server.requests) == asked
        assert state["fc.weight"].shape == (1000, 2048)  # the mirror served a classifier the backbone dropped
    finally:
        server.close()


def test_the_cache_gives_the_backbones_own_weights_never_a_neighbours(tiny_run, tmp_path, monkeypatch):
    """A Hugging Face cache holding only another model's file (test_resnet) is not searched by name prefix."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    repo, _ = hub_id("test_resnet")
    snapshot = tmp_path / "hf" / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    _timm_weights("test_resnet", snapshot / "model.safetensors")
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0123abcd")
    own = load_resolved_config(HT_YAML, [*TINY, "architecture.backbone=test_resnet", "architecture.pretrained=true", "training.epochs=1"])
    result = train(tiny_run["features"], tmp_path / "own", own)
    assert result.members[0]["pretrained_from"].startswith(f"the Hugging Face cache ({repo})")
    other = load_resolved_config(HT_YAML, [*TINY, "architecture.pretrained=true", "training.epochs=1"])  # test_efficientnet
    with pytest.raises(CoughPipelineError, match="no weights for 'test_efficientnet'"):
        train(tiny_run["features"], tmp_path / "other", other)


def test_a_stored_copy_that_does_not_hold_up_is_fetched_again(tmp_path, caplog):
    """The store's record is checked against the file's hash: a damaged copy or record is a miss, never a crash."""
    from coughreg.model.weights import Weights, keep, resolve

    _timm_weights("test_efficientnet", tmp_path / "model.safetensors")
    import hashlib

    digest = hashlib.sha256((tmp_path / "model.safetensors").read_bytes()).hexdigest()
    store = str(tmp_path / "store")
    uri = keep(Weights(tmp_path / "model.safetensors", digest, "https://mirror.example/timm/test_efficientnet.r160_in1k"),
               store, "test_efficientnet")
    config = load_resolved_config(HT_YAML, [*TINY, "architecture.pretrained=true"])
    found = resolve(config, store)  # the Hugging Face cache is empty and the hub offline: the store has it
    assert found.sha256 == digest and str(found.path) == uri
    (tmp_path / "store" / "sha256" / digest / "model.safetensors").write_bytes(b"damaged")
    with pytest.raises(CoughPipelineError, match="no weights for 'test_efficientnet'"), caplog.at_level("WARNING"):
        resolve(config, store)
    assert f"is not SHA-256 {digest}" in caplog.text
    next((tmp_path / "store" / "by-name").iterdir()).write_text('{"sha256": "abc"')  # a record cut short
    with pytest.raises(CoughPipelineError, match="no weights for 'test_efficientnet'"):
        resolve(config, store)


def test_a_weights_folder_names_one_file_or_is_a_hugging_face_cache(tmp_path):
    from coughreg.model.weights import weights_in

    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "a.safetensors").write_bytes(b"a")
    assert weights_in(folder) == folder / "a.safetensors"
    (folder / "b.pth").write_bytes(b"b")
    with pytest.raises(CoughPipelineError, match=r"must hold exactly one weights file .* it holds 2: a.safetensors, b.pth"):
        weights_in(folder)
    cache = tmp_path / "hub"
    for repo, commit in ((hub_id("test_efficientnet")[0], "1111"), ("timm/test_efficientnet.other", "2222")):
        snapshot = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / commit
        snapshot.mkdir(parents=True)
        (snapshot / "model.safetensors").write_bytes(repo.encode())
        (snapshot.parent.parent / "refs").mkdir()
        (snapshot.parent.parent / "refs" / "main").write_text(commit)
    assert weights_in(cache, "test_efficientnet").read_bytes() == hub_id("test_efficientnet")[0].encode()


def test_credentials_in_hf_endpoint_never_reach_a_message(monkeypatch):
    from coughreg.model.weights import hub_endpoint

    monkeypatch.setenv("HF_ENDPOINT", "https://user:s3cr3tpass@hf-mirror.example.com:8443/")
    assert hub_endpoint() == "https://hf-mirror.example.com:8443"
