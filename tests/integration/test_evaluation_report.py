"""The evaluation report as a person sees it: rendered in headless Chromium, every picture drawn and not blank,
every clip playable by the browser, the summary on top and the lineage at the end."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil

import numpy as np
import pytest
import torch

from coughreg.evaluation.occlusion import occlusion_map
from coughreg.evaluation.report import choose_recordings, lineage_section
from coughreg.io.html_page import encode_ogg_opus

CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--autoplay-policy=no-user-gesture-required"]


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("headless Chromium is needed to check the report: `apt-get install chromium` (make test installs it)")
    return path


@pytest.fixture(scope="module")
def browser_page(evaluated):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=_chromium(), args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.outside = []  # every request that would leave the file: the report must need none

        def refuse(route):
            page.outside.append(route.request.url)
            route.abort()

        page.route(lambda url: not url.startswith(("file:", "data:")), refuse)
        page.goto(evaluated.report_path.as_uri(), wait_until="load")
        yield page
        browser.close()


def _png_pixels(data_uri: str) -> np.ndarray:
    import matplotlib.image

    return matplotlib.image.imread(io.BytesIO(base64.b64decode(data_uri.split(",", 1)[1])), format="png")


def test_every_picture_is_drawn_and_not_blank(browser_page, evaluated):
    images = browser_page.eval_on_selector_all(
        "img", "els => els.map(e => ({alt: e.alt, src: e.src, width: e.naturalWidth, shown: e.getBoundingClientRect().width, done: e.complete}))")
    alts = [image["alt"] for image in images]
    assert {"errors of cough_detected", "MAE per fold", "label distributions", "training curves"} <= set(alts)
    spectrograms = [a for a in alts if a.startswith("spectrogram of ")]
    assert len(spectrograms) == min(3, evaluated.metrics["validation_rows"])  # logging.number_of_audios
    for image in images:
        assert image["done"] and image["width"] > 100 and image["shown"] > 100, image["alt"]
        pixels = _png_pixels(image["src"])[..., :3]
        assert pixels.std() > 0.02, f"{image['alt']} is blank"
        assert (pixels.reshape(-1, 3) != 1.0).any(axis=1).mean() > 0.02, f"{image['alt']} is mostly empty"
        if image["alt"].startswith("spectrogram of "):  # the spectrogram fills its axes with colour
            left = pixels[:, : pixels.shape[1] // 2]
            assert (left.reshape(-1, 3) != 1.0).any(axis=1).mean() > 0.4, f"{image['alt']} draws no spectrogram"
    assert browser_page.outside == []


def _durations(page, selector: str) -> list[float]:
    """What the browser says each player's clip lasts (-1: it could not read it)."""
    return page.eval_on_selector_all(selector, """els => Promise.all(els.map(a => new Promise(done => {
        if (a.readyState >= 1) return done(a.duration);
        a.addEventListener('loadedmetadata', () => done(a.duration));
        a.addEventListener('error', () => done(-1));
        a.load();
    })))""")


def test_every_clip_plays_in_the_browser(browser_page, evaluated):
    durations = _durations(browser_page, "div.clip:not(.moved) audio")
    assert len(durations) == 3
    clips = re.findall(r"<h3>[^<]*?, ([0-9.]+) s</h3>", evaluated.report_path.read_text())
    assert len(clips) == 3
    for played, expected in zip(durations, clips, strict=True):
        assert played > 0 and abs(played - min(float(expected), 30.0)) < 0.2


def test_the_robustness_section_shows_every_transform_and_the_clips_that_moved_most(browser_page, evaluated):
    robustness = evaluated.metrics["robustness"]
    assert "Robustness to the recording chain" in browser_page.eval_on_selector_all("h2", "els => els.map(e => e.textContent)")
    section = browser_page.inner_text("div.robustness")
    assert f"Each of {robustness['recordings']} validation recordings" in section
    rows = browser_page.eval_on_selector_all("div.robustness table tbody tr, div.robustness table tr:has(td)",
                                             "els => els.map(e => e.textContent)")
    for entry in robustness["transforms"].values():
        assert any(row.startswith(entry["name"]) for row in rows), entry["name"]
    alts = browser_page.eval_on_selector_all("img", "els => els.map(e => e.alt)")
    assert "score changes of cough_detected per transform" in alts
    moved = browser_page.eval_on_selector_all("div.moved h4", "els => els.map(e => e.textContent)")
    assert 1 <= len(moved) <= 3
    shown = [a for a in alts if " as recorded and after " in a]
    assert len(shown) == len(moved)
    durations = _durations(browser_page, "div.moved audio")
    assert len(durations) == 2 * len(moved) and all(d > 0 for d in durations)  # as recorded, and as changed


