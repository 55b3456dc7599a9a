"""The scoring pipeline: raw audio in, label values out. Self-contained on purpose.

Nothing here imports the rest of ``coughreg`` (or timm, kfp, pydantic): the export step copies this
package into every scorer folder as ``coughscore``, where it runs with torch, numpy and PyAV alone
(pandas and pyarrow for tables). The product imports the very same modules, so the evaluation step,
``pipeline.py score``, the HTTP service and the folder's own ``score.py`` share one policy:

- ``decode``: any audio PyAV reads, mixed to mono, resampled with FFmpeg's band-limited resampler;
- ``policy``: fixed chunks of ``inference_chunk_seconds`` up to ``max_inference_chunk_seconds``, a
  chunk shorter than the network's minimum padded with digital silence, chunk scores averaged by length;
- ``scorer``: a scorer folder loaded (its program checked against its recorded SHA-256);
- ``inputs``, ``table``, ``cli``: files, folders and globs in, one row per input out;
- ``filenames``, ``outputs``, ``readback``: temporary names that fit any file system, output paths checked
  before work starts, and one loader per format for every file read back (none runs code), which the
  whole product uses;
- ``server``: the HTTP service (plain and KServe V1 protocol).
"""
