"""Step 1, ingestion: a data set in S3 or on disk -> ``manifest.parquet`` + the accepted recordings.

- ``manifest``: layouts (COUGHVID, Hydrogen Torch), probing every recording, the manifest;
- ``quality_report``: the data-quality page (counts by status and reason, labels, durations).
"""