def test_the_page_reads_from_summary_to_lineage(browser_page, evaluated, tmp_path):
    headings = browser_page.eval_on_selector_all("h2", "els => els.map(e => e.textContent)")
    assert headings[:2] == ["Quality gate", "Metrics"] and headings[-1] == "Lineage"
    assert any(h.startswith("Recordings") for h in headings)
    lead = browser_page.inner_text("p.lead")
    metrics = evaluated.metrics
    assert f"On {metrics['validation_rows']} validation recordings" in lead and "quality gate" in lead
    assert f"{metrics['validation_mae']:.3f}" in lead
    lineage = browser_page.inner_text("h2:text('Lineage') ~ table")
    assert metrics["lineage"]["source"]["uri"] in lineage and metrics["lineage"]["source"]["content_identity"] in lineage
    text = evaluated.report_path.read_text()
    for digest in (*metrics["lineage"]["model"].values(), *metrics["lineage"]["ingest"].values()):
        if re.fullmatch(r"[0-9a-f]{64}", str(digest)):
            assert digest in text
    assert "torch" in browser_page.inner_text("body") and "architecture:" in text  # the libraries and the config
    shot = tmp_path / "report.png"
    browser_page.screenshot(path=str(shot), full_page=True)
    pixels = _png_pixels("data:image/png;base64," + base64.b64encode(shot.read_bytes()).decode())
    assert pixels.shape[0] > 3000 and pixels[..., :3].std() > 0.05


def test_metrics_carry_intervals_per_label_and_fold(evaluated):
    def refuse(constant):
        raise AssertionError(f"metrics.json holds {constant}, which strict JSON parsers refuse")

    metrics = json.loads(evaluated.metrics_path.read_text(), parse_constant=refuse)
    for predictor in ("model", "baseline_mean", "baseline_median"):
        overall = metrics[predictor]["overall"]
        assert next(iter(overall)) == "mae"  # the config's prediction.metric first
        assert {"mae", "rmse", "r2", "pearson", "spearman", "median_ae"} <= set(overall)
        assert set(metrics[predictor]["per_label"]) == {"cough_detected"}
        assert set(metrics[predictor]["per_fold"]) == {str(f) for f in metrics["folds"]}
    mae = metrics["model"]["overall"]["mae"]
    assert mae["value"] == pytest.approx(metrics["validation_mae"]) and mae["ci95"][0] <= mae["value"] <= mae["ci95"][1]
    assert metrics["intervals"]["resamples"] >= 1000 and "seed" in metrics["intervals"]
    assert metrics["validation_mae_ci95_low"] == mae["ci95"][0]
    assert metrics["baseline_median"]["overall"]["pearson"] == {"value": None, "ci95": [None, None]}  # a constant has no correlation
    assert metrics["noise_floor_mae"] == pytest.approx(0.0525, abs=0.002)  # the project's generator wrote its law into the zip


def test_occlusion_finds_the_patch_the_model_listens_to():
    class Band(torch.nn.Module):
        """Predicts the mean level of mel bands 20-29 in frames 40-59 above the clip's floor."""

        def forward(self, x):
            return (x[:, 20:30, 40:60].mean(dim=(1, 2)) - x.amin(dim=(1, 2)))[:, None] / 10

    spectrogram = np.full((64, 100), -60.0, dtype=np.float32)
    spectrogram[20:30, 40:60] = -10.0  # a loud event where the model looks
    spectrogram[50:60, 5:15] = -10.0  # a loud event it ignores
    attribution = occlusion_map([Band()], spectrogram, bands=8, segments=10)
    grid = attribution.values
    assert grid.shape == (8, 10)
    band, segment = np.unravel_index(np.argmax(grid), grid.shape)
    assert attribution.band_edges[band] < 30 and attribution.band_edges[band + 1] > 20  # the patch overlaps the event
    assert attribution.time_edges[segment] < 60 and attribution.time_edges[segment + 1] > 40
    ignored_band = np.searchsorted(attribution.band_edges, 55, side="right") - 1
    assert np.abs(grid[ignored_band, 0:2]).max() < 1e-6  # hiding what the model ignores changes nothing
    assert attribution.per_pixel().shape == spectrogram.shape


def test_the_recordings_shown_are_the_worst_the_best_and_a_random_few():
    import pandas as pd

    frame = pd.DataFrame({"cough_detected": np.linspace(0, 1, 30), "pred_cough_detected": np.linspace(0, 1, 30)})
    frame.loc[7, "pred_cough_detected"] += 0.9
    frame.loc[3, "pred_cough_detected"] += 0.5
    chosen = choose_recordings(frame, "cough_detected", 8, seed=1)
    assert len(chosen) == 8 and len({row for row, _ in chosen}) == 8
    assert chosen[0] == (7, "among the worst") and chosen[1] == (3, "among the worst")
    assert sum(why == "drawn at random" for _, why in chosen) == 4  # 8 // 3 worst, as many best, the rest at random
    assert choose_recordings(frame, "cough_detected", 8, seed=1) == chosen


