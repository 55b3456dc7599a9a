"""Cough-audio regression on Kubeflow Pipelines: the command line (and, with the DAG, the pipeline).

Steps:
    1. ingest    - a COUGHVID or Hydrogen Torch data set from S3 (zip or prefix) or disk
                   -> manifest.parquet + the accepted recordings
    2. features  - recordings -> log-mel Parquet spectrogram shards

Usage:
    python pipeline.py config [--config FILE] [--set section.key=value]...
    python pipeline.py generate --out data.zip -n 200
    python pipeline.py step ingest --input s3://bucket/coughvid.zip --out out/ingest
    python pipeline.py step features --input out/ingest --out out/features
"""

import sys

from coughreg.cli import main

if __name__ == "__main__":
    sys.exit(main())
