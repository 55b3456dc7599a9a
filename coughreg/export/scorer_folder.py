"""Step 5, export: the evaluated model -> a scorer folder that stands alone, and where it came from.

The scorer is the features step's ``LogMel`` front end (the same module, the same numbers) in front of
every trained regressor, averaged. The folder needs torch, numpy and PyAV only (pandas and pyarrow for
tables): the network as a frozen TorchScript module (``scorer.ts``: the fastest on CPUs) and as a
``torch.export`` program (``scorer.pt2``), each checked against the eager model on the shortest clip it
will see and on a long one; the scoring package (``coughreg.scoring``, copied as ``coughscore/``) with
its ``score.py``; ``scorer.json`` (labels, ranges, the chunking the evaluation step used, versions, each
file's SHA-256); ``config.yaml``, ``provenance.json``, a README and a pinned ``requirements.txt``.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import warnings
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch

from coughreg import artifacts
from coughreg.artifacts import model_weights_sha256
from coughreg.audio.frontend import LogMel
from coughreg.config.loading import save_config
from coughreg.config.ownership import chain_keys, with_upstream
from coughreg.config.schema import ExperimentConfig
from coughreg.io.storage import atomic_path, atomic_write_bytes, atomic_write_text, sha256_file, staged_folder
from coughreg.model.network import CoughScorer
from coughreg.runtime.errors import CoughPipelineError, StorageError
from coughreg.runtime.names import MODEL_NAME
from coughreg.scoring import policy as scoring_policy
from coughreg.scoring.folder import PROGRAMS, SCORER_FORMAT, SCORER_INFO
from coughreg.scoring.scorer import Scorer
from coughreg.training import load_members

log = logging.getLogger(__name__)

PACKAGE_FOLDER = "coughscore"  # the scoring package inside a scorer folder
SCORER_REQUIREMENTS = ("torch", "numpy", "av", "pandas", "pyarrow")
TOLERANCE = 1e-4  # every program must agree with the eager model this closely


@dataclass
class ExportResult:
    scorer_dir: Path
    provenance_path: Path
    programs: dict[str, str]  # name -> file, the programs that were written


def _package_version(name: str) -> str:
    try:
        return version(name).split("+")[0]  # torch 2.x.y+cu128 -> 2.x.y: any build of that release runs it
    except PackageNotFoundError:
        return "unknown"


def provenance(model_dir: Path, info: dict, run: dict | None, gate: dict | None = None) -> dict:
    """What made a scorer: the run that exported it, the package, the weights' content hashes, the quality gate."""
    return {
        "package": {"name": "coughreg", "version": _package_version("coughreg")},
        "run": run or {},
        "model": {
            "backbone": info["backbone"],
            "seed": info["seed"],
            "shard_set": info.get("shard_set"),
            "weights_sha256": model_weights_sha256(model_dir, info),
        },
        "quality_gate": gate or {},
    }


def _check(program, eager: CoughScorer, policy: scoring_policy.Policy) -> None:
    """The program agrees with the eager model on the shortest input the scorer sends, one clip and several,
    and on a long chunk (AssertionError with the largest difference when not)."""
    rate = policy.sample_rate
    generator = torch.Generator().manual_seed(0)
    shortest = int(policy.min_seconds * rate)
    longest = min(int(policy.chunk_seconds * rate), 30 * rate)
    for shape in ((1, shortest), (3, shortest + 1), (2, int(5.37 * rate)), (1, longest)):
        waveform = torch.randn(*shape, generator=generator) * 0.1
        with torch.inference_mode():
            difference = (program(waveform) - eager(waveform)).abs().max().item()
        assert difference <= TOLERANCE, f"differs from the eager model by {difference:.2e} on a {tuple(shape)} input"


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _torchscript(eager: CoughScorer, policy: scoring_policy.Policy, path: Path) -> None:
    """Traced and frozen (weights become constants); the loader optimizes it for inference on the machine that
    runs it (batch norm folded into convolutions, oneDNN kernels), which a saved file cannot carry."""
    from coughreg.scoring.scorer import load_torchscript

    example = torch.randn(2, int(3 * policy.sample_rate)) * 0.1
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated; still the fastest on CPUs here
        frozen = torch.jit.freeze(torch.jit.trace(eager, (example,), check_trace=False).eval())
        with atomic_path(path) as tmp:
            torch.jit.save(frozen, str(tmp))
            _check(load_torchscript(tmp), eager, policy)  # as a scorer loads it


