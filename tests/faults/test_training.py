"""Training faults: a planted checkpoint never runs; a config that would train nothing is refused when read."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from coughreg.config.loading import load_resolved_config, save_config
from coughreg.training import checkpoints
from tests.conftest import HT_YAML, TINY
from tests.helpers.faults import cli, no_traceback

pytestmark = pytest.mark.faults


class _Planted:
    """What a hostile neighbour leaves where training resumes from: unpickling it opens (creates) a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"fingerprint": "x", "epoch": 1, "model": _Planted(marker)}, path)
    torch.load(path, weights_only=False)  # proof that the file is armed: a loader that trusts it runs it
    assert marker.exists()
    marker.unlink()


def _train_command(features: Path, out: Path, config_path: Path, cache: Path) -> list:
    return ["step", "train", "--input", features, "--out", out, "--config", config_path, "--cache-dir", cache]


def test_a_planted_checkpoint_in_the_member_folder_never_runs(tiny_run, tmp_path):
    """Training refuses the file, naming it, starts the member afresh, and finishes."""
    config = load_resolved_config(HT_YAML, [*TINY, "training.epochs=1"])
    save_config(config, tmp_path)
    planted, marker = tmp_path / "model" / "fold0_seed0" / checkpoints.CHECKPOINT, tmp_path / "code-ran"
    _plant(planted, marker)
    done = cli(*_train_command(tiny_run["features"], tmp_path / "model", tmp_path / "config.yaml", tmp_path / "cache"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert not marker.exists()
    assert f"{planted}: not a file of tensors and plain values" in done.stderr
    assert "this member starts afresh" in done.stderr and "resuming" not in done.stderr
    assert (tmp_path / "model" / "model.json").exists() and not planted.exists()


def test_a_planted_checkpoint_under_the_checkpoint_uri_never_runs(s3_env, bucket, tiny_run, tmp_path):
    """The shared ``cluster.checkpoint_uri`` prefix: a file planted where a retried pod fetches its checkpoint is
    refused (naming the object), training starts afresh, and the object is replaced by a real checkpoint."""
    config = load_resolved_config(HT_YAML, [*TINY, "training.epochs=1", f"cluster.checkpoint_uri=s3://{bucket}/shared"])
    save_config(config, tmp_path)
    command = _train_command(tiny_run["features"], tmp_path / "first", tmp_path / "config.yaml", tmp_path / "cache")
    assert cli(*command).returncode == 0
    client = s3_env.client()
    (key,) = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="shared/")["Contents"]]  # where pods resume
    marker = tmp_path / "code-ran"
    _plant(tmp_path / "planted.pt", marker)
    client.upload_file(str(tmp_path / "planted.pt"), bucket, key)

    done = cli(*_train_command(tiny_run["features"], tmp_path / "second", tmp_path / "config.yaml", tmp_path / "cache"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert not marker.exists()
    assert f"(fetched from s3://{bucket}/{key}); this member starts afresh" in done.stderr
    assert "not a file of tensors and plain values" in done.stderr and "resuming" not in done.stderr
    client.download_file(bucket, key, str(tmp_path / "now.pt"))
    assert checkpoints.load(tmp_path / "now.pt", torch.device("cpu"))["epoch"] == 1  # the planted file is gone


@pytest.mark.parametrize(("text", "override", "message"), [
    ("", None, "{config}: the config file holds no keys (empty, or comments only); write the experiment's sections into it"),
    ("# training:\n#   epochs: 3\n\n", None, "{config}: the config file holds no keys (empty, or comments only)"),
    ("training:\n  epochs: 0\n", None,
     "{config}: invalid experiment config:\n  key 'training.epochs': Input should be greater than or equal to 1 (got 0)"),
    ("training:\n  epochs: 3\n", "training.epochs=0", "key 'training.epochs': Input should be greater than or equal to 1"),
], ids=["empty-file", "comments-only", "epochs-0-in-the-file", "epochs-0-by-set"])
def test_a_config_that_would_train_nothing_is_refused_when_read(text, override, message, tiny_run, tmp_path):
    config = tmp_path / "experiment.yaml"
    config.write_text(text)
    out = tmp_path / "model"
    done = cli("step", "train", "--input", tiny_run["features"], "--out", out, "--config", config,
                *(["--set", override] if override else []))
    assert done.returncode == 2, done.stderr[-3000:]
    assert message.format(config=config) in done.stderr and str(config) in done.stderr
    no_traceback(done)
    assert not out.exists()
