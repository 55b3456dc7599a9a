"""How fast the COUGHVID-format generator writes data, and the floor that data allows.

    python benchmarks/bench_generate.py [-n 400] [--workers 2]

Prints clips/s, audio hours per minute, MB written, and the noise floor (expected and realized).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from coughreg.synth.coughvid import generate_coughvid_zip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=400)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "bench.zip"
        started = time.perf_counter()
        report = generate_coughvid_zip(out, args.n, seed=args.seed, workers=args.workers, progress_every=0)
        seconds = time.perf_counter() - started
        size_mb = out.stat().st_size / 2**20
    print(f"recordings            {args.n}")
    print(f"workers               {args.workers}")
    print(f"wall time             {seconds:.1f} s")
    print(f"clips/s               {args.n / seconds:.1f}")
    print(f"audio hours           {report['total_audio_hours']:.2f} ({report['total_audio_hours'] * 60 / (seconds / 60):.1f} audio-min per wall-min)")
    print(f"zip size              {size_mb:.1f} MB")
    print(f"noise floor expected  {report['noise_floor_mae_expected']:.4f} MAE")
    print(f"noise floor realized  {report['noise_floor_mae_realized']:.4f} MAE")
    print(f"median baseline       {report['median_baseline_mae_realized']:.4f} MAE")


if __name__ == "__main__":
    main()
