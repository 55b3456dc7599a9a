"""The robustness measurement's own rules: which transforms are measured at a rate, and a clip the scorer cannot
take. The scorer here is a plain level meter (a real function of the samples), so every change is known."""

from __future__ import annotations

import json

import numpy as np
import pytest

from coughreg.audio.recording_chain import STANDARD, LowPass, slug
from coughreg.evaluation.robustness import FoldScorer, flat, measure, summarize
from coughreg.scoring.decode import decode_audio
from tests.conftest import REAL_COUGHS

RECORDINGS = sorted(REAL_COUGHS.glob("*.mp3"))[:3]


def level(samples: np.ndarray) -> list[float]:
    return [float(10 * np.log10(np.mean(np.square(samples, dtype=np.float64)) + 1e-12) / 100 + 1)]


@pytest.mark.parametrize("rate", [8000, 16000])
def test_a_low_pass_above_the_nyquist_frequency_is_not_measured_and_says_so(rate):
    scorer = FoldScorer(0, level, rate, 4.0)
    changes = measure(scorer, [(p.name, p) for p in RECORDINGS], ["level"])
    silent = [slug(t) for t in STANDARD if isinstance(t, LowPass) and t.cutoff_hz >= rate / 2]
    assert silent and not set(silent) & set(changes["transform"])
    assert set(changes["transform"]) == {slug(t) for t in STANDARD} - set(silent)
    summary = json.loads(json.dumps(summarize(changes, ["level"], sample_rate=rate)))  # as metrics.json keeps it
    for key in silent:
        entry = summary["transforms"][key]
        assert entry["labels"]["level"]["clips"] == 0 and entry["labels"]["level"]["mean_change"] is None
        assert f"{rate} Hz" in entry["note"]
    gain = summary["transforms"]["gain_-12db"]["labels"]["level"]
    assert gain["clips"] == len(RECORDINGS) and gain["mean_change"] == pytest.approx(0.12, abs=0.01)  # 12 dB on the meter
    metrics = flat(summary)
    assert "robustness_gain_-12db_level_mean_change" in metrics
    assert not any(key in name for key in silent for name in metrics)  # no made-up zero in KFP's metrics


def test_a_clip_the_scorer_cannot_take_is_left_out_with_its_name(caplog):
    poisoned = decode_audio(RECORDINGS[1], 16000, max_seconds=4.0).size

    def picky(samples):
        if samples.size == poisoned:
            raise ValueError("this clip breaks the model")
        return level(samples)

    with caplog.at_level("WARNING"):
        changes = measure(FoldScorer(0, picky, 16000, 4.0), [(p.name, p) for p in RECORDINGS], ["level"])
    assert set(changes["id"]) == {RECORDINGS[0].name, RECORDINGS[2].name}
    assert f"{RECORDINGS[1].name} could not be scored as recorded" in caplog.text and "breaks the model" in caplog.text
