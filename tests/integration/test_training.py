"""Training: group folds, the optimisation factories, a real (tiny) run, reproducibility."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd
import pytest
import torch

from coughreg.config.loading import load_resolved_config
from coughreg.model.network import create_model
from coughreg.runtime.errors import CoughPipelineError
from coughreg.training import load_members, train
from coughreg.training.data import LengthBucketBatchSampler
from coughreg.training.factories import create_loss, create_optimizer, create_scheduler
from coughreg.training.folds import assign_folds, selected_folds, split_folds
from tests.conftest import HT_YAML, REAL_METADATA, TINY


def test_group_folds_on_the_real_metadata():
    metadata = pd.read_csv(REAL_METADATA, usecols=["uuid", "datetime"])
    day = metadata["datetime"].str[:10]  # the raw datetime is unique per recording: group on the day
    folds = assign_folds(day, 5, seed=42)
    assert set(folds) == {0, 1, 2, 3, 4}
    assert pd.DataFrame({"day": day, "fold": folds}).groupby("day")["fold"].nunique().max() == 1
    sizes = np.bincount(folds)
    assert sizes.min() > 0.5 * sizes.max()
    np.testing.assert_array_equal(folds, assign_folds(day, 5, seed=42))
    assert not np.array_equal(folds, assign_folds(day, 5, seed=43))


def test_without_a_group_column_each_recording_is_its_own_group():
    """No ``dataset.group_fold_column``: the ingest writes an empty group for every row, and the folds are over
    recordings (five folds from 60 recordings, as the documented step-by-step path makes)."""
    config = load_resolved_config(HT_YAML, [*TINY, "dataset.group_fold_column=null"])
    labelled = pd.DataFrame({"id": [f"r{i:02d}" for i in range(60)], "split": "train", "group": ""})
    folds, trained, scheme = split_folds(labelled, config, seed=3)
    assert sorted(np.bincount(folds)) == [12] * 5 and trained == selected_folds(config)
    assert scheme.startswith("group k-fold on recording (no dataset.group_fold_column)")
    with pytest.raises(CoughPipelineError, match="1 distinct groups cannot fill 5 folds"):  # a named column still counts its values
        split_folds(labelled, load_resolved_config(HT_YAML, [*TINY, "dataset.group_fold_column=day"]), seed=3)


def test_too_few_groups_is_a_clear_error():
    with pytest.raises(CoughPipelineError, match="3 distinct groups cannot fill 5 folds"):
        assign_folds(pd.Series(["a", "b", "c", "a"]), 5, seed=0)


def test_selected_folds_minus_one_means_all():
    assert selected_folds(load_resolved_config(HT_YAML, ["dataset.selected_folds=[-1]"])) == [0, 1, 2, 3, 4]
    assert selected_folds(load_resolved_config(HT_YAML, ["dataset.selected_folds=['2', '0']"])) == [0, 2]


def test_schedules_with_warmup():
    config = load_resolved_config(HT_YAML, ["training.epochs=4", "training.warmup_epochs=1", "training.learning_rate=1.0"])
    model = torch.nn.Linear(2, 1)
    optimizer = create_optimizer(model, config)
    scheduler = create_scheduler(optimizer, config, steps_per_epoch=10)
    rates = []
    for _ in range(40):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[0] == pytest.approx(0.1) and rates[9] == pytest.approx(1.0)  # linear warm-up
    assert rates[10] == pytest.approx(1.0) and rates[25] == pytest.approx(0.5, abs=0.06) and rates[39] < 0.01  # cosine


def test_differential_learning_rate_for_listed_layers():
    config = load_resolved_config(HT_YAML, [*TINY, "training.differential_learning_rate_layers=[backbone]",
                                            "training.differential_learning_rate=0.0001"])
    model = create_model(config)
    optimizer = create_optimizer(model, config)
    rates = sorted(group["lr"] for group in optimizer.param_groups)
    assert rates == [0.0001, 0.01]
    backbone = {id(p) for p in model.backbone.parameters()}
    slow = next(g for g in optimizer.param_groups if g["lr"] == 0.0001)
    assert {id(p) for p in slow["params"]} == backbone
    with pytest.raises(CoughPipelineError, match="match no parameter"):
        create_optimizer(model, load_resolved_config(HT_YAML, [*TINY, "training.differential_learning_rate_layers=[nope]"]))


def test_weight_decay_reaches_weights_only():
    config = load_resolved_config(HT_YAML, [*TINY, "architecture.pool=GeM", "training.weight_decay=0.05",
                                            "training.differential_learning_rate_layers=[backbone]"])
    model = create_model(config)
    optimizer = create_optimizer(model, config)
    decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert set(decay_of) == {id(p) for p in named.values()}  # every parameter, once
    assert decay_of[id(named["pool.gem_p"])] == 0.0
    for name, parameter in named.items():
        expected = 0.0 if parameter.ndim <= 1 or name.endswith(".bias") else 0.05
        assert decay_of[id(parameter)] == expected, name
    assert {g["weight_decay"] for g in optimizer.param_groups} == {0.0, 0.05}
    assert {g["lr"] for g in optimizer.param_groups} == {0.001, 0.01}  # the two rates, each split by decay
    # A decayed weight shrinks with a zero gradient; an undecayed norm scale and the GeM power stay put.
    before = {n: p.detach().clone() for n, p in named.items()}
    for parameter in named.values():
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    assert torch.equal(named["pool.gem_p"], before["pool.gem_p"])
    assert torch.equal(named["backbone.bn2.weight"], before["backbone.bn2.weight"])
    assert torch.linalg.norm(named["head.weight"]) < torch.linalg.norm(before["head.weight"])


def test_what_a_transformer_backbone_exempts_from_weight_decay_is_not_decayed():
    config = load_resolved_config(HT_YAML, [*TINY, "architecture.backbone=test_vit", "training.weight_decay=0.05"])
    model = create_model(config)
    decay_of = {id(p): g["weight_decay"] for g in create_optimizer(model, config).param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert named["backbone.pos_embed"].ndim == 3 and decay_of[id(named["backbone.pos_embed"])] == 0.0  # timm's list
    assert decay_of[id(named["backbone.cls_token"])] == 0.0
    assert decay_of[id(named["backbone.patch_embed.proj.weight"])] == 0.05


@pytest.mark.parametrize("name", ["MAE", "MSE", "RMSE", "Huber"])
def test_losses(name):
    loss = create_loss(name)(torch.tensor([[0.2], [0.9]]), torch.tensor([[0.0], [1.0]]))
    expected = {"MAE": 0.15, "MSE": 0.025, "RMSE": 0.025**0.5, "Huber": (0.1 * (0.2 - 0.05) + 0.5 * 0.1**2) / 2}
    assert float(loss) == pytest.approx(expected[name], rel=1e-3)


def test_length_buckets_cover_every_row_once():
    lengths = np.random.default_rng(0).integers(10, 900, size=103)
    sampler = LengthBucketBatchSampler(lengths, 8, train=True, drop_last=False, seed=1, pool_batches=4)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(103))
    spread = np.mean([np.ptp(lengths[b]) for b in batches if len(b) == 8])
    assert spread < 0.5 * np.ptp(lengths)  # similar lengths together: little padding
    sampler.epoch = 1
    assert [b for b in sampler] != batches  # a new order every epoch
    dropped = LengthBucketBatchSampler(lengths, 8, train=True, drop_last=True, seed=1)
    assert all(len(b) == 8 for b in dropped)


def test_inference_batches_hold_one_length_each():
    lengths = np.array([50, 40, 50, 40, 40, 30, 50, 50, 50, 40])
    batches = list(LengthBucketBatchSampler(lengths, 2, train=False, drop_last=True, seed=1))
    assert sorted(i for b in batches for i in b) == list(range(10))  # every row once, none dropped
    assert all(len(set(lengths[b])) == 1 and len(b) <= 2 for b in batches)  # never padded
    assert [int(lengths[b[0]]) for b in batches] == [30, 40, 40, 50, 50, 50]  # shortest first, in order


def test_a_tiny_training_run(tiny_run):
    model_dir = tiny_run["model"]
    info = json.loads((model_dir / "model.json").read_text())
    assert info["backbone"] == "test_efficientnet" and len(info["members"]) == 1
    assert (model_dir / info["members"][0]["weights"]).exists()
    predictions = pd.read_parquet(model_dir / "predictions.parquet")
    folds = pd.read_parquet(model_dir / "folds.parquet")
    assert len(folds) == 24 and set(folds["fold"]) == {0, 1, 2, 3, 4}
    assert set(predictions["id"]) == set(folds.loc[folds["fold"] == 0, "id"])
    assert predictions["pred_cough_detected"].between(0, 1).all()
    history = json.loads((model_dir / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2] and np.isfinite(history[-1]["validation_mae"])
    assert (model_dir / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "seed: 1234" in (model_dir / "config.yaml").read_text()
    members = load_members(model_dir)
    assert len(members) == 1 and not members[0].training


def test_the_same_seed_gives_the_same_model(tiny_run, tmp_path):
    again = train(tiny_run["features"], tmp_path / "again", tiny_run["config"])
    first = pd.read_parquet(tiny_run["model"] / "predictions.parquet")
    second = pd.read_parquet(again.predictions_path)
    np.testing.assert_allclose(first["pred_cough_detected"], second["pred_cough_detected"], atol=1e-6)


def test_pretrained_weights_absent_is_a_clear_error(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf"))
    monkeypatch.setenv("HOME", str(tmp_path))
    config = load_resolved_config(HT_YAML, [*TINY, "architecture.pretrained=true", "training.epochs=1"])
    with pytest.raises(CoughPipelineError, match="architecture.pretrained: no weights for 'test_efficientnet'.*HF_HUB_OFFLINE is set.*pretrained_weights"):
        train(tiny_run["features"], tmp_path / "model", config)


def test_pretrained_weights_from_a_file(tiny_run, tmp_path):
    """A three-channel checkpoint (as timm ships them) loads into the one-channel backbone."""
    import timm
    from safetensors.torch import save_file

    rgb = timm.create_model("test_efficientnet", pretrained=False, in_chans=3, num_classes=1000)
    save_file({k: v.contiguous() for k, v in rgb.state_dict().items()}, str(tmp_path / "weights.safetensors"))
    config = load_resolved_config(
        HT_YAML, [*TINY, "architecture.pretrained=true", f"architecture.pretrained_weights={tmp_path / 'weights.safetensors'}",
                  "training.epochs=1", "training.learning_rate=1e-12"],  # one epoch that leaves the loaded weights as they were
    )
    result = train(tiny_run["features"], tmp_path / "model", config)
    digest = hashlib.sha256((tmp_path / "weights.safetensors").read_bytes()).hexdigest()
    assert result.members[0]["pretrained_from"] == f"architecture.pretrained_weights {tmp_path / 'weights.safetensors'} sha256:{digest}"
    stem = next(k for k in rgb.state_dict() if k.endswith("conv_stem.weight"))
    trained = load_members(tmp_path / "model")[0].backbone.state_dict()[stem]
    torch.testing.assert_close(trained, rgb.state_dict()[stem].sum(dim=1, keepdim=True))


def test_dataset_normalization_statistics_come_from_the_training_rows(tiny_run, tmp_path):
    from coughreg.artifacts import shard_paths
    from coughreg.artifacts.shards import SpectrogramShardReader

    config = load_resolved_config(HT_YAML, [*TINY, "audio.spectrogram_normalization=Dataset", "training.epochs=1"])
    result = train(tiny_run["features"], tmp_path / "model", config)
    member = result.members[0]
    folds = pd.read_parquet(tmp_path / "model" / "folds.parquet")
    reader = SpectrogramShardReader(shard_paths(tiny_run["features"]))
    rows = [i for i, identifier in enumerate(reader.index["id"]) if identifier in set(folds.loc[folds["fold"] != 0, "id"])]
    values = np.concatenate([reader.spectrogram(i).astype(np.float64).ravel() for i in rows])
    assert member["normalization"]["mean"] == pytest.approx(values.mean(), rel=1e-4)
    assert member["normalization"]["std"] == pytest.approx(values.std(), rel=1e-3)
    model = load_members(tmp_path / "model")[0]
    assert float(model.normalizer.mean) == pytest.approx(values.mean(), rel=1e-4)  # stored with the model


def test_block_pools_read_each_row_group_once_per_epoch():
    rng = np.random.default_rng(3)
    blocks = np.repeat(np.arange(20), 32)  # 20 row groups of 32 rows
    lengths = rng.integers(100, 900, size=len(blocks))
    sampler = LengthBucketBatchSampler(lengths, 16, train=True, drop_last=False, seed=0, blocks=blocks, pool_blocks=4)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(len(blocks)))
    # reading in this order with a cache of 4 row groups touches each row group exactly once
    cache, reads = [], 0
    for batch in batches:
        for i in batch:
            if blocks[i] not in cache:
                reads += 1
                cache = (cache + [blocks[i]])[-4:]
    assert reads == 20


def test_a_training_clip_is_one_of_its_recording_chain_copies_with_the_asked_probability(tmp_path):
    import pickle

    from coughreg.artifacts.shards import SpectrogramShardWriter
    from coughreg.training.data import ChainViews, SpectrogramDataset

    ids = [f"rec{k}" for k in range(40)]
    originals, copies = tmp_path / "shard.parquet", tmp_path / "views.parquet"
    writer = SpectrogramShardWriter(originals, ["y"], None, {})
    for k, identifier in enumerate(ids):
        writer.add({"id": identifier, "y": 0.5}, np.full((4, 6), k, dtype=np.float32))
    writer.close()
    writer = SpectrogramShardWriter(copies, ["y"], None, {})
    for k, identifier in enumerate(ids):
        for view in (1, 2):
            writer.add({"id": identifier, "y": 0.5}, np.full((4, 6), 1000 * view + k, dtype=np.float32))
    writer.close()
    rows = np.arange(len(ids))

    def drawn(probability, epoch=0):
        dataset = SpectrogramDataset([originals], rows, np.zeros((len(ids), 1)), None, seed=3,
                                     views=ChainViews([copies], ids), view_probability=probability)
        dataset = pickle.loads(pickle.dumps(dataset))  # as a data loader worker gets it
        dataset.epoch = epoch
        return np.array([float(dataset[i][0][0, 0]) // 1000 for i in range(len(ids))])

    assert (drawn(0.0) == 0).all()  # as recorded
    assert set(drawn(1.0)) == {1.0, 2.0}  # always a copy, either of the two
    half = drawn(0.5)
    assert 0.25 < np.mean(half > 0) < 0.75
    np.testing.assert_array_equal(half, drawn(0.5))  # the same epoch draws the same (a resumed epoch)
    assert not np.array_equal(half, drawn(0.5, epoch=1))  # another epoch draws anew


def test_a_paired_clip_comes_with_another_version_of_itself_cropped_alike(tmp_path):
    from coughreg.artifacts.shards import SpectrogramShardWriter
    from coughreg.training.data import ChainViews, SpectrogramDataset, collate_spectrograms

    ids = [f"rec{k}" for k in range(30)]
    originals, copies = tmp_path / "shard.parquet", tmp_path / "views.parquet"
    time_axis = np.arange(40, dtype=np.float32)  # each frame holds its own number: a crop shows where it starts
    writer = SpectrogramShardWriter(originals, ["y"], None, {})
    for k, identifier in enumerate(ids):
        writer.add({"id": identifier, "y": 0.5}, np.broadcast_to(time_axis, (4, 40)).copy())
    writer.close()
    writer = SpectrogramShardWriter(copies, ["y"], None, {})
    for k, identifier in enumerate(ids[:-1]):  # the last recording has no copies
        for view in (1, 2):
            writer.add({"id": identifier, "y": 0.5}, np.broadcast_to(1000 * view + time_axis[:38], (4, 38)).copy())
    writer.close()
    dataset = SpectrogramDataset([originals], np.arange(len(ids)), np.full((len(ids), 1), 0.5), 10, seed=3,
                                 views=ChainViews([copies], ids), pairs=True)
    chosen = set()
    for i in range(len(ids)):
        (clip, partner), label, index = dataset[i]
        first, second = float(clip[0, 0]), float(partner[0, 0])
        assert clip.shape == partner.shape == (4, 10) and index == i
        assert first < 1000  # first the recording as recorded...
        if i == len(ids) - 1:
            assert first == second  # ...which is its own partner when it has no copies
            continue
        chosen.add(second // 1000)  # ...then one of its copies
        assert second % 1000 == first  # the same stretch of time (the copies are 2 frames shorter)
    assert chosen == {1, 2}

    def copies_drawn(epoch):
        dataset.epoch = epoch
        return [float(dataset[i][0][1][0, 0]) // 1000 for i in range(len(ids) - 1)]

    assert copies_drawn(0) == copies_drawn(0) and copies_drawn(0) != copies_drawn(1)  # resumable, new every epoch
    dataset.epoch = 0
    # a copy of a long recording covers its start only; a codec's copy may outlast a short recording
    long_copy = tmp_path / "long.parquet"
    writer = SpectrogramShardWriter(long_copy, ["y"], None, {})
    writer.add({"id": "rec0", "y": 0.5}, np.broadcast_to(1000 + time_axis[:12], (4, 12)).copy())
    writer.close()
    short = SpectrogramDataset([originals], np.arange(1), np.full((1, 1), 0.5), 10, seed=3,
                               views=ChainViews([long_copy], ids), pairs=True)
    for epoch in range(6):
        short.epoch = epoch
        (clip, partner), _, _ = short[0]
        assert clip.shape == partner.shape == (4, 10) and float(partner[0, 0]) % 1000 == float(clip[0, 0]) <= 2
    padded, lengths, labels, indices = collate_spectrograms([dataset[i] for i in range(4)])
    assert padded.shape == (8, 4, 10) and labels.shape == (8, 1) and indices.tolist() == [0, 1, 2, 3]
    torch.testing.assert_close(padded[4], dataset[0][0][1])  # the second versions follow the clips


def test_consistency_needs_copies_and_neither_chosen_copies_nor_mixing():
    with pytest.raises(CoughPipelineError, match="recording_chain_consistency 1 needs recording_chain_views"):
        load_resolved_config(HT_YAML, ["augmentation.recording_chain_consistency=1"])
    with pytest.raises(CoughPipelineError, match="recording_chain_probability 0.5 would have nothing to choose"):
        load_resolved_config(HT_YAML, ["augmentation.recording_chain_consistency=1", "augmentation.recording_chain_views=1",
                                       "augmentation.recording_chain_probability=0.5"])
    with pytest.raises(CoughPipelineError, match="mix_audio Mixup would mix the pairs apart"):
        load_resolved_config(HT_YAML, ["augmentation.recording_chain_consistency=1", "augmentation.recording_chain_views=1",
                                       "augmentation.mix_audio=Mixup"])


def test_the_pair_term_draws_the_copies_to_their_recordings_and_not_the_reverse():
    from coughreg.training.loop import pair_disagreement

    predictions = torch.tensor([[0.2], [0.9], [0.5], [0.6]], requires_grad=True)  # two recordings, then their copies
    disagreement = pair_disagreement(predictions)
    assert disagreement.item() == pytest.approx((0.3 + 0.3) / 2)
    disagreement.backward()
    torch.testing.assert_close(predictions.grad, torch.tensor([[0.0], [0.0], [0.5], [-0.5]]))
