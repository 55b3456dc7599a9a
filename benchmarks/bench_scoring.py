"""Scoring speed on the CPU: which form of the model, and which batching, serves 10 s clips fastest.

    python benchmarks/bench_scoring.py [--backbone mobilenetv3_small_100] [--clips 64] [--threads 2] [--profile]

A scorer folder is exported from a randomly initialised model of the demo's config (the same front end
and backbone the demo trains; the weights do not change the speed), then, side by side in one run, with
the same CPU budget (``--threads``), per 10 s clip:

1. eager PyTorch, one clip at a time (the baseline: the model as training leaves it);
2. the exported programs one clip at a time: ``scorer.pt2`` (torch.export) and ``scorer.ts`` (TorchScript,
   frozen and optimized for inference when loaded);
3. batches of 16 clips (eager and both programs);
4. one clip per worker thread, ``--threads`` workers of one torch thread each (how ``score`` and ``serve`` run);
5. the whole path: encoded WebM/Opus files -> decode -> score -> rows (``Scorer.score_paths``), in worker
   threads and in worker processes (decoding holds the GIL: only processes decode in parallel);
6. the HTTP service on 127.0.0.1: requests/s and p50/p95 latency at 1, 4 and 16 concurrent clients, its
   workers threads or processes.

Every form's numbers are checked against the eager model (within 1e-4). ``--profile`` prints where the time
goes (torch.profiler, per operator, the eager model on one clip).
"""

from __future__ import annotations

import argparse
import http.client
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))

from coughreg.audio.frontend import LogMel  # noqa: E402
from coughreg.config.loading import load_resolved_config  # noqa: E402
from coughreg.export.scorer_folder import write_scorer  # noqa: E402
from coughreg.model.network import CoughScorer, create_model  # noqa: E402
from coughreg.scoring.processes import ProcessPool  # noqa: E402
from coughreg.scoring.scorer import Scorer  # noqa: E402
from coughreg.scoring.server import ScoringService, make_server  # noqa: E402
from coughreg.synth.coughvid import encode_audio  # noqa: E402

SECONDS = 10.0
BATCH = 16


def percentiles(latencies: list[float]) -> tuple[float, float]:
    values = np.asarray(latencies) * 1000
    return float(np.percentile(values, 50)), float(np.percentile(values, 95))


def one_at_a_time(predict, clips: np.ndarray, threads: int) -> tuple[float, list[float], np.ndarray]:
    torch.set_num_threads(threads)
    predict(clips[:1])  # warm up (TorchScript specialises on its first calls)
    predict(clips[:1])
    outputs, latencies = [], []
    started = time.perf_counter()
    for clip in clips:
        begin = time.perf_counter()
        outputs.append(predict(clip[None])[0])
        latencies.append(time.perf_counter() - begin)
    return len(clips) / (time.perf_counter() - started), latencies, np.stack(outputs)


def batched(predict, clips: np.ndarray, threads: int) -> tuple[float, list[float], np.ndarray]:
    torch.set_num_threads(threads)
    predict(clips[:BATCH])
    outputs, latencies = [], []
    started = time.perf_counter()
    for start in range(0, len(clips), BATCH):
        begin = time.perf_counter()
        outputs.append(predict(clips[start : start + BATCH]))
        latencies.append((time.perf_counter() - begin) / len(clips[start : start + BATCH]))  # per clip
    return len(clips) / (time.perf_counter() - started), latencies, np.concatenate(outputs)


def thread_pool(predict, clips: np.ndarray, workers: int) -> tuple[float, list[float], np.ndarray]:
    torch.set_num_threads(1)
    predict(clips[:1])
    predict(clips[:1])
    latencies = [0.0] * len(clips)

    def one(k: int) -> np.ndarray:
        begin = time.perf_counter()
        value = predict(clips[k : k + 1])[0]
        latencies[k] = time.perf_counter() - begin
        return value

    started = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        outputs = list(pool.map(one, range(len(clips))))
    return len(clips) / (time.perf_counter() - started), latencies, np.stack(outputs)


