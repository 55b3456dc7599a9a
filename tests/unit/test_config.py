"""The experiment config: the user's Hydrogen Torch YAML loads unchanged; mistakes are named."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import yaml

from coughreg.config.loading import (
    CONFIG_FILE_NAME,
    DEFAULT_CONFIG,
    load_config,
    load_resolved_config,
    resolve_config,
    save_config,
)
from coughreg.runtime.errors import ConfigError
from tests.conftest import HT_YAML, PROJECT


def _leaves(node, prefix=""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, f"{prefix}{key}.")
    else:
        yield prefix.rstrip("."), node


def test_the_project_config_is_a_verbatim_copy_of_the_users_file():
    assert DEFAULT_CONFIG.read_bytes() == HT_YAML.read_bytes()


def test_every_key_of_the_hydrogen_torch_file_is_read_with_its_value():
    raw = yaml.safe_load(HT_YAML.read_text())
    loaded = load_config(HT_YAML).to_dict()
    for key, value in _leaves(raw):
        node = loaded
        for part in key.split("."):
            node = node[part]
        expected = None if value == "None" else value
        if isinstance(expected, (int, float)) and not isinstance(expected, bool):
            assert node == pytest.approx(expected), key
        else:
            assert node == expected, key


def test_hydrogen_torch_values_mean_what_they_say():
    config = load_config(HT_YAML)
    assert config.architecture.backbone == "resnet50"
    assert config.dataset.label_columns == ["cough_detected"]
    assert config.dataset.selected_folds == ["0"]
    assert config.dataset.number_of_folds == 5
    assert config.dataset.test_dataframe is None  # the string 'None' means null
    assert config.logging.logger is None
    assert config.audio.spectrogram_normalization == "No"  # 'No' stays a string
    assert config.environment.seed == -1


def test_resolution_keeps_the_random_seed_for_training_and_marks_inert_keys(caplog):
    with caplog.at_level(logging.WARNING, logger="coughreg.config"):
        config = load_resolved_config(HT_YAML)
    assert config.environment.seed == -1 and config.resolved.seed_drawn is False  # drawn by the train step, at run time
    assert config.resolved.inert["logging.neptune_project"] == "logger is None"
    assert "augmentation.mix_concentration" in config.resolved.inert
    assert "training.differential_learning_rate" in config.resolved.inert
    warnings = [r for r in caplog.records if "no effect" in r.getMessage()]
    assert len(warnings) == 1 and "logging.neptune_project" in warnings[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="coughreg.config"):
        again = resolve_config(config)  # resolving a resolved config changes nothing and warns no more
    assert again.environment.seed == config.environment.seed
    assert not [r for r in caplog.records if "no effect" in r.getMessage()]


def test_the_saved_resolved_config_loads_back_identical(tmp_path):
    config = load_resolved_config(HT_YAML, ["training.epochs=3"])
    path = save_config(config, tmp_path)
    assert path.name == CONFIG_FILE_NAME
    reloaded = load_resolved_config(path)
    assert reloaded.environment.seed == config.environment.seed
    assert reloaded.training.epochs == 3
    assert reloaded.model_dump(exclude={"resolved"}) == config.model_dump(exclude={"resolved"})
    assert reloaded.resolved.overrides == ["training.epochs=3"]


def test_overrides_parse_yaml_values():
    config = load_config(
        HT_YAML, ["training.batch_size=32", "dataset.selected_folds=[0, 2]", "training.drop_last_batch=false",
                  "architecture.backbone=resnet18", "dataset.test_dataframe=None"],
    )
    assert config.training.batch_size == 32
    assert config.dataset.selected_folds == ["0", "2"]
    assert config.training.drop_last_batch is False
    assert config.architecture.backbone == "resnet18"
    assert config.dataset.test_dataframe is None


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("training.epoch=3", "training.epoch' (did you mean 'training.epochs'?)"),
        ("audio.hop_size=-1", "audio.hop_size"),
        ("training.batch_size=many", "training.batch_size"),
        ("training.optimizer=Adagrad", "training.optimizer"),
        ("audio.maximum_frequency=30000", "Nyquist"),
        ("dataset.selected_folds=[7]", "selected_folds"),
        ("prediction.inference_chunk_seconds=900", "inference_chunk_seconds"),
        ("nonsense", "expected section.key=value"),
    ],
)
def test_bad_values_fail_naming_the_key_and_the_file(override, named):
    with pytest.raises(ConfigError) as error:
        load_config(HT_YAML, [override])
    assert named in str(error.value)
    assert str(HT_YAML) in str(error.value)


def test_an_unknown_key_in_the_file_is_named(tmp_path):
    text = HT_YAML.read_text().replace("    hop_size: 512", "    hop_size: 512\n    hop_sise: 256")
    path = tmp_path / "typo.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"unknown key 'audio.hop_sise' \(did you mean 'audio.hop_size'\?\)") as error:
        load_config(path)
    assert str(path) in str(error.value)


def test_a_missing_or_broken_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nowhere.yaml: config file not found"):
        load_config(tmp_path / "nowhere.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("audio: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        load_config(broken)


def test_a_short_project_config_gets_every_default(tmp_path):
    path = tmp_path / "short.yaml"
    path.write_text("architecture: {backbone: resnet18, pretrained: false}\ntraining: {epochs: 1}\n")
    config = load_resolved_config(path)
    assert config.architecture.backbone == "resnet18"
    assert config.audio.sample_rate == 48000 and config.audio.mel_frequency_bins == 128
    assert config.training.loss_function == "MAE"


def _cli(*args):
    return subprocess.run([sys.executable, "pipeline.py", *args], cwd=PROJECT, capture_output=True, text=True, timeout=120)


def test_cli_prints_the_resolved_config_and_names_bad_keys(tmp_path):
    done = _cli("config", "--set", "environment.seed=7")
    assert done.returncode == 0, done.stderr
    printed = yaml.safe_load(done.stdout)
    assert printed["environment"]["seed"] == 7
    assert printed["resolved"]["inert"]["logging.neptune_project"] == "logger is None"
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  learning_rat: 0.1\n")
    failed = _cli("config", "--config", str(bad))
    assert failed.returncode == 2
    assert "unknown key 'training.learning_rat'" in failed.stderr and str(bad) in failed.stderr


@pytest.mark.parametrize("name", sorted(p.name for p in (PROJECT / "configs").glob("*.yaml")))
def test_every_shipped_config_reads(name):
    config = load_resolved_config(PROJECT / "configs" / name)
    if name in ("demo.yaml", "robust.yaml"):  # both train for the recording chain: copies, per-clip normalisation, GeM
        assert config.augmentation.recording_chain_views > 0
        assert config.audio.spectrogram_normalization == "Clip"
        assert config.architecture.pool == "GeM"
    if name == "robust.yaml":  # the full recipe: every clip paired with one of its copies
        assert config.augmentation.recording_chain_consistency > 0


def test_a_step_without_a_config_file_takes_the_default_configs_keys_it_owns():
    """``pipeline.py step X`` with no ``--config`` starts where run-local, compile and submit start: each step takes
    the default config's keys it owns; the keys of earlier steps still come from its input artifact."""
    from coughreg.config.given import Given
    from coughreg.config.loading import DEFAULT_CONFIG

    given = Given.command_line(None, ["training.epochs=3"])
    assert given.described == "coughvid_ht.yaml (the default config) and --set"
    ingest = given.build("ingest", None)
    assert ingest.dataset.group_fold_column == "datetime"  # the use case's, not the schema's default (none)
    assert ingest.resolved.source == f"{DEFAULT_CONFIG} and --set"
    upstream = load_resolved_config(DEFAULT_CONFIG, ["audio.hop_size=256"])  # features made with another hop
    train = given.build("train", upstream)  # the default's hop (512) is not the train step's to give: no disagreement
    assert train.audio.hop_size == 256 and train.training.epochs == 3
    assert train.architecture.backbone == load_resolved_config(DEFAULT_CONFIG).architecture.backbone
    with pytest.raises(ConfigError, match="--set says 512"):  # a key given by the user is still checked against it
        Given.command_line(None, ["audio.hop_size=512"]).build("train", upstream)
    assert not Given.command_line(HT_YAML, []).defaults  # a file of the user's replaces the default
    assert not Given.parameter("train_config", "{}").defaults  # a pipeline task takes its parameter only
    assert Given.command_line(None).with_keys({"training": {"epochs": 5}}).build("train", upstream).training.epochs == 5
