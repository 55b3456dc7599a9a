"""Step 5, export: the trained model -> a scoring pipeline that takes raw audio, and where it came from.

The scorer is the features step's ``LogMel`` front end (the same module, the same numbers) in
front of every trained regressor, saved as safetensors with a description and the config; when
the backbone allows it a ``torch.export`` program (``scorer.pt2``) is written too, which needs
nothing but torch. ``provenance.json`` records what made it: the pipeline and the run (its
artifact URI), the image, the package version, and the SHA-256 of the model's weights. The
compiled pipeline itself is written by the client that compiles it (``compile``, ``run-local``,
``submit``), never by a step.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from coughreg import artifacts
from coughreg.config import ExperimentConfig, save_config
from coughreg.errors import CoughPipelineError
from coughreg.frontend import LogMel
from coughreg.model import CoughScorer
from coughreg.score import SCORER_FORMAT, Scorer
from coughreg.step_config import chain_keys, with_upstream
from coughreg.storage import atomic_path, atomic_write_text, sha256_file
from coughreg.training import load_members

log = logging.getLogger(__name__)


@dataclass
class ExportResult:
    scorer_dir: Path
    provenance_path: Path
    program_path: Path | None


def provenance(model_dir: Path, info: dict, run: dict | None) -> dict:
    """What made a scorer: the run that exported it, the package, and the weights' content hashes."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        package_version = version("coughreg")
    except PackageNotFoundError:
        package_version = "unknown"
    return {
        "package": {"name": "coughreg", "version": package_version},
        "run": run or {},
        "model": {
            "backbone": info["backbone"],
            "seed": info["seed"],
            "shard_set": info.get("shard_set"),
            "weights_sha256": {m["weights"]: sha256_file(model_dir / m["weights"]) for m in info["members"]},
        },
    }


def _export_program(scorer: CoughScorer, sample_rate: int, path: Path) -> str | None:
    """A torch.export program with dynamic batch and length, checked against the eager scorer.

    Returns None on success, else why no program was written (the Python scorer still works).
    """
    from torch.export import Dim, export

    example = torch.randn(2, int(3 * sample_rate)) * 0.1  # batch 2: a batch of 1 would be baked in
    try:
        program = export(scorer, (example,), dynamic_shapes={"waveform": {0: Dim.AUTO, 1: Dim.AUTO}})
        check = torch.randn(3, int(5.37 * sample_rate)) * 0.1
        with torch.inference_mode():
            if not torch.allclose(program.module()(check), scorer(check), atol=1e-4):
                return "the exported program disagrees with the eager scorer on a 5.37 s input"
        with atomic_path(path) as tmp:
            torch.export.save(program, str(tmp))
    except Exception as exc:  # noqa: BLE001 - any tracing failure means "no program", never a failed export
        reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        log.warning("scorer.pt2 not written: torch.export failed for this backbone: %s", reason)
        return reason
    return None


def export(model_dir: str | Path, out_dir: str | Path, config: ExperimentConfig, run: dict | None = None) -> ExportResult:
    """Write the scorer folder (when ``training.build_scoring_pipelines``) and its provenance.

    Args:
        model_dir: the train step's output; the network is rebuilt from the config saved beside it.
        out_dir: the export artifact folder.
        config: the export step's keys (``training.build_scoring_pipelines``, ``prediction.inference_chunk_*``).
        run: what identifies the run (pipeline name, artifact URI, image), recorded in ``provenance.json``.
    """
    from safetensors.torch import save_file

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    config = with_upstream(config, "export", artifacts.read_config(model_dir, "train"))
    info = artifacts.read_model_info(model_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, out_dir, chain_keys("export"))
    provenance_path = out_dir / artifacts.PROVENANCE
    atomic_write_text(provenance_path, json.dumps(provenance(model_dir, info, run), indent=2))
    if not config.training.build_scoring_pipelines:
        log.info("training.build_scoring_pipelines is false: no scorer exported")
        return ExportResult(out_dir, provenance_path, None)

    regressors = load_members(model_dir)
    scorer = CoughScorer(LogMel.from_config(config.audio), regressors).eval()
    state = {k: v.detach().contiguous().cpu() for k, v in scorer.state_dict().items()}
    with atomic_path(out_dir / artifacts.SCORER_WEIGHTS) as tmp:
        save_file(state, str(tmp))
    program_error = _export_program(scorer, config.audio.sample_rate, out_dir / artifacts.SCORER_PROGRAM)
    description = {
        "format": SCORER_FORMAT,
        "backbone": info["backbone"],
        "label_columns": info["label_columns"],
        "label_range": info["label_range"],
        "members": len(regressors),
        "folds": sorted({m["fold"] for m in info["members"]}),
        "sample_rate": config.audio.sample_rate,
        "input": "mono float32 waveform at sample_rate, shape (batch, samples)",
        "inference_chunk_method": config.prediction.inference_chunk_method,
        "inference_chunk_seconds": config.prediction.inference_chunk_seconds,
        "max_inference_chunk_seconds": config.prediction.max_inference_chunk_seconds,
        "feature_parameters": info["feature_parameters"],
        "program": artifacts.SCORER_PROGRAM if program_error is None else None,
        "program_error": program_error,
    }
    atomic_write_text(out_dir / "README.md", _scorer_readme(description))

    # The folder must load and agree with the model it came from.
    probe = (0.1 * np.sin(2 * np.pi * 440 * np.arange(2 * config.audio.sample_rate) / config.audio.sample_rate)).astype(np.float32)
    atomic_write_text(out_dir / artifacts.SCORER_INFO, json.dumps(description, indent=2))  # last: the folder is finished
    loaded = Scorer(out_dir, device="cpu").score_waveform(probe)
    with torch.inference_mode():
        direct = scorer(torch.from_numpy(probe)[None])[0].numpy()
    if not np.allclose(loaded, direct, atol=1e-4):
        (out_dir / artifacts.SCORER_INFO).unlink()
        raise CoughPipelineError(f"{out_dir}: the exported scorer disagrees with the trained model ({loaded} vs {direct})")
    log.info("export: scorer (%d models, %s) -> %s", len(regressors), info["backbone"], out_dir)
    return ExportResult(out_dir, provenance_path, None if program_error else out_dir / artifacts.SCORER_PROGRAM)


def _scorer_readme(description: dict) -> str:
    labels = ", ".join(description["label_columns"])
    program = (
        "`scorer.pt2` needs only torch:\n\n```python\nimport torch\nprogram = torch.export.load('scorer.pt2').module()\n"
        f"scores = program(waveform)  # (batch, samples) float32 at {description['sample_rate']} Hz -> (batch, labels)\n```\n"
        if description["program"]
        else "No `scorer.pt2` for this backbone (torch.export failed); use the Python scorer.\n"
    )
    return f"""# Scoring pipeline

Predicts {labels} (range {description['label_range']}) from raw audio with {description['members']} {description['backbone']}
model(s) averaged. Input: mono audio at {description['sample_rate']} Hz; long audio is cut into
{description['inference_chunk_seconds']:g} s chunks whose scores are averaged (up to {description['max_inference_chunk_seconds']:g} s).

```bash
python pipeline.py score --scorer <this folder> recording.webm other.ogg
```

```python
from coughreg.score import load_scorer
scorer = load_scorer("<this folder>")
scorer.score_file("recording.webm")   # {{'{description['label_columns'][0]}': 0.93}}
```

{program}"""
