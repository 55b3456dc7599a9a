"""Training speed: the input pipeline from Parquet shards, and model throughput (CPU or CUDA).

    python benchmarks/bench_training.py [--clips 3000] [--backbones resnet18 resnet50] [--batch 32]

1. Input pipeline: spectrograms/s delivered from the shards into padded batches (the training
   DataLoader: memory-mapped shards, length buckets, workers), with the use case's shapes
   (128 mels x 200..938 frames, i.e. 2-10 s at 48 kHz / hop 512). No model: this is the rate a
   GPU could be fed at.
2. Model throughput, samples/s for forward + backward + optimizer step on (batch, 128, 938)
   inputs, per backbone, channels_last; in fp32 and, where the device runs it natively, with the
   mixed precision the train step uses (bf16/fp16 on CUDA, bf16 on CPUs with AVX512-BF16/AMX).
3. Step time fed from the shards vs from tensors already in memory (ratio 1.0 = the loader never
   makes the model wait), with the mixed precision of the train step; on CUDA also the GPU's
   utilisation while fed from the shards (sampled from ``nvidia-smi`` every 100 ms).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))

from coughreg.artifacts.shards import SpectrogramShardReader, SpectrogramShardWriter  # noqa: E402
from coughreg.config.loading import load_resolved_config  # noqa: E402
from coughreg.model.network import CoughRegressor  # noqa: E402
from coughreg.training.data import SpectrogramDataset, create_loader  # noqa: E402
from coughreg.training.factories import autocast_dtype  # noqa: E402


def write_shards(folder: Path, clips: int, rows_per_shard: int = 512) -> tuple[list[Path], np.ndarray]:
    rng = np.random.default_rng(0)
    frames = rng.integers(200, 939, size=clips)
    paths = []
    for start in range(0, clips, rows_per_shard):
        writer = SpectrogramShardWriter(folder / f"part-{start:06d}.parquet", ["y"], None, {"feature_hash": "bench"}, 32)
        for i in range(start, min(clips, start + rows_per_shard)):
            writer.add({"id": str(i), "y": float(rng.random())}, rng.normal(-50, 15, (128, frames[i])).astype(np.float16))
        paths.append(writer.close().path)
    return paths, frames


def input_pipeline(paths, frames, config, device, epochs: int = 2) -> float:
    labels = np.random.default_rng(1).random((len(frames), 1)).astype(np.float32)
    dataset = SpectrogramDataset(paths, np.arange(len(frames)), labels, 938, seed=0)
    blocks = SpectrogramShardReader(paths).blocks
    loader = create_loader(dataset, np.minimum(frames, 938), config, True, device, seed=0, blocks=blocks)
    seen = 0
    started = time.perf_counter()
    for epoch in range(1, epochs + 1):
        dataset.epoch = loader.batch_sampler.epoch = epoch
        for spectrograms, _lengths, y, _ in loader:
            if device.type == "cuda":
                spectrograms = spectrograms.to(device, non_blocking=True)
            seen += len(y)
    return seen / (time.perf_counter() - started)


def model_throughput(backbone: str, batch: int, device: torch.device, amp: torch.dtype | None, steps: int = 4) -> float:
    model = CoughRegressor(backbone, 1).to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(batch, 128, 938, device=device) * 15 - 50
    y = torch.rand(batch, 1, device=device)
    for step in range(steps + 2):
        if step == 2:
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = (model(x) - y).abs().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - started)


class GpuUtilisation:
    """Mean GPU utilisation (percent) over a block, polled from ``nvidia-smi``; None where there is none."""

    def __init__(self, device: torch.device, every_s: float = 0.1) -> None:
        self.enabled = device.type == "cuda" and shutil.which("nvidia-smi") is not None
        self.index = device.index or 0
        self.every_s = every_s
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        query = ["nvidia-smi", f"--id={self.index}", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
        while not self._stop.is_set():
            done = subprocess.run(query, capture_output=True, text=True, check=False)
            if done.returncode == 0 and done.stdout.strip().isdigit():
                self.samples.append(float(done.stdout.strip()))
            self._stop.wait(self.every_s)

    def __enter__(self) -> GpuUtilisation:
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self.enabled:
            self._thread.join()

    @property
    def mean(self) -> float | None:
        return float(np.mean(self.samples)) if self.samples else None


def fed_vs_memory(paths, frames, config, device, backbone: str, steps: int = 6) -> tuple[float, float, float | None]:
    model = CoughRegressor(backbone, 1).to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    amp = autocast_dtype(device, True)
    labels = np.random.default_rng(1).random((len(frames), 1)).astype(np.float32)
    dataset = SpectrogramDataset(paths, np.arange(len(frames)), labels, 938, seed=0)
    loader = create_loader(dataset, np.minimum(frames, 938), config, True, device, seed=0)
    batches = []  # already on the device: the model never waits for them
    for spectrograms, lengths, y, _ in loader:
        batches.append((spectrograms.to(device), lengths.to(device), y.to(device)))
        if len(batches) == steps + 1:
            break

    def step(spectrograms, lengths, y):
        spectrograms = spectrograms.to(device, non_blocking=True)
        lengths, y = lengths.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = (model(spectrograms, lengths) - y).abs().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize()

    step(*batches[0])  # warm-up
    synchronize()
    started = time.perf_counter()
    for batch in batches[1:]:
        step(*batch)
    synchronize()
    memory = (time.perf_counter() - started) / (len(batches) - 1)
    iterator = iter(loader)
    next(iterator)
    with GpuUtilisation(device) as utilisation:
        started = time.perf_counter()
        for _ in range(steps):
            spectrograms, lengths, y, _ = next(iterator)
            step(spectrograms, lengths, y)
        synchronize()
        fed = (time.perf_counter() - started) / steps
    return fed, memory, utilisation.mean


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--backbones", nargs="*", default=["resnet18", "resnet50"])
    parser.add_argument("--fed-backbone", default="resnet18", help="resnet50 on a GPU, as the use case trains")
    parser.add_argument("--fed-steps", type=int, default=6, help="more on a GPU (e.g. 50), where a step is short")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = load_resolved_config(None, ["environment.seed=1", f"training.batch_size={args.batch}",
                                         f"environment.number_of_workers={args.workers}"])
    print(f"device {device}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as folder:
        paths, frames = write_shards(Path(folder), args.clips)
        rate = input_pipeline(paths, frames, config, device)
        print(f"input pipeline         {rate:,.0f} spectrograms/s into batches of {args.batch} "
              f"(128 x {frames.min()}..{frames.max()} frames, mean {frames.mean():.0f})")
        amp = autocast_dtype(device, True)
        for backbone in args.backbones:
            for dtype in [None, amp] if amp is not None else [None]:
                rate = model_throughput(backbone, args.batch, device, dtype)
                precision = str(dtype).replace("torch.", "") if dtype else "fp32"
                print(f"{backbone:22s} {rate:.1f} samples/s train, {precision} (batch {args.batch}, 128 x 938)")
        fed, memory, busy = fed_vs_memory(paths, frames, config, device, args.fed_backbone, args.fed_steps)
        print(f"step time {args.fed_backbone}     fed from shards {fed * 1000:.0f} ms, from memory {memory * 1000:.0f} ms "
              f"-> ratio {fed / memory:.2f}" + (f"; GPU busy {busy:.0f}% while fed from shards" if busy is not None else ""))


if __name__ == "__main__":
    main()