def test_a_clip_is_embedded_as_opus_that_decodes_to_the_same_length():
    import av

    rate = 16_000
    samples = (0.3 * np.sin(2 * np.pi * 440 * np.arange(rate * 2) / rate)).astype(np.float32)
    data = encode_ogg_opus(samples, rate)
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        decoded = np.concatenate([f.to_ndarray().ravel() for f in container.decode(stream)])
        assert stream.codec_context.name == "opus"
    assert abs(len(decoded) / 48_000 - 2.0) < 0.03 and np.abs(decoded).max() > 0.2
    assert len(data) < 2 * 48_000 / 8 * 1.3  # about the bit rate, not raw samples


def test_text_from_the_data_is_escaped():
    facts = {"source": {"uri": "s3://b/<script>alert(1)</script>.zip", "content_identity": "<b>x</b>"},
             "ingest": {}, "features": {"shard_set": "<i>"}, "model": {"backbone": "<img src=x>", "seed": 1},
             "evaluated_on": "cpu", "image": "<iframe>", "python": "3.11", "libraries": {"torch": "<svg>"},
             "config": "experiment_name: <script>"}
    page = lineage_section(facts)
    assert "<script>" not in page and "<img" not in page and "<iframe>" not in page and "<svg>" not in page
    assert "&lt;script&gt;" in page


def _synthetic_inputs(tmp_path, rows: int, labels: list[str], folds: int, constant_truth: bool = False):
    """A report's inputs without a training run: several folds and labels, to draw every figure on."""
    import pandas as pd

    from coughreg.config.loading import load_resolved_config
    from coughreg.evaluation.evaluate import compute_metrics
    from coughreg.evaluation.gate import decide
    from coughreg.evaluation.report import ReportInputs
    from tests.conftest import HT_YAML

    rng = np.random.default_rng(3)
    frame = pd.DataFrame({"id": [f"clip-{k}" for k in range(rows)], "fold": np.arange(rows) % folds,
                          "duration_s": rng.uniform(0.5, 10, rows)})
    for label in labels:
        truth = np.full(rows, 0.5) if constant_truth else rng.uniform(0, 1, rows)
        frame[label] = truth
        frame[f"pred_{label}"] = np.clip(truth + rng.normal(0, 0.1, rows), 0, 1)
    members = [{"fold": f, "seed": 0, "train_label_mean": [0.5] * len(labels), "train_label_median": [0.5] * len(labels)}
               for f in range(folds)]
    info = {"label_columns": labels, "label_range": [0.0, 1.0], "members": members, "seed": 5, "backbone": "test",
            "validation_scheme": f"group k-fold ({folds} folds)"}
    config = load_resolved_config(HT_YAML, ["logging.number_of_audios=0"])
    metrics = compute_metrics(frame, info, config)
    metrics.update(quality_gate=decide(metrics, 1.0), validation_truncated=0, noise_floor_mae=None)
    facts = {"source": {"uri": "s3://b/k.zip", "content_identity": "etag"}, "ingest": {}, "features": {},
             "model": {"backbone": "test", "seed": 5}, "evaluated_on": "cpu", "image": "none", "python": "3.11",
             "libraries": {}, "config": "experiment_name: x"}
    return ReportInputs(frame, metrics, [], info, config, tmp_path, tmp_path, tmp_path, facts)


def test_several_folds_and_labels_draw_every_figure(tmp_path):
    from coughreg.evaluation.report import build

    inputs = _synthetic_inputs(tmp_path, 400, ["cough_detected", "severity"], folds=3)
    page = build(inputs)
    images = re.findall(r'<img alt="([^"]+)"', page)
    assert {"errors of cough_detected", "errors of severity", "MAE per fold", "label distributions"} <= set(images)
    assert "Per label" in page and "folds 0, 1, 2" in page
    assert inputs.metrics["model"]["per_fold"].keys() == {"0", "1", "2"}


def test_labels_with_no_spread_say_n_a_instead_of_nan(tmp_path):
    from coughreg.evaluation.evaluate import json_ready
    from coughreg.evaluation.report import build

    inputs = _synthetic_inputs(tmp_path, 40, ["cough_detected"], folds=2, constant_truth=True)
    page = build(inputs)
    lead = re.search(r"<p class='lead'>(.*?)</p>", page).group(1)
    assert "nan" not in lead.lower() and "n/a" in lead
    json.dumps(json_ready(inputs.metrics), allow_nan=False)  # metrics.json stays strict JSON
