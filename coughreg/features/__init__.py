"""Step 2, features: accepted recordings -> log-mel Parquet shards that training streams from.

- ``extract``: the shard plan, one worker per core, ParallelFor parts and their collection.
"""
