"""Pods that survive: CPUs from the pod's request and quota, a GPU pod that cannot use CUDA stops."""

from __future__ import annotations

import logging

import pytest
import torch

from coughreg.config.loading import load_resolved_config
from coughreg.runtime.errors import CoughPipelineError
from coughreg.runtime.resources import _cgroup_quota, available_cpus, parse_cpu
from coughreg.training.factories import select_device
from tests.conftest import HT_YAML


def test_cpu_quantities_and_the_cgroup_quota(tmp_path):
    assert parse_cpu("500m") == 0.5 and parse_cpu("2") == 2.0 and parse_cpu("1.5") == 1.5
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # cgroup v2: 1.5 CPUs
    assert _cgroup_quota(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert _cgroup_quota(tmp_path) is None
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("300000")  # cgroup v1: 3 CPUs
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000")
    assert _cgroup_quota(tmp_path) == 3.0


def test_workers_follow_the_pods_cpu_request(monkeypatch):
    monkeypatch.setenv("COUGHREG_CPU_REQUEST", "500m")
    assert available_cpus() == 1  # never below one
    monkeypatch.setenv("COUGHREG_CPU_REQUEST", "64")
    assert available_cpus() <= len(__import__("os").sched_getaffinity(0))  # never above what the process may use


def test_a_gpu_pod_that_cannot_use_cuda_fails_naming_environment_gpus(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("this machine has a usable GPU")
    config = load_resolved_config(HT_YAML)
    monkeypatch.setenv("COUGHREG_GPUS_REQUESTED", "1")
    with pytest.raises(CoughPipelineError, match=r"^environment.gpus: this pod asked for 1 nvidia.com/gpu but CUDA can use 0"):
        select_device(config)


def test_without_a_gpu_request_training_falls_back_to_the_cpu_with_a_warning(monkeypatch, caplog):
    if torch.cuda.is_available():
        pytest.skip("this machine has a usable GPU")
    monkeypatch.delenv("COUGHREG_GPUS_REQUESTED", raising=False)
    with caplog.at_level(logging.WARNING):
        device = select_device(load_resolved_config(HT_YAML))
    assert device.type == "cpu" and "environment.gpus is ['0'] but no GPU is usable here" in caplog.text