def _exported_program(eager: CoughScorer, policy: scoring_policy.Policy, path: Path) -> None:
    """A torch.export program with a dynamic batch and length (at least the policy's shortest chunk)."""
    from torch.export import Dim, export

    rate = policy.sample_rate
    samples = Dim("samples", min=int(policy.min_seconds * rate), max=int(policy.max_seconds * rate) + rate)
    example = torch.randn(2, int(3 * rate)) * 0.1  # batch 2: a batch of 1 would be baked in
    program = export(eager, (example,), dynamic_shapes={"waveform": {0: Dim("batch", min=1, max=1024), 1: samples}})
    _check(program.module(), eager, policy)
    buffer = io.BytesIO()  # torch.export names its archive by the file's suffix: written whole, then moved in place
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "No complete tensor found in the group": CPU weights, as meant
        torch.export.save(program, buffer)
    atomic_write_bytes(path, buffer.getvalue())


PROGRAM_WRITERS = {"torchscript": _torchscript, "export": _exported_program}


def _copy_package(out_dir: Path) -> list[str]:
    """The scoring package as ``coughscore/`` and its ``score.py``; the files written, relative to the folder."""
    source = Path(scoring_policy.__file__).parent
    target = out_dir / PACKAGE_FOLDER
    if target.exists():
        shutil.rmtree(target)
    target.mkdir()
    written = []
    for module in sorted(source.glob("*.py")):
        shutil.copyfile(module, target / module.name)
        written.append(f"{PACKAGE_FOLDER}/{module.name}")
    atomic_write_text(out_dir / "score.py", SCORE_PY)
    return [*written, "score.py"]


SCORE_PY = '''#!/usr/bin/env python3
"""Score recordings with the scorer in this folder (needs torch, numpy, av; pandas and pyarrow for tables).

    python score.py INPUT... [--out scores.csv|scores.parquet] [--workers N]
    python score.py serve [--host 0.0.0.0] [--port 8080]

See README.md.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from coughscore.cli import main  # noqa: E402 - after the folder is on the path

if __name__ == "__main__":
    sys.exit(main(folder=Path(__file__).resolve().parent))
'''