def http_load(scorer: Scorer, files: list[bytes], workers: int, clients: int, requests: int, processes: bool) -> tuple[float, float, float]:
    service = ScoringService(scorer, workers=workers, max_body_bytes=50 * 2**20, processes=processes)
    server = make_server(service, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    service.start()
    port = server.server_address[1]
    torch.set_num_threads(1 if workers > 1 else workers)

    def post(k: int) -> float:
        begin = time.perf_counter()
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        connection.request("POST", "/score", body=files[k % len(files)])
        response = connection.getresponse()
        response.read()
        assert response.status == 200, response.status
        return time.perf_counter() - begin

    try:
        post(0)
        started = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            latencies = list(pool.map(post, range(requests)))
        rate = requests / (time.perf_counter() - started)
    finally:
        server.shutdown()
        server.server_close()
        service.close()
    p50, p95 = percentiles(latencies)
    return rate, p50, p95


def profile(predict, clip: np.ndarray, threads: int) -> None:
    """The operators' share of the time (the eager model: TorchScript's fused kernels all report as ``forward``)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    torch.set_num_threads(threads)
    for _ in range(3):
        predict(clip[None])
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            predict(clip[None])
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="mobilenetv3_small_100")
    parser.add_argument("--clips", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="the CPU budget every form gets")
    parser.add_argument("--requests", type=int, default=96, help="HTTP requests per client count")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()

    config = load_resolved_config(PROJECT / "configs" / "demo.yaml", [f"architecture.backbone={args.backbone}"])
    torch.manual_seed(0)
    eager = CoughScorer(LogMel.from_config(config.audio), [create_model(config).eval()]).eval()
    rate = config.audio.sample_rate
    rng = np.random.default_rng(0)
    clips = (rng.standard_normal((args.clips, int(SECONDS * rate))) * 0.05).astype(np.float32)

    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        started = time.perf_counter()
        write_scorer(eager, config, folder, {"backbone": args.backbone, "label_columns": ["cough_detected"], "label_range": [0, 1],
                                             "folds": [0], "feature_parameters": {}})
        print(f"{args.backbone}: scorer exported in {time.perf_counter() - started:.0f} s; {args.clips} clips of {SECONDS:g} s; "
              f"{args.threads} CPU threads; torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}")
        programs = {name: Scorer(folder, name) for name in ("export", "torchscript")}

        def eager_predict(batch: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return eager(torch.from_numpy(batch)).numpy()

        forms = {"eager": eager_predict, "scorer.pt2 (torch.export)": programs["export"].predict,
                 "scorer.ts (TorchScript)": programs["torchscript"].predict}
        print(f"\n{'form':<44}{'clips/s':>9}{'p50 ms':>9}{'p95 ms':>9}{'x eager':>9}  max |diff|")
        baseline, reference = None, None
        for mode, run, workers in (("one at a time", one_at_a_time, args.threads), (f"batches of {BATCH}", batched, args.threads),
                                   (f"{args.threads} workers x 1 thread", thread_pool, args.threads)):
            for name, predict in forms.items():
                speed, latencies, outputs = run(predict, clips, workers)
                if baseline is None:
                    baseline, reference = speed, outputs
                p50, p95 = percentiles(latencies)
                difference = float(np.abs(outputs - reference).max())
                print(f"{name + ', ' + mode:<44}{speed:>9.1f}{p50:>9.1f}{p95:>9.1f}{speed / baseline:>9.2f}  {difference:.1e}")
                assert difference <= 1e-4, f"{name} disagrees with the eager model by {difference}"

        encoded = [encode_audio(clip, "webm", "opus") for clip in clips]
        scorer = programs["torchscript"]
        paths = []
        for k, data in enumerate(encoded):
            path = folder / f"clip{k:03d}.webm"
            path.write_bytes(data)
            paths.append((path.name, path))
        torch.set_num_threads(1)
        scorer.score_paths(paths[:2], args.threads, processes=False)
        started = time.perf_counter()
        rows = scorer.score_paths(paths, args.threads, progress_every=3600, processes=False)
        whole = len(paths) / (time.perf_counter() - started)
        assert all(row["status"] == "ok" for row in rows)
        print(f"{f'files: decode + score, {args.threads} threads':<44}{whole:>9.1f}{'':>18}{whole / baseline:>9.2f}")
        started = time.perf_counter()
        pool = ProcessPool(Scorer, folder, "torchscript", args.threads)
        start_seconds = time.perf_counter() - started
        try:
            started = time.perf_counter()
            with ThreadPoolExecutor(2 * args.threads) as threads:
                rows = list(threads.map(lambda item: pool.score(*item), paths))
            whole = len(paths) / (time.perf_counter() - started)
        finally:
            pool.close()
        assert all(row["status"] == "ok" for row in rows)
        print(f"{f'files: decode + score, {args.threads} processes':<44}{whole:>9.1f}{'':>18}{whole / baseline:>9.2f}"
              f"  (+{start_seconds:.1f} s to start them)")
        for processes in (False, True):
            print(f"\n{f'HTTP POST /score, {args.threads} worker ' + ('processes' if processes else 'threads'):<44}"
                  f"{'req/s':>9}{'p50 ms':>9}{'p95 ms':>9}")
            for clients in (1, 4, 16):
                speed, p50, p95 = http_load(scorer, encoded, args.threads, clients, args.requests, processes)
                print(f"{f'{clients} client(s)':<44}{speed:>9.1f}{p50:>9.1f}{p95:>9.1f}")
        if args.profile:
            print(f"\nwhere the time goes (the eager model, one {SECONDS:g} s clip, {args.threads} threads):")
            profile(eager_predict, clips[0], args.threads)
    print(f"\nbaseline (eager, one at a time): {baseline:.1f} clips/s; target 1.5x = {1.5 * baseline:.1f} clips/s")


if __name__ == "__main__":
    main()
