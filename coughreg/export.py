"""Step 5, export: the trained model -> a scoring pipeline that takes raw audio, and the compiled DAG.

The scorer is the features step's ``LogMel`` front end (the same module, the same numbers) in
front of every trained regressor, saved as safetensors with a description and the config; when
the backbone allows it a ``torch.export`` program (``scorer.pt2``) is written too, which needs
nothing but torch. Beside it lands the compiled KFP pipeline (``pipeline.yaml``) of this config.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from coughreg.config import PROJECT_ROOT, ExperimentConfig, save_config
from coughreg.errors import CoughPipelineError
from coughreg.frontend import LogMel
from coughreg.model import CoughScorer
from coughreg.score import SCORER_FORMAT, SCORER_INFO, SCORER_PROGRAM, SCORER_WEIGHTS, Scorer
from coughreg.storage import atomic_path, atomic_write_text
from coughreg.train import MODEL_INFO, load_members

log = logging.getLogger(__name__)

PIPELINE_FILE = "pipeline.yaml"


@dataclass
class ExportResult:
    scorer_dir: Path
    pipeline_path: Path
    program_path: Path | None


def pipeline_file() -> Path:
    """``pipeline.py`` of the checkout, or of the image's working directory (/app)."""
    for candidate in (PROJECT_ROOT / "pipeline.py", Path.cwd() / "pipeline.py", Path("/app/pipeline.py")):
        if candidate.exists():
            return candidate
    raise CoughPipelineError("pipeline.py not found beside the package or in the working directory")


def load_pipeline_module():
    """Import ``pipeline.py`` (the DAG) as a module."""
    candidate = pipeline_file()
    spec = importlib.util.spec_from_file_location("coughreg_pipeline_definition", candidate)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def compile_in_subprocess(path: Path, config_path: Path) -> None:
    """Compile the DAG in a fresh interpreter: inside a running component KFP loads only its runtime half."""
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "_KFP_RUNTIME"}
    script = pipeline_file()
    done = subprocess.run(
        [sys.executable, str(script), "compile", "-o", str(path), "--config", str(config_path)],
        cwd=script.parent, env=env, capture_output=True, text=True, timeout=600,
    )
    if done.returncode != 0:
        raise CoughPipelineError(f"compiling {script} failed: {done.stderr.strip().splitlines()[-1:]}")


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


def export(model_dir: str | Path, out_dir: str | Path, config: ExperimentConfig) -> ExportResult:
    """Write the scorer folder (when ``training.build_scoring_pipelines``) and the compiled pipeline.

    Args:
        model_dir: the train step's output.
        out_dir: the export artifact folder.
        config: the resolved experiment config.
    """
    from safetensors.torch import save_file

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipeline_path = out_dir / PIPELINE_FILE
    config_path = save_config(config, out_dir)
    compile_in_subprocess(pipeline_path, config_path)
    if not config.training.build_scoring_pipelines:
        log.info("training.build_scoring_pipelines is false: only the compiled pipeline is exported")
        return ExportResult(out_dir, pipeline_path, None)

    info = json.loads((model_dir / MODEL_INFO).read_text())
    regressors = load_members(model_dir, config)
    scorer = CoughScorer(LogMel.from_config(config.audio), regressors).eval()
    state = {k: v.detach().contiguous().cpu() for k, v in scorer.state_dict().items()}
    with atomic_path(out_dir / SCORER_WEIGHTS) as tmp:
        save_file(state, str(tmp))
    program_error = _export_program(scorer, config.audio.sample_rate, out_dir / SCORER_PROGRAM)
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
        "program": SCORER_PROGRAM if program_error is None else None,
        "program_error": program_error,
    }
    atomic_write_text(out_dir / SCORER_INFO, json.dumps(description, indent=2))
    atomic_write_text(out_dir / "README.md", _scorer_readme(description))

    # The folder must load and agree with the model it came from.
    probe = (0.1 * np.sin(2 * np.pi * 440 * np.arange(2 * config.audio.sample_rate) / config.audio.sample_rate)).astype(np.float32)
    loaded = Scorer(out_dir, device="cpu").score_waveform(probe)
    with torch.inference_mode():
        direct = scorer(torch.from_numpy(probe)[None])[0].numpy()
    if not np.allclose(loaded, direct, atol=1e-4):
        raise CoughPipelineError(f"{out_dir}: the exported scorer disagrees with the trained model ({loaded} vs {direct})")
    log.info("export: scorer (%d models, %s) and pipeline -> %s", len(regressors), info["backbone"], out_dir)
    return ExportResult(out_dir, pipeline_path, None if program_error else out_dir / SCORER_PROGRAM)


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
