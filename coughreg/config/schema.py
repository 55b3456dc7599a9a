"""The experiment config's schema: the user's Hydrogen Torch YAML, key by key, validated once.

Every key of a Hydrogen Torch experiment file is a field here, with the use case's value as its
default, so a short project YAML (``configs/demo.yaml``) and the full HT file load the same way.
Two sections are the project's own (``ingest``, ``features``); HT files simply do not have them.
``seed: -1`` stays -1 here: the train step draws the seed when it runs and records it
(``coughreg.training.run_seed``), so compiling a config twice gives the same pipeline.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from coughreg.io.storage import checked_uri
from coughreg.runtime.errors import ConfigError, StorageError


def _none_strings_to_null(data: Any) -> Any:
    """Hydrogen Torch writes null as the string 'None'."""
    if isinstance(data, dict):
        return {k: _none_strings_to_null(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_none_strings_to_null(v) for v in data]
    if isinstance(data, str) and data.strip() == "None":
        return None
    return data


class _Section(BaseModel):
    # Unknown keys are errors: a typo must never be silently ignored.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _no_credentials(value: str) -> str:
    """A location key's value passes ``coughreg.io.storage.checked_uri`` (the key is named by the error's place)."""
    try:
        return checked_uri(value)
    except StorageError as exc:
        raise ValueError(str(exc)) from None


# A key that names a place (a file, a folder, a URI): written into step configs and the compiled pipeline,
# so credentials in it are refused here, once, whichever way the key arrives (file, --set, pipeline parameter).
Location = Annotated[str, AfterValidator(_no_credentials)]


class ArchitectureConfig(_Section):
    backbone: str = Field("resnet50", description="timm model name; the network takes one input channel.")
    dropout: float = Field(0.2, ge=0.0, lt=1.0, description="Dropout before the regression head.")
    pool: Literal["Average", "Max", "GeM"] = Field("Average", description="Global pooling over mels and frames.")
    pretrained: bool = Field(
        True, description="Start from pretrained backbone weights: pretrained_weights, the local Hugging Face cache, "
        "or timm's download from the hub (HF_ENDPOINT, HF_HUB_OFFLINE, HF_TOKEN)."
    )
    pretrained_weights: Location | None = Field(
        None, description="Project key: where pretrained weights are: a file, a Hugging Face cache folder or an s3:// URI."
    )
    pretrained_sha256: str | None = Field(
        None, pattern=r"^[0-9a-f]{64}$",
        description="Project key: the SHA-256 the pretrained weights must have; weights that differ are refused "
        "(the pipeline's preflight step fills it in).",
    )


class AudioConfig(_Section):
    audio_parameters: Literal["Auto", "Manual"] = Field(
        "Auto", description="'Auto': the values below are used exactly as given (nothing is inferred from data)."
    )
    hop_size: int = Field(512, gt=0, description="STFT hop in samples at sample_rate.")
    maximum_frequency: float = Field(24000, gt=0, description="Highest mel filter edge, Hz (at most sample_rate/2).")
    mel_frequency_bins: int = Field(128, gt=0, le=1024, description="Number of mel bands.")
    minimum_frequency: float = Field(50, ge=0, description="Lowest mel filter edge, Hz.")
    sample_rate: int = Field(48000, ge=1000, le=384000, description="Audio is resampled to this rate, Hz.")
    spectrogram_normalization: Literal["No", "Clip", "Dataset"] = Field(
        "No",
        description="'No': log-mel as is; 'Clip': each clip in dB relative to its loudest cell, 80 dB of range to "
        "[-2, 2] (digital silence and cells further down to -2, so gain, gates and codecs' empty bands move the "
        "clip little); "
        "'Dataset': mean/std of the training rows, stored with the model.",
    )
    stft_window_size: int = Field(2048, gt=0, description="STFT window (and FFT) length in samples.")
    training_chunk_seconds: float = Field(60, gt=0, description="Training crops longer clips to this length.")

    @model_validator(mode="after")
    def _consistent(self) -> AudioConfig:
        nyquist = self.sample_rate / 2
        if self.maximum_frequency > nyquist:
            raise ValueError(
                f"maximum_frequency {self.maximum_frequency:g} Hz is above the Nyquist frequency "
                f"{nyquist:g} Hz of sample_rate {self.sample_rate}"
            )
        if self.minimum_frequency >= self.maximum_frequency:
            raise ValueError(
                f"minimum_frequency {self.minimum_frequency:g} must be below maximum_frequency {self.maximum_frequency:g}"
            )
        if self.hop_size > self.stft_window_size:
            raise ValueError(f"hop_size {self.hop_size} is larger than stft_window_size {self.stft_window_size}")
        return self


class AugmentationConfig(_Section):
    mix_audio: Literal["Disabled", "Mixup", "Cutmix"] = Field("Disabled", description="Mix two clips of a batch.")
    mix_concentration: float = Field(1.0, gt=0, description="Beta(c, c) concentration of the mixing ratio.")
    mix_iterations: int = Field(1, ge=1, description="How many clips are mixed into each one.")
    mix_probability: float = Field(1.0, ge=0, le=1, description="Probability that a batch is mixed.")
    mix_target: Literal["Ratio", "Max"] = Field(
        "Ratio", description="'Ratio': labels mixed like the audio; 'Max': the larger label."
    )
    gain_db: float = Field(
        0.0, ge=0, le=60, description="Project key: each training clip louder or quieter by up to this many dB (0: off)."
    )
    lowpass_probability: float = Field(
        0.0, ge=0, le=1,
        description="Project key: probability that a training clip loses the bands above a random cut-off "
        "between 4 kHz and the top band (band-limited codecs and microphones; 0: off).",
    )
    frequency_masks: int = Field(0, ge=0, description="Project key: SpecAugment masks over mel bands per clip (0: off).")
    frequency_mask_bins: int = Field(0, ge=0, description="Project key: widest frequency mask, in mel bands.")
    time_masks: int = Field(0, ge=0, description="Project key: SpecAugment masks over time per clip (0: off).")
    time_mask_frames: int = Field(0, ge=0, description="Project key: widest time mask, in frames.")
    recording_chain_views: int = Field(
        0, ge=0, le=8,
        description="Project key: for every training recording, the features step also stores this many copies passed "
        "through a random recording chain (knock, gain, browser noise gate, low-pass, Opus or MP3 re-encoding; "
        "coughreg/audio/recording_chain.py, at most the first 60 s); 0: off.",
    )
    recording_chain_probability: float = Field(
        0.0, ge=0, le=1,
        description="Project key: probability that a training clip is taken, in an epoch, from one of its "
        "recording-chain copies instead of as recorded (needs recording_chain_views).",
    )
    recording_chain_consistency: float = Field(
        0.0, ge=0, le=100,
        description="Project key: weight of a consistency term. Every training clip is trained as recorded and as "
        "one of its recording-chain copies, side by side in its batch, and this weight times the mean absolute "
        "difference between the copy's score and the recording's (the recording's held fixed) is added to the "
        "loss, so the model learns to give a recording and its copies one score. Doubles the work of a step "
        "(needs recording_chain_views; instead of recording_chain_probability; not with mix_audio); 0: off.",
    )

    @model_validator(mode="after")
    def _chain_views_exist(self) -> AugmentationConfig:
        for key in ("recording_chain_probability", "recording_chain_consistency"):
            if getattr(self, key) > 0 and self.recording_chain_views == 0:
                raise ValueError(
                    f"{key} {getattr(self, key):g} needs recording_chain_views of 1 or more (the copies it draws from)"
                )
        if self.recording_chain_consistency > 0 and self.recording_chain_probability > 0:
            raise ValueError(
                f"recording_chain_consistency {self.recording_chain_consistency:g} trains every clip as recorded and "
                f"as one of its copies; recording_chain_probability {self.recording_chain_probability:g} would have "
                "nothing to choose: set one of them"
            )
        if self.recording_chain_consistency > 0 and self.mix_audio != "Disabled":
            raise ValueError(
                f"recording_chain_consistency {self.recording_chain_consistency:g} pairs each clip with its own copy in "
                f"the batch; mix_audio {self.mix_audio} would mix the pairs apart: use one of them"
            )
        return self


class DatasetConfig(_Section):
    audio_column: str = Field("filename", description="Column with the audio file name, relative to data_folder.")
    data_folder: Location | None = Field(None, description="Folder of the audio files, relative to the data root.")
    data_folder_test: Location | None = Field(None, description="Folder of the test table's audio files.")
    data_sample: float = Field(1.0, gt=0, le=1, description="Fraction of the data used (subsampling).")
    data_sample_choice: list[Literal["Train", "Validation"]] = Field(
        default_factory=lambda: ["Train", "Validation"], description="Which splits data_sample applies to."
    )
    group_fold_column: str | None = Field(None, description="Rows sharing this value stay in one fold; none: each recording is a group of its own.")
    group_fold_truncate: Literal["hour", "day", "week", "month"] | None = Field(
        None,
        description="Project key: group on the group column's time truncated to this unit (raw COUGHVID datetimes "
        "are unique per recording, so grouping on them is plain k-fold; 'day' keeps each day in one fold).",
    )
    label_columns: list[str] = Field(
        default_factory=lambda: ["cough_detected"], min_length=1, description="Regression targets."
    )
    selected_folds: list[str] = Field(default_factory=lambda: ["0"], min_length=1, description="Folds trained; -1 = all.")
    test_dataframe: Location | None = Field(None, description="A table scored by the exported model.")
    train_dataframe: Location | None = Field(None, description="The training table (CSV), relative to the data root.")
    unlabeled_dataframe: Location | None = Field(None, description="Unlabeled table: not used by this product.")
    validation_dataframe: Location | None = Field(None, description="A custom holdout table.")
    validation_size: float = Field(0.2, gt=0, lt=1, description="Validation share; 1/validation_size folds.")
    validation_strategy: Literal["kfold", "custom", "automatic"] = Field("kfold", description="How validation rows are chosen.")

    @field_validator("selected_folds", mode="before")
    @classmethod
    def _folds_as_text(cls, value: Any) -> Any:
        if isinstance(value, (int, str)):
            value = [value]
        return [str(v) for v in value] if isinstance(value, list) else value

    @model_validator(mode="after")
    def _folds_exist(self) -> DatasetConfig:
        n_folds = self.number_of_folds
        for fold in self.selected_folds:
            if fold == "-1":
                continue
            if not fold.lstrip("-").isdigit() or not 0 <= int(fold) < n_folds:
                raise ValueError(
                    f"selected_folds: '{fold}' is not a fold of {n_folds} (validation_size {self.validation_size}); "
                    f"use 0..{n_folds - 1} or -1 for all"
                )
        return self

    @property
    def number_of_folds(self) -> int:
        return max(2, round(1 / self.validation_size))


class EnvironmentConfig(_Section):
    gpus: list[str] = Field(default_factory=lambda: ["0"], description="GPU ids; the cluster requests this many GPUs.")
    mixed_precision_inference: bool = Field(
        False, description="Autocast at inference on CUDA: validation in training, and evaluation on a GPU (the exported scorer runs in fp32)."
    )
    mixed_precision_training: bool = Field(
        True, description="Autocast in training: bf16 (fp16 without bf16) on CUDA, bf16 on CPUs with native bf16 units."
    )
    number_of_seeds_per_run: int = Field(1, ge=1, description="Models trained with different seeds and averaged.")
    number_of_workers: int = Field(4, ge=0, description="Data loader workers (how training runs: not part of its cache key).")
    seed: int = Field(-1, ge=-1, description="Random seed; -1: the train step draws one when it runs and records it.")

    @field_validator("gpus", mode="before")
    @classmethod
    def _gpus_as_text(cls, value: Any) -> Any:
        if value is None:
            return []
        if isinstance(value, (int, str)):
            value = [value]
        return [str(v) for v in value] if isinstance(value, list) else value


class LoggingConfig(_Section):
    # An MLflow experiment or Neptune project named 2024 is a name, not a number.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True)

    log_grad_norm: bool = Field(False, description="Log the gradient norm every step.")
    logger: Literal["Neptune", "MLflow"] | None = Field(
        None,
        description="Experiment tracker the evaluate and export steps log to (parameters, per-epoch curves, final "
        "metrics, the report, the scorer): 'Neptune' (NEPTUNE_API_TOKEN, NEPTUNE_PROJECT, NEPTUNE_MODE, default async), "
        "'MLflow' (project value: the server at MLFLOW_TRACKING_URI, with MLFLOW_TRACKING_USERNAME and "
        "MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN); None: KFP metrics and the report only. Credentials come "
        "from the environment (the cluster.tracking_secret Secret), never from the config.",
    )
    neptune_project: str = Field(
        "", description="Neptune project (workspace/project) with logger: Neptune; empty: NEPTUNE_PROJECT from the environment."
    )
    mlflow_experiment: str | None = Field(
        None, min_length=1,
        description="Project key: the MLflow experiment runs are logged to with logger: MLflow; None: experiment_name.",
    )
    number_of_audios: int = Field(8, ge=0, description="How many recordings the report shows.")


class PredictionConfig(_Section):
    inference_chunk_method: Literal["Fix"] = Field("Fix", description="Long audio is split into fixed chunks.")
    inference_chunk_seconds: float = Field(60, gt=0, description="Chunk length at inference; chunk scores are averaged.")
    max_inference_chunk_seconds: float = Field(600, gt=0, description="Audio beyond this length is not scored.")
    metric: Literal["MAE", "MSE", "RMSE", "R2"] = Field("MAE", description="The metric that ranks models.")
    max_mae_to_median_baseline: float = Field(
        1.0, gt=0, description="Project key, the quality gate: the scorer is exported (and the test table scored) only when "
        "validation MAE / median-baseline MAE is at most this; 1.0: the model must beat predicting the median.",
    )
    robustness_recordings: int = Field(
        300, ge=0,
        description="Project key: validation recordings that evaluation also scores through each recording-chain "
        "transform (quieter, low-passed, noise-gated, re-encoded, a knock) to report how far scores move; 0: not measured.",
    )

    @model_validator(mode="after")
    def _chunk_fits(self) -> PredictionConfig:
        if self.inference_chunk_seconds > self.max_inference_chunk_seconds:
            raise ValueError(
                f"inference_chunk_seconds {self.inference_chunk_seconds:g} exceeds "
                f"max_inference_chunk_seconds {self.max_inference_chunk_seconds:g}"
            )
        return self


class TrainingConfig(_Section):
    automatically_adjust_batch_size: bool = Field(False, description="Halve the batch on out-of-memory and retry.")
    batch_size: int = Field(13, ge=1, description="Clips per optimizer micro-batch.")
    build_scoring_pipelines: bool = Field(True, description="Export the scoring pipeline.")
    calculate_train_metric: bool = Field(False, description="Also compute the metric on the training rows.")
    differential_learning_rate: float = Field(0.001, gt=0, description="Learning rate of the listed layers.")
    differential_learning_rate_layers: list[str] = Field(default_factory=list, description="Layers with their own rate.")
    drop_last_batch: bool = Field(True, description="Drop the last, incomplete training batch.")
    ema_decay: float = Field(
        0.0, ge=0, lt=1,
        description="Project key: validate and keep an exponential moving average of the weights with this "
        "decay per optimizer step (e.g. 0.998; 0: off).",
    )
    epochs: int = Field(2, ge=1, description="Training epochs (at least 1: a model that never trained is no model).")
    evaluate_before_training: bool = Field(False, description="Validate once before the first step.")
    evaluation_epochs: float = Field(1, gt=0, description="Validate every this many epochs.")
    grad_accumulation: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    gradient_clip: float = Field(0.0, ge=0, description="Clip the gradient norm; 0 = off.")
    learning_rate: float = Field(0.01, gt=0, description="Peak learning rate.")
    loss_function: Literal["MAE", "MSE", "RMSE", "Huber"] = Field("MAE", description="Regression loss.")
    optimizer: Literal["AdamW", "Adam", "SGD"] = Field("AdamW", description="Optimizer.")
    run_interpretations: bool = Field(True, description="Explain predictions in the report.")
    save_best_checkpoint: bool = Field(False, description="Keep the best validation epoch instead of the last.")
    schedule: Literal["Cosine", "Linear", "Constant"] = Field("Cosine", description="Learning-rate schedule.")
    train_validation_data: bool = Field(False, description="Train the final model on train and validation rows.")
    warmup_epochs: float = Field(0, ge=0, description="Linear warm-up length in epochs.")
    weight_decay: float = Field(
        0.0, ge=0, description="Weight decay of the weights (biases and 1-D parameters such as norms are not decayed)."
    )


class IngestConfig(_Section):
    """Project section (not in Hydrogen Torch files): what ingestion accepts."""

    min_duration_seconds: float = Field(0.1, ge=0, description="Shorter recordings are rejected.")
    max_invalid_fraction: float = Field(
        0.5, ge=0, le=1, description="Fail when more than this share of present recordings is unusable."
    )
    label_min: float = Field(0.0, description="Labels below this are rejected.")
    label_max: float = Field(1.0, description="Labels above this are rejected.")
    max_archive_bytes: int = Field(200 * 2**30, gt=0, description="Refuse archives that unpack to more than this.")
    max_archive_files: int = Field(2_000_000, gt=0, description="Refuse archives with more members than this.")
    max_compression_ratio: float = Field(200.0, gt=1, description="Refuse members compressed more than this (zip bombs).")
    retry_budget_seconds: float = Field(
        120.0, ge=0, description="S3 failing for longer than this in a row fails the step naming the URI; shorter outages "
        "are waited out, and the parts of a download that arrived whole are kept for a next run.",
    )


class FeaturesConfig(_Section):
    """Project section (not in Hydrogen Torch files): how spectrogram shards are written."""

    shard_rows: int = Field(512, ge=1, description="Recordings per Parquet shard.")
    row_group_rows: int = Field(32, ge=1, description="Recordings per Parquet row group (the unit of a streaming read).")
    workers: int = Field(0, ge=0, description="Worker processes; 0 = one per CPU core (not part of the cache key).")


class Toleration(_Section):
    key: str = "nvidia.com/gpu"
    operator: Literal["Equal", "Exists"] = "Exists"
    value: str | None = None
    effect: Literal["NoExecute", "NoSchedule", "PreferNoSchedule"] | None = "NoSchedule"


class ClusterConfig(_Section):
    """Project section (not in Hydrogen Torch files): how the steps run on Kubernetes."""

    s3_secret: str = Field("coughreg-s3", description="Secret whose AWS_* keys reach the steps that read S3, as env.")
    gpu_node_selector: dict[str, str] = Field(default_factory=dict, description="Node labels the training pod needs.")
    gpu_tolerations: list[Toleration] = Field(default_factory=lambda: [Toleration()], description="Taints training tolerates.")
    retries: int = Field(3, ge=0, description="Retries (with backoff) of the steps that touch the network or a GPU.")
    checkpoint_uri: Location | None = Field(
        None,
        description="s3:// prefix (or folder) where training also keeps its per-epoch checkpoints, so a retried "
        "pod or a preempted node resumes where the last one stopped; None: only inside the model folder.",
    )
    cache: dict[Literal["ingest", "features", "train", "evaluate", "export", "score"], bool] = Field(
        default_factory=dict, description="Per-step caching; a step not named is cached."
    )
    cpu_request: str = Field("2", description="CPU request of the CPU steps.")
    memory_request: str = Field("4Gi", description="Memory request of the CPU steps.")
    features_cpu_request: str = Field("4", description="CPU request of each feature part (one process per core).")
    train_cpu_request: str = Field("8", description="CPU request of training (data loader workers).")
    train_memory_request: str = Field("32Gi", description="Memory request of training.")
    shm_size: str = Field(
        "4Gi", description="Memory-backed /dev/shm of the training pod (data loader workers hand batches over in it; "
        "Kubernetes gives 64Mi otherwise)."
    )
    scratch_size: str = Field(
        "50Gi", description="Ephemeral volume for what ingest downloads and unpacks (a PVC made with the pod, deleted with it)."
    )
    scratch_storage_class: str | None = Field(None, description="Storage class of the scratch volume; None: the cluster's default.")
    timeouts: dict[Literal["preflight", "ingest", "features", "train", "evaluate", "export", "score"], int] = Field(
        default_factory=lambda: {"preflight": 1800, "ingest": 6 * 3600, "features": 6 * 3600, "train": 72 * 3600,
                                 "evaluate": 2 * 3600, "export": 3600, "score": 6 * 3600},
        description="Seconds each step's pod may run (activeDeadlineSeconds); a step not named has no limit.",
    )
    tracking_secret: str = Field(
        "coughreg-tracking", description="Optional Secret whose MLFLOW_TRACKING_URI, MLFLOW_TRACKING_USERNAME, "
        "MLFLOW_TRACKING_PASSWORD, MLFLOW_TRACKING_TOKEN, NEPTUNE_API_TOKEN, NEPTUNE_PROJECT and NEPTUNE_MODE keys reach "
        "the preflight, evaluate and export steps, as env (the experiment tracker of logging.logger)."
    )
    hf_secret: str = Field(
        "coughreg-hf", description="Optional Secret whose HF_ENDPOINT, HF_TOKEN and HF_HUB_OFFLINE keys reach the "
        "preflight step, as env (a hub mirror, a token for private weights)."
    )
    weights_uri: Location | None = Field(
        None, description="Where the preflight step keeps fetched pretrained weights by SHA-256 (s3:// or a folder); "
        "None: weights/ beside the runs in the pipeline root.",
    )


class ResolvedInfo(_Section):
    """Written by resolution, never by the user."""

    source: str = ""
    seed_drawn: bool = False
    overrides: list[str] = Field(default_factory=list)
    inert: dict[str, str] = Field(default_factory=dict)


class ExperimentConfig(_Section):
    architecture: ArchitectureConfig = Field(default_factory=ArchitectureConfig)
    audio: AudioConfig = Field(default_factory=AudioConfig)
    augmentation: AugmentationConfig = Field(default_factory=AugmentationConfig)
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    environment: EnvironmentConfig = Field(default_factory=EnvironmentConfig)
    experiment_name: str = Field("experiment", min_length=1)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    prediction: PredictionConfig = Field(default_factory=PredictionConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    features: FeaturesConfig = Field(default_factory=FeaturesConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    resolved: ResolvedInfo | None = None

    @model_validator(mode="before")
    @classmethod
    def _none_strings(cls, data: Any) -> Any:
        return _none_strings_to_null(data)

    @property
    def seed(self) -> int:
        if self.environment.seed < 0:
            raise ConfigError("environment.seed is -1: the train step draws it (coughreg.training.run_seed)")
        return self.environment.seed

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=False)
