"""The front doors, on top of everything else: what a person runs.

- ``cli``: ``python pipeline.py ...``, every command;
- ``demo``: the README's main job (generated data from a local S3 endpoint, the whole DAG);
- ``local_run``: the whole DAG on this machine through KFP's local runner;
- ``submit``: the pipeline to Kubeflow Pipelines on a cluster, once or on a schedule;
- ``cache_keys``: what KFP's cache key of each task is made of, read from a compiled pipeline;
- ``batch_score``: ``pipeline.py score`` and ``serve`` with scorers and recordings in S3.
"""
