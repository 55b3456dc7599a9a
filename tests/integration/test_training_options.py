"""Every Hydrogen Torch training option does what it says; a killed run resumes to the same model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from coughreg.artifacts import shard_paths
from coughreg.artifacts.shards import SpectrogramShardReader
from coughreg.config.loading import load_resolved_config, save_config
from coughreg.features.extract import extract_features
from coughreg.runtime.errors import CoughPipelineError
from coughreg.training import checkpoints, load_members, train
from coughreg.training.folds import truncate_groups
from coughreg.training.mixing import mix_batch
from tests.conftest import HT_YAML, PROJECT, REAL_METADATA, TINY


def _config(*extra):
    return load_resolved_config(HT_YAML, [*TINY, *extra])


def test_mixup_and_cutmix():
    rng = np.random.default_rng(0)
    spectrograms = torch.stack([torch.full((4, 10), -20.0), torch.full((4, 10), -80.0)])
    lengths = torch.tensor([10, 6])
    labels = torch.tensor([[1.0], [0.0]])
    off = _config("augmentation.mix_audio=Disabled")
    assert mix_batch(spectrograms, lengths, labels, off, rng)[0] is spectrograms
    never = _config("augmentation.mix_audio=Mixup", "augmentation.mix_probability=0")
    assert mix_batch(spectrograms, lengths, labels, never, rng)[2] is labels

    mixup = _config("augmentation.mix_audio=Mixup", "augmentation.mix_concentration=0.4")
    mixed, mixed_lengths, mixed_labels = mix_batch(spectrograms, lengths, labels, mixup, np.random.default_rng(1))
    assert mixed.shape == spectrograms.shape and (mixed_lengths == 10).all()
    # power-domain mixing: never quieter than the louder clip's share alone, never louder than the louder clip
    assert (mixed <= -20.0 + 1e-4).all() and (mixed >= -80.0 - 1e-4).all()
    assert torch.allclose(mixed_labels.sum(), torch.tensor(1.0))  # shares of a swapped pair add up

    cutmix = _config("augmentation.mix_audio=Cutmix", "augmentation.mix_target=Ratio")
    cut, _, cut_labels = mix_batch(spectrograms, lengths, labels, cutmix, np.random.default_rng(2))
    taken = (cut[0] == -80.0).all(dim=0).float().mean()  # share of frames that came from the other clip
    assert float(cut_labels[0, 0]) == pytest.approx(1.0 - float(taken), abs=1e-6)
    maximum = _config("augmentation.mix_audio=Cutmix", "augmentation.mix_target=Max")
    assert (mix_batch(spectrograms, lengths, labels, maximum, np.random.default_rng(2))[2] == 1.0).all()


def test_grouping_on_the_day_of_the_real_datetimes():
    metadata = pd.read_csv(REAL_METADATA, usecols=["datetime"])["datetime"]
    assert metadata.nunique() == len(metadata)  # raw values: one group per recording
    days = truncate_groups(metadata, "day")
    assert days.nunique() == pd.to_datetime(metadata, format="ISO8601").dt.date.nunique()
    assert truncate_groups(pd.Series(["not a time", "2020-04-01T10:00:00+00:00"]), "day").tolist()[0] == "not a time"


def test_options_recorded_in_the_history(tiny_run, tmp_path):
    config = _config("training.evaluate_before_training=true", "training.calculate_train_metric=true",
                     "logging.log_grad_norm=true", "training.epochs=2", "dataset.group_fold_truncate=day")
    result = train(tiny_run["features"], tmp_path / "model", config)
    epochs = [h["epoch"] for h in result.history]
    assert epochs == [0, 1, 2] and "validation_mae" in result.history[0]
    assert all(np.isfinite(h["train_mae"]) and h["grad_norm_mean"] > 0 for h in result.history[1:])
    info = json.loads((tmp_path / "model" / "model.json").read_text())
    assert "truncated to the day" in info["validation_scheme"]


def test_save_best_checkpoint_keeps_the_best_epoch(tiny_run, tmp_path):
    config = _config("training.save_best_checkpoint=true", "training.epochs=3", "training.learning_rate=0.05")
    result = train(tiny_run["features"], tmp_path / "model", config)
    scores = {h["epoch"]: h["validation_mae"] for h in result.history}
    best = min(scores, key=scores.get)
    assert result.members[0]["best_epoch"] == best
    predictions = pd.read_parquet(result.predictions_path)
    mae = np.mean(np.abs(predictions["cough_detected"] - predictions["pred_cough_detected"]))
    assert mae == pytest.approx(scores[best], abs=1e-6)


def test_several_seeds_make_an_averaged_ensemble(tiny_run, tmp_path):
    config = _config("environment.number_of_seeds_per_run=2", "training.epochs=1")
    result = train(tiny_run["features"], tmp_path / "model", config)
    assert [m["seed"] for m in result.members] == [1234, 1235]
    members = [np.load(tmp_path / "model" / f"fold0_seed{i}" / "validation.npy") for i in range(2)]
    predictions = pd.read_parquet(result.predictions_path)
    np.testing.assert_allclose(predictions["pred_cough_detected"], np.mean(members, axis=0)[:, 0], atol=1e-6)


def test_a_diverging_run_stops_naming_epoch_and_step(tiny_run, tmp_path):
    config = _config("training.optimizer=SGD", "training.learning_rate=1e30", "training.loss_function=MSE")
    with pytest.raises(CoughPipelineError, match=r"fold 0, epoch \d+, step \d+: the loss is nan"):
        train(tiny_run["features"], tmp_path / "model", config)


@pytest.mark.parametrize("copies", ["augmentation.recording_chain_probability=0.5",
                                    "augmentation.recording_chain_consistency=1"])
def test_a_run_killed_mid_epoch_resumes_to_the_same_model(tiny_run, tmp_path, copies):
    # with every random augmentation (recording-chain copies, chosen or paired, among them) and the weight average on:
    # their state must resume exactly too
    config = _config("training.epochs=4", "augmentation.gain_db=6", "augmentation.lowpass_probability=0.5",
                     "augmentation.frequency_masks=1", "augmentation.frequency_mask_bins=8",
                     "augmentation.time_masks=1", "augmentation.time_mask_frames=10", "training.ema_decay=0.9",
                     "augmentation.recording_chain_views=2", copies, "audio.spectrogram_normalization=Clip")
    features = tmp_path / "features"
    extract_features(tiny_run["ingest"], features, config, workers=2)
    save_config(config, tmp_path)
    command = [sys.executable, "pipeline.py", "step", "train", "--input", str(features),
               "--out", str(tmp_path / "killed"), "--config", str(tmp_path / "config.yaml")]
    process = subprocess.Popen(command, cwd=PROJECT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    checkpoint = tmp_path / "killed" / "fold0_seed0" / "checkpoint.pt"
    deadline = time.time() + 240
    while time.time() < deadline and not checkpoint.exists():
        time.sleep(0.01)
    time.sleep(0.3)  # into the next epoch
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert checkpoint.exists() and not (tmp_path / "killed" / "model.json").exists()
    epoch_at_kill = checkpoints.load(checkpoint, torch.device("cpu"))["epoch"]  # the product's loader: weights only
    assert epoch_at_kill < 4
    done = subprocess.run(command, cwd=PROJECT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"resuming after epoch {epoch_at_kill}" in done.stderr

    clean = train(features, tmp_path / "clean", config)
    resumed = load_file(str(tmp_path / "killed" / "fold0_seed0" / "model.safetensors"))
    uninterrupted = load_file(str(tmp_path / "clean" / "fold0_seed0" / "model.safetensors"))
    for key, value in uninterrupted.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=1e-6)
    history = json.loads((tmp_path / "killed" / "history.json").read_text())
    assert [h["validation_mae"] for h in history] == pytest.approx([h["validation_mae"] for h in clean.history], abs=1e-6)
    assert not checkpoint.exists()  # a finished member needs no checkpoint


def test_a_retried_pod_resumes_from_the_checkpoint_in_s3(s3_env, bucket, tiny_run, tmp_path):
    """A retry lands on a fresh pod with an empty output folder: the checkpoint comes back from S3."""
    config = _config("training.epochs=3", f"cluster.checkpoint_uri=s3://{bucket}/checkpoints")
    save_config(config, tmp_path)
    def command(out):
        return [sys.executable, "pipeline.py", "step", "train", "--input", str(tiny_run["features"]),
                "--out", str(out), "--config", str(tmp_path / "config.yaml"), "--cache-dir", str(tmp_path / "cache")]
    process = subprocess.Popen(command(tmp_path / "pod-1"), cwd=PROJECT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    client = s3_env.client()
    deadline = time.time() + 240
    while time.time() < deadline and client.list_objects_v2(Bucket=bucket, Prefix="checkpoints/").get("KeyCount", 0) == 0:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert client.list_objects_v2(Bucket=bucket, Prefix="checkpoints/")["KeyCount"] == 1
    done = subprocess.run(command(tmp_path / "pod-2"), cwd=PROJECT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "checkpoint fetched from s3://" in done.stderr and "resuming after epoch" in done.stderr
    clean = train(tiny_run["features"], tmp_path / "clean", _config("training.epochs=3"))
    resumed = load_file(str(tmp_path / "pod-2" / "fold0_seed0" / "model.safetensors"))
    for key, value in load_file(str(clean.out_dir / "fold0_seed0" / "model.safetensors")).items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_distributed_data_parallel_under_torchrun(tiny_run, tmp_path):
    """Two processes with the gloo backend on the CPU: the same code path as several GPUs with NCCL."""
    config = _config("training.epochs=2", "environment.seed=-1")  # every rank must train with rank 0's seed
    save_config(config, tmp_path)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "pipeline.py", "step",
               "train", "--input", str(tiny_run["features"]), "--out", str(tmp_path / "ddp"), "--config", str(tmp_path / "config.yaml")]
    done = subprocess.run(command, cwd=PROJECT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "distributed training: rank 0 of 2 (gloo)" in done.stderr and "rank 1 of 2" in done.stderr
    info = json.loads((tmp_path / "ddp" / "model.json").read_text())
    assert len(info["members"]) == 1
    predictions = pd.read_parquet(tmp_path / "ddp" / "predictions.parquet")
    assert predictions["pred_cough_detected"].between(0, 1).all() and len(predictions) >= 4
    steps = [line for line in done.stderr.splitlines() if "epoch 1 step" in line]
    assert len(steps) == 2 and all("step 2/2" in line for line in steps)  # 19 rows / batch 4: 4 batches, 2 per rank
    seeds = {line.split(": seed ")[1].split(",")[0] for line in done.stderr.splitlines() if "environment.seed is -1" in line}
    assert len(seeds) == 1 and info["seed"] == int(seeds.pop())


def test_the_weight_average_warms_up_and_follows_the_weights():
    from coughreg.training.member import create_ema

    model = torch.nn.Sequential(torch.nn.Linear(2, 1), torch.nn.BatchNorm1d(1))
    ema = create_ema(model, decay=0.99)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    model[1].num_batches_tracked += 5
    ema.update(model, step=1)  # the first step takes the weights as they are
    torch.testing.assert_close(ema.module[0].weight, model[0].weight)
    before = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update(model, step=2)
    decay = 1 - 2 ** -0.75  # warm-up: 1 - (1 + 1) ** -3/4 at the second step, not 0.99
    torch.testing.assert_close(ema.module[0].weight, decay * before + (1 - decay) * model[0].weight)
    assert int(ema.module[1].num_batches_tracked) == 5  # counters are copied, not averaged
    assert not ema.module.training
    restored = create_ema(model, decay=0.99)
    restored.load_state_dict(ema.state_dict())
    assert torch.equal(restored.module[0].weight, ema.module[0].weight)


def test_the_weight_average_is_what_is_validated_and_saved(tiny_run, tmp_path):
    config = _config("training.ema_decay=0.9", "training.epochs=2")
    result = train(tiny_run["features"], tmp_path / "ema", config)
    assert result.members[0]["weights_kind"] == "moving average (decay 0.9)"
    plain = load_file(str(tiny_run["model"] / "fold0_seed0" / "model.safetensors"))
    averaged = load_file(str(tmp_path / "ema" / "fold0_seed0" / "model.safetensors"))
    assert any(not torch.equal(plain[k], averaged[k]) for k in plain)
    # the saved weights reproduce the validation predictions written beside them, clip by clip
    (member,) = load_members(tmp_path / "ema")
    reader = SpectrogramShardReader(shard_paths(tiny_run["features"]))
    predictions = pd.read_parquet(result.predictions_path)
    rows = reader.index.reset_index().set_index("id").loc[predictions["id"], "index"].to_numpy()
    with torch.inference_mode():
        scored = [float(member(torch.from_numpy(reader.spectrogram(int(r)).astype(np.float32))[None])) for r in rows]
    np.testing.assert_allclose(scored, predictions["pred_cough_detected"], atol=1e-5)


@pytest.mark.slow
def test_the_train_step_launches_one_rank_per_process(tiny_run, tmp_path, capfd):
    """What the train step does on a node with several GPUs, here with two CPU ranks (gloo) started by the step itself."""
    from coughreg.config.given import Given
    from coughreg.config.ownership import step_parameter
    from coughreg.steps.train import train_step

    config = _config("training.epochs=2")
    summary = train_step(tiny_run["features"], tmp_path / "ddp", Given.parameter("train_config", step_parameter(config, "train")),
                         processes=2)
    logged = capfd.readouterr().err
    assert "distributed training: rank 0 of 2 (gloo)" in logged and "rank 1 of 2" in logged
    steps = [line for line in logged.splitlines() if "epoch 1 step" in line]
    assert len(steps) == 2 and all("step 2/2" in line for line in steps)  # 19 rows / batch 4: 4 batches, 2 per rank
    assert summary["members"] == 1 and summary["seed"] == 1234
    assert pd.read_parquet(tmp_path / "ddp" / "predictions.parquet")["pred_cough_detected"].between(0, 1).all()


@pytest.mark.slow
def test_a_rank_that_fails_is_named_in_one_line(tiny_run, tmp_path):
    from coughreg.config.given import Given
    from coughreg.config.ownership import step_parameter
    from coughreg.steps.train import train_step

    config = _config("training.differential_learning_rate_layers=[no_such_layer]")
    with pytest.raises(CoughPipelineError) as error:
        train_step(tiny_run["features"], tmp_path / "ddp", Given.parameter("train_config", step_parameter(config, "train")),
                   processes=2)
    message = str(error.value)
    assert message.startswith("distributed training failed on rank") and "no_such_layer" in message
    assert "Traceback" not in message and "\n" not in message


def test_a_finished_member_is_kept_only_for_the_same_config_and_data(tiny_run, tmp_path, caplog):
    from coughreg.training.checkpoints import fingerprint

    config = _config("training.epochs=1")
    rows = np.arange(10)
    assert fingerprint(config, "set-a", rows, 4) != fingerprint(config, "set-b", rows, 4)  # other data, other key
    train(tiny_run["features"], tmp_path / "model", config)
    first = load_file(str(tmp_path / "model" / "fold0_seed0" / "model.safetensors"))
    changed = _config("training.epochs=1", "training.learning_rate=0.05")
    with caplog.at_level("INFO"):
        train(tiny_run["features"], tmp_path / "model", changed)  # rerun into the same folder with another rate
    assert "trained with another config or data; training this member again" in caplog.text
    second = load_file(str(tmp_path / "model" / "fold0_seed0" / "model.safetensors"))
    assert any(not torch.equal(first[k], second[k]) for k in first)
    caplog.clear()
    with caplog.at_level("INFO"):
        train(tiny_run["features"], tmp_path / "model", changed)  # and once more, unchanged: kept
    assert "already trained, kept" in caplog.text
