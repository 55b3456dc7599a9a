"""Feature extraction speed and memory.

    python benchmarks/bench_features.py [--clips 240] [--scale /tmp/coughreg-bench/ingest_2600 ...] [--profile]

Per core (one process, one torch thread), on generated COUGHVID-format recordings (WebM/Opus,
Ogg/Opus, Ogg/Vorbis at 48 kHz), in seconds of audio per wall second ("x real time"):
  decode only (PyAV), log-mel only (torchaudio, on the decoded samples), and the whole chain
  (decode + resample + log-mel + float16 + Parquet shard write), with the whole chain's ratio to
  the limit its two parts allow together (1 / (1/decode + 1/mel)).
Beside it, what a user would write without this project: librosa.load + melspectrogram +
power_to_db + np.save per file, same parameters, on the Ogg files (librosa cannot open WebM).
With --scale: `pipeline.py step features` on ingest folders (e.g. from bench_ingest.py) on all
cores, wall time and peak memory (PSS summed over the process tree).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))

from benchmarks.memory import TreeMemorySampler  # noqa: E402
from coughreg.audio.feature_spec import feature_parameters  # noqa: E402
from coughreg.audio.files import decode_audio  # noqa: E402
from coughreg.config.loading import load_resolved_config  # noqa: E402
from coughreg.features.extract import _write_shard, log_mel_of_file  # noqa: E402
from coughreg.synth.coughvid import generate_coughvid_zip  # noqa: E402


def prepare(folder: Path, clips: int) -> list[Path]:
    archive = folder / "clips.zip"
    generate_coughvid_zip(archive, clips, seed=5, workers=os.cpu_count() or 1, progress_every=0)
    with zipfile.ZipFile(archive) as handle:
        names = [n for n in handle.namelist() if n.endswith((".webm", ".ogg"))]
        handle.extractall(folder, members=names)
    return sorted(folder / n for n in names)


def shard_task(paths: list[Path], params: dict, out: str) -> dict:
    """The features step's unit of work (one shard) over these files."""
    records = [{"id": p.stem, "split": "train", "audio_path": p.name, "duration_s": 0.0, "group": "", "y": 0.5} for p in paths]
    return {"path": f"{out}/part.parquet", "records": records, "params": params, "label_columns": ["y"],
            "group_column": None, "metadata": {}, "row_group_rows": 32, "root": str(paths[0].parent)}


def rate(seconds_of_audio: float, wall: float) -> float:
    return seconds_of_audio / wall


def per_core(paths: list[Path], params: dict) -> dict:
    import torch

    from coughreg.audio.frontend import LogMel

    torch.set_num_threads(1)
    sr = params["sample_rate"]
    frontend = LogMel(sr, params["stft_window_size"], params["hop_size"], params["mel_frequency_bins"],
                      params["minimum_frequency"], params["maximum_frequency"]).eval()
    for path in paths[:3]:  # warm-up: imports, FFT plans
        log_mel_of_file(path, params)

    started = time.perf_counter()
    decoded = [decode_audio(p, sr) for p in paths]
    decode_wall = time.perf_counter() - started
    audio = sum(len(x) for x in decoded) / sr

    started = time.perf_counter()
    with torch.inference_mode():
        for samples in decoded:
            frontend(torch.from_numpy(samples)[None])
    mel_wall = time.perf_counter() - started
    del decoded

    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        _write_shard(shard_task(paths, params, out))
        chain_wall = time.perf_counter() - started
    decode, mel, chain = rate(audio, decode_wall), rate(audio, mel_wall), rate(audio, chain_wall)
    limit = 1 / (1 / decode + 1 / mel)
    return {"audio_s": audio, "decode": decode, "mel": mel, "chain": chain, "limit": limit}


def chain_only(paths: list[Path], params: dict) -> float:
    """The whole chain (decode + log-mel + float16 + Parquet) on these files, x real time."""
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        result = _write_shard(shard_task(paths, params, out))
        return result["audio_seconds"] / (time.perf_counter() - started)


