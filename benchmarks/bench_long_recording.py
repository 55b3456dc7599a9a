"""Peak memory of a feature worker on one long recording: the whole clip at once, and in windows.

    python benchmarks/bench_long_recording.py [--minutes 10] [--window-seconds S]

Generates a recording of ``--minutes`` (48 kHz Opus in WebM, a tone and noise; PyAV), then runs the
features step's per-recording path in a fresh process per variant and prints that process's peak
resident memory (VmHWM), above what the same imports take alone:
  whole clip: decode the whole recording, then one STFT over it (what the step did before);
  windowed:   ``coughreg.features.extract.log_mel_of_file`` (decode and log-mel ``--window-seconds`` at a time,
              by default the step's ``coughreg.features.extract.WINDOW_SECONDS``).
It also prints how far apart the two spectrograms are.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))

from coughreg.audio.feature_spec import feature_parameters  # noqa: E402
from coughreg.config.loading import load_resolved_config  # noqa: E402
from coughreg.features.extract import WINDOW_SECONDS  # noqa: E402

VARIANTS = ("imports", "whole", "windowed")

# Run in a fresh interpreter: peak memory (VmHWM) belongs to this process alone, reset by exec.
CHILD = r"""
import json, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[4])
import numpy as np, torch
torch.set_num_threads(1)
from coughreg.features import extract as features
from coughreg.audio.files import decode_audio
variant, path, params = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
features.WINDOW_SECONDS = params.pop("window_seconds") or features.WINDOW_SECONDS
started = time.perf_counter()
if variant == "whole":
    samples = decode_audio(path, params["sample_rate"], max_seconds=params["max_seconds"])
    with torch.inference_mode():
        log_mel = features._frontend(params)(torch.from_numpy(samples)[None])[0].numpy()
elif variant == "windowed":
    log_mel = features.log_mel_of_file(path, params)
else:
    features._frontend(params)
    log_mel = np.zeros((1, 1), np.float32)
seconds = time.perf_counter() - started
if len(sys.argv) > 5:
    np.save(sys.argv[5], log_mel)
peak = next(int(l.split()[1]) for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM:"))
print(json.dumps({"peak_mb": peak / 1024, "seconds": seconds, "frames": int(log_mel.shape[1])}))
"""


def long_recording(path: Path, minutes: float, rate: int = 48000) -> Path:
    """A ``minutes``-long 48 kHz Opus-in-WebM recording: a tone with noise, encoded block by block."""
    import av

    rng = np.random.default_rng(0)
    block = rate  # one second at a time: the generator itself stays small
    with av.open(str(path), mode="w", format="webm") as out:
        stream = out.add_stream("libopus", rate=rate, layout="mono")
        stream.bit_rate = 32000
        for second in range(int(minutes * 60)):
            t = (second * block + np.arange(block)) / rate
            samples = (0.2 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(block)).astype(np.float32)
            frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="flt", layout="mono")
            frame.sample_rate = rate
            frame.pts = second * block
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


def measure(variant: str, path: Path, params: dict, window_seconds: float, save: Path | None = None) -> dict:
    """Peak memory (MB), seconds and frames of one variant, in its own process."""
    arguments = [sys.executable, "-c", CHILD, variant, str(path), json.dumps({**params, "window_seconds": window_seconds}),
                 str(PROJECT), *([str(save)] if save else [])]
    done = subprocess.run(arguments, capture_output=True, text=True, check=True, timeout=1800)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--window-seconds", type=float, default=None, help="default: the features step's window")
    args = parser.parse_args()
    config = load_resolved_config(None)
    params = {**feature_parameters(config.audio), "max_seconds": float(config.prediction.max_inference_chunk_seconds)}
    params["max_seconds"] = max(params["max_seconds"], args.minutes * 60)
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        path = long_recording(Path(folder) / "long.webm", args.minutes)
        print(f"{args.minutes:g}-minute recording, 48 kHz Opus in WebM: {path.stat().st_size / 2**20:.1f} MB "
              f"(generated in {time.perf_counter() - started:.0f} s); n_fft {params['stft_window_size']}, "
              f"hop {params['hop_size']}, {params['mel_frequency_bins']} mels")
        results = {}
        for variant in VARIANTS:
            save = Path(folder) / f"{variant}.npy" if variant != "imports" else None
            results[variant] = measure(variant, path, params, args.window_seconds, save)
        base = results["imports"]["peak_mb"]
        print(f"the step's imports alone (torch, PyAV, pandas, pyarrow; mostly shared library pages): peak RSS {base:.0f} MB")
        window = args.window_seconds or WINDOW_SECONDS
        for variant, label in (("whole", "whole clip (before)"), ("windowed", f"windowed, {window:g} s (after)")):
            found = results[variant]
            print(f"{label:<40} peak RSS {found['peak_mb']:7.0f} MB (+{found['peak_mb'] - base:.0f} MB over the imports), "
                  f"{found['seconds']:.1f} s, {found['frames']} frames")
        whole, windowed = np.load(Path(folder) / "whole.npy"), np.load(Path(folder) / "windowed.npy")
        print(f"largest difference between the two spectrograms: {np.abs(whole - windowed).max():.2e} dB "
              f"(shapes {whole.shape} and {windowed.shape})")


if __name__ == "__main__":
    main()