def export(model_dir: str | Path, evaluation_dir: str | Path, out_dir: str | Path, config: ExperimentConfig,
           run: dict | None = None) -> ExportResult:
    """Write the scorer folder (when ``training.build_scoring_pipelines``) and its provenance.

    Every input is read and checked before anything is written, and the folder is built beside
    ``out_dir`` and moved in only when whole (``coughreg.io.storage.staged_folder``): an export that fails
    (a model folder whose training did not finish, a damaged weights file, a full disk) writes nothing.

    Args:
        model_dir: the train step's output; the network is rebuilt from the config saved beside it.
        evaluation_dir: the evaluate step's output for that model: its config holds the chunking the
            scorer applies, its metrics the quality gate's verdict.
        out_dir: the export artifact folder.
        config: the export step's keys (``training.build_scoring_pipelines``).
        run: what identifies the run (pipeline name, artifact URI, image), recorded in ``provenance.json``.

    Raises:
        CoughPipelineError: the model folder is not a finished train output (naming the missing or damaged
            file), the evaluation is of another model, or no program agrees with the model.
    """
    model_dir, evaluation_dir, out_dir = Path(model_dir), Path(evaluation_dir), Path(out_dir)
    config = with_upstream(config, "export", artifacts.read_config(evaluation_dir, "evaluate"))
    info = artifacts.read_model_info(model_dir)
    metrics = artifacts.read_json(evaluation_dir, artifacts.METRICS, "evaluate")
    if metrics.get("model_weights_sha256") != model_weights_sha256(model_dir, info):
        raise CoughPipelineError(f"{evaluation_dir}: this evaluation is of another model than {model_dir}; "
                                 "pass the evaluate output of the same run")
    gate = metrics.get("quality_gate", {})
    if gate and not gate.get("passed"):
        log.warning("export: the model did not pass the quality gate (%s); exporting it as asked", gate.get("message"))
    build = config.training.build_scoring_pipelines
    regressors = load_members(model_dir) if build else []
    programs: dict[str, str] = {}
    with staged_folder(out_dir, SCORER_INFO) as staging:
        save_config(config, staging, chain_keys("export"))
        atomic_write_text(staging / artifacts.PROVENANCE, json.dumps(provenance(model_dir, info, run, gate), indent=2))
        if build:
            eager = CoughScorer(LogMel.from_config(config.audio), regressors).eval()
            facts = {"backbone": info["backbone"], "label_columns": info["label_columns"], "label_range": info["label_range"],
                     "folds": sorted({m["fold"] for m in info["members"]}), "feature_parameters": info["feature_parameters"]}
            programs = write_scorer(eager, config, staging, facts)
    if build:
        log.info("export: scorer (%d models, %s; %s) -> %s", len(regressors), info["backbone"], ", ".join(programs.values()), out_dir)
    else:
        log.info("training.build_scoring_pipelines is false: no scorer exported")
    return ExportResult(out_dir, out_dir / artifacts.PROVENANCE, programs)


def write_scorer(eager: CoughScorer, config: ExperimentConfig, out_dir: Path, facts: dict) -> dict[str, str]:
    """The scorer folder for an eager scorer: programs, the scoring package, ``scorer.json`` (written last), README
    and requirements, each program checked against ``eager``; returns the programs written (name -> file).

    Args:
        facts: what ``scorer.json`` says of the model (``backbone``, ``label_columns``, ``label_range``, ``folds``,
            ``feature_parameters``).
    """
    policy = scoring_policy.Policy(config.audio.sample_rate, config.prediction.inference_chunk_seconds,
                                   config.prediction.max_inference_chunk_seconds)
    programs, errors = {}, {}
    for name, writer in PROGRAM_WRITERS.items():
        path = out_dir / PROGRAMS[name]
        try:
            writer(eager, policy, path)
            programs[name] = path.name
        except StorageError:  # a full disk is not a backbone the compiler cannot take
            raise
        except Exception as exc:  # noqa: BLE001 - a backbone one compiler cannot take may still work with the other
            errors[name] = _first_line(exc)
            log.warning("%s not written: %s", path.name, errors[name])
    if not programs:
        raise CoughPipelineError(f"backbone {facts['backbone']}: neither TorchScript nor torch.export can compile it "
                                 f"({'; '.join(f'{k}: {v}' for k, v in errors.items())}); choose another architecture.backbone")
    written = [*programs.values(), *_copy_package(out_dir)] + ([artifacts.CONFIG] if (out_dir / artifacts.CONFIG).exists() else [])
    atomic_write_text(out_dir / "requirements.txt", _requirements())
    description = {
        "format": SCORER_FORMAT,
        "model_name": MODEL_NAME,
        "backbone": facts["backbone"],
        "label_columns": facts["label_columns"],
        "label_range": facts["label_range"],
        "members": len(eager.regressors),
        "folds": facts["folds"],
        "sample_rate": policy.sample_rate,
        "input": "mono float32 waveform at sample_rate, shape (batch, samples), samples >= min_seconds * sample_rate",
        "inference_chunk_method": config.prediction.inference_chunk_method,
        "inference_chunk_seconds": policy.chunk_seconds,
        "max_inference_chunk_seconds": policy.max_seconds,
        "min_seconds": policy.min_seconds,
        "feature_parameters": facts["feature_parameters"],
        "programs": programs,
        "program_errors": errors,
        "versions": {name: _package_version(name) for name in ("coughreg", *SCORER_REQUIREMENTS)},
        "files": {name: sha256_file(out_dir / name) for name in sorted(written)},
    }
    atomic_write_text(out_dir / "README.md", scorer_readme(description))
    atomic_write_text(out_dir / SCORER_INFO, json.dumps(description, indent=2))  # last: the folder is finished
    _verify(out_dir, eager, policy)
    return programs