def librosa_baseline(paths: list[Path], params: dict) -> float:
    import librosa

    oggs = [p for p in paths if p.suffix == ".ogg"]
    librosa.feature.melspectrogram(y=np.zeros(48000, dtype=np.float32), sr=48000)  # warm-up (numba, caches)
    audio = 0.0
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        for path in oggs:
            y, sr = librosa.load(path, sr=params["sample_rate"], mono=True)
            mel = librosa.feature.melspectrogram(
                y=y, sr=sr, n_fft=params["stft_window_size"], hop_length=params["hop_size"],
                n_mels=params["mel_frequency_bins"], fmin=params["minimum_frequency"], fmax=params["maximum_frequency"],
            )
            np.save(Path(out) / f"{path.stem}.npy", librosa.power_to_db(mel).astype(np.float16))
            audio += len(y) / sr
        wall = time.perf_counter() - started
    return audio / wall, len(oggs)


def scale(ingest_dir: Path, workdir: Path) -> None:
    import json

    out = workdir / f"features_{ingest_dir.name}"
    report = json.loads((ingest_dir / "ingest_report.json").read_text())
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "pipeline.py", "step", "features", "--input", str(ingest_dir), "--out", str(out),
         "--set", "environment.seed=1"],
        cwd=PROJECT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    with TreeMemorySampler(process.pid) as sampler:
        stdout, stderr = process.communicate()
    wall = time.perf_counter() - started
    if process.returncode:
        print(stderr[-2000:])
        raise SystemExit(process.returncode)
    hours = report["quality"]["duration_s"]["total_hours"]
    print(f"\n== {report['ok']} recordings ({hours:.1f} h of audio) from {ingest_dir}, {os.cpu_count()} cores")
    print(stdout.strip().splitlines()[-1])
    print(f"wall time              {wall:.0f} s ({wall / 60:.1f} min)")
    print(f"throughput             {hours * 3600 / wall:.0f}x real time ({hours * 3600 / wall / (os.cpu_count() or 1):.0f}x per core)")
    print(f"peak memory (PSS)      {sampler.peak_pss_mb:.0f} MB over {sampler.peak_processes} processes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=240)
    parser.add_argument("--scale", type=Path, nargs="*", default=[])
    parser.add_argument("--profile", action="store_true", help="print where the whole chain's time goes")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/coughreg-bench"))
    args = parser.parse_args()
    params = {**feature_parameters(load_resolved_config(None, ["environment.seed=1"]).audio), "max_seconds": 600.0}
    with tempfile.TemporaryDirectory() as folder:
        paths = prepare(Path(folder), args.clips)
        figures = per_core(paths, params)
        print(f"per core, {len(paths)} recordings, {figures['audio_s'] / 60:.1f} min of audio")
        print(f"decode only            {figures['decode']:.0f}x real time")
        print(f"log-mel only           {figures['mel']:.0f}x real time")
        print(f"combined limit         {figures['limit']:.0f}x real time  (1 / (1/decode + 1/mel))")
        print(f"whole chain            {figures['chain']:.0f}x real time  = {figures['chain'] / figures['limit']:.0%} of the limit")
        baseline, count = librosa_baseline(paths, params)
        ours = chain_only([p for p in paths if p.suffix == ".ogg"], params)
        print(f"librosa + np.save      {baseline:.0f}x real time on the {count} Ogg files")
        print(f"ours, same Ogg files   {ours:.0f}x real time = {ours / baseline:.1f}x librosa")
        if args.profile:
            import torch

            torch.set_num_threads(1)
            profiler = cProfile.Profile()
            profiler.runcall(_write_shard, shard_task(paths, params, folder))
            pstats.Stats(profiler).sort_stats("tottime").print_stats(12)
    for ingest_dir in args.scale:
        scale(ingest_dir, args.workdir)


if __name__ == "__main__":
    main()
