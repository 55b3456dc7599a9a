"""The optimisation factories (timm's ``train.py`` style): loss, optimizer, schedule, precision, device."""

from __future__ import annotations

import fnmatch
import logging
import math

import torch
from torch import nn

from coughreg.config.schema import ExperimentConfig
from coughreg.runtime.errors import CoughPipelineError
from coughreg.runtime.resources import gpus_requested
from coughreg.training.distributed import distributed_context

log = logging.getLogger(__name__)

# The layout of the optimizer's parameter groups; a checkpoint's optimizer state fits only its own layout.
# 3: weights decayed; biases, 1-D parameters and the backbone's no_weight_decay() patterns not;
# 2: biases and 1-D parameters not; 1: one group per learning rate, all decayed.
PARAMETER_GROUPS_VERSION = 3


def create_loss(name: str) -> nn.Module:
    if name == "MAE":
        return nn.L1Loss()
    if name == "MSE":
        return nn.MSELoss()
    if name == "Huber":
        return nn.HuberLoss(delta=0.1)  # labels live in 0..1: quadratic only for small errors
    if name == "RMSE":

        class RMSELoss(nn.Module):
            def forward(self, prediction, target):
                return torch.sqrt(nn.functional.mse_loss(prediction, target) + 1e-8)

        return RMSELoss()
    raise CoughPipelineError(f"training.loss_function: unknown loss {name!r}")


def create_optimizer(model: nn.Module, config: ExperimentConfig) -> torch.optim.Optimizer:
    """The config's optimizer; parameters under ``differential_learning_rate_layers`` get their own rate.

    Weight decay applies to weights only. As in timm's ``param_groups_weight_decay``, biases, every 1-D
    parameter (norm scales and shifts, GeM's power) and what the backbone lists in ``no_weight_decay()``
    (a transformer's position embedding and class token) are not decayed: decay would pull a norm's
    scale toward 0 and GeM's power toward its floor of 1, which no regulariser means to do.
    """
    training = config.training
    prefixes = tuple(training.differential_learning_rate_layers)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if prefixes and not any(n.startswith(prefixes) for n, _ in named):
        raise CoughPipelineError(
            f"training.differential_learning_rate_layers {list(prefixes)} match no parameter "
            "(use module names such as 'backbone' or 'head')"
        )
    backbone = getattr(model, "backbone", None)
    exempt = [f"backbone.{pattern}" for pattern in getattr(backbone, "no_weight_decay", set)()]  # a ViT's pos_embed
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, parameter in named:
        rate = training.differential_learning_rate if prefixes and name.startswith(prefixes) else training.learning_rate
        undecayed = parameter.ndim <= 1 or name.endswith(".bias") or any(fnmatch.fnmatch(name, p) for p in exempt)
        decay = 0.0 if undecayed else training.weight_decay
        groups.setdefault((rate, decay), []).append(parameter)
    param_groups = [{"params": params, "lr": rate, "weight_decay": decay} for (rate, decay), params in groups.items()]
    if training.optimizer == "AdamW":
        return torch.optim.AdamW(param_groups)
    if training.optimizer == "Adam":
        return torch.optim.Adam(param_groups)
    return torch.optim.SGD(param_groups, momentum=0.9, nesterov=True)


def create_scheduler(optimizer: torch.optim.Optimizer, config: ExperimentConfig, steps_per_epoch: int):
    """Per optimizer step: linear warm-up for ``warmup_epochs``, then Cosine, Linear or Constant."""
    total = max(1, config.training.epochs * steps_per_epoch)
    warmup = int(round(config.training.warmup_epochs * steps_per_epoch))
    schedule = config.training.schedule

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "Cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if schedule == "Linear":
            return 1.0 - progress
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def cpu_has_native_bf16() -> bool:
    """True on CPUs whose oneDNN kernels run bf16 natively (AVX512-BF16 or AMX), where it pays off."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and (
            torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        )
    except (AttributeError, RuntimeError):
        return False


def autocast_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """The mixed-precision type for a device: bf16 (fp16 on GPUs without bf16) on CUDA, bf16 on CPUs
    with native bf16 units, none elsewhere (emulated bf16 is slower than fp32)."""
    if not enabled:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None


def select_device(config: ExperimentConfig) -> torch.device:
    """The GPU of this rank, the first of ``environment.gpus``, or the CPU when there is no usable GPU.

    A pod that asked Kubernetes for GPUs and finds CUDA unusable (a driver too old, no device plugin)
    fails naming ``environment.gpus``: silently training a GPU job on the CPU would take days. Elsewhere
    (a laptop, ``run-local``) training falls back to the CPU with one warning.
    """
    _, world, local_rank = distributed_context()
    usable = torch.cuda.device_count() if torch.cuda.is_available() else 0
    requested = gpus_requested()
    if requested and usable < requested:
        raise CoughPipelineError(
            f"environment.gpus: this pod asked for {requested} nvidia.com/gpu but CUDA can use {usable} "
            f"({_cuda_problem()}); check the node's NVIDIA driver (580.65.06 or newer for the CUDA 13.0 build of "
            "torch in the image) and its device plugin, or set environment.gpus=[] to train on the CPU"
        )
    if config.environment.gpus and not usable:
        log.warning("environment.gpus is %s but no GPU is usable here: training on the CPU", config.environment.gpus)
        return torch.device("cpu")
    if not config.environment.gpus:
        return torch.device("cpu")
    if world > 1:
        return torch.device("cuda", local_rank)
    first = config.environment.gpus[0]
    return torch.device("cuda", int(first) if first.isdigit() and int(first) < usable else 0)


def _cuda_problem() -> str:
    try:
        torch.cuda.init()
    except Exception as exc:  # noqa: BLE001 - whatever CUDA says is the reason
        return str(exc).strip().splitlines()[0][:200]
    return "no CUDA device is visible"