def _verify(out_dir: Path, eager: CoughScorer, policy: scoring_policy.Policy) -> None:
    """The folder, loaded as a user loads it, scores a 2 s tone as the model does."""
    rate = policy.sample_rate
    probe = (0.1 * np.sin(2 * np.pi * 440 * np.arange(2 * rate) / rate)).astype(np.float32)

    def direct(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return eager(torch.from_numpy(batch)).numpy()

    expected, _ = scoring_policy.score_samples(direct, probe, policy)
    for program in Scorer(out_dir).info["programs"]:
        loaded, _ = Scorer(out_dir, program).score_samples(probe)
        if not np.allclose(loaded, expected, atol=TOLERANCE):
            (out_dir / SCORER_INFO).unlink()
            raise CoughPipelineError(f"{out_dir}: the exported {program} program disagrees with the trained model ({loaded} vs {expected})")


def _requirements() -> str:
    lines = [f"{name}=={_package_version(name)}" for name in SCORER_REQUIREMENTS]
    return "# What score.py needs (pandas and pyarrow only for tables): the versions this scorer was exported with.\n" + "\n".join(lines) + "\n"


def scorer_readme(description: dict) -> str:
    labels = ", ".join(description["label_columns"])
    first = description["label_columns"][0]
    return f"""# Scoring pipeline: {labels} from raw audio

{description['members']} {description['backbone']} model(s), averaged, predict {labels} (range {description['label_range']}).
This folder stands alone: it needs Python 3.10+ with torch, numpy and PyAV (`av`), plus pandas and
pyarrow for tables (`pip install -r requirements.txt`); not the training package.

## Score files

```bash
python score.py recording.webm other.ogg some/folder/ 'incoming/*.mp3' --out scores.csv   # or scores.parquet
```

One row per input: `path`, {", ".join(f"`{label}`" for label in description["label_columns"])}, `duration_s`, `n_chunks`,
`truncated`, `status` (`ok` or `failed`) and `reason`. A folder is read recursively (every non-hidden
file); a file that is not audio is a `failed` row, never a crash. Without `--out` the table goes to
standard output; progress goes to standard error. Exit status: 0 every recording scored, 1 some
failed, 2 unusable arguments.

## Serve over HTTP

```bash
python score.py serve --host 0.0.0.0 --port 8080
curl --data-binary @recording.webm http://127.0.0.1:8080/score     # {{"{first}": 0.93, "duration_s": ..., "n_chunks": 1, ...}}
```

`GET /healthz` answers 200 once the model is loaded; KServe's V1 protocol is served at
`/v1/models/{description['model_name']}:predict` with `{{"instances": [{{"b64": "<audio bytes, base64>"}}]}}`.

## How a recording is scored

Any audio FFmpeg reads (WebM/Opus, Ogg, MP3, WAV, FLAC, M4A) is decoded, mixed to mono and resampled
to {description['sample_rate']} Hz. The first {description['max_inference_chunk_seconds']:g} s are cut into
{description['inference_chunk_seconds']:g} s chunks (a tail under a quarter chunk joins the chunk before);
a chunk under {description['min_seconds']:g} s is padded with silence; the chunk scores are averaged weighted
by length. The evaluation step scored the validation recordings with this very code.

## In Python

```python
from coughscore.scorer import Scorer            # with this folder on sys.path
scorer = Scorer(".")
scorer.score_file("recording.webm")             # {{'{first}': 0.93}}
```

The programs take a (batch, samples) float32 waveform and return (batch, labels):
`torch.jit.load("scorer.ts")` or `torch.export.load("scorer.pt2").module()`. `scorer.json` records
the labels, the chunking, the versions and every file's SHA-256 (checked when the folder loads);
`provenance.json` the run, the model's weights and the quality gate.
"""
