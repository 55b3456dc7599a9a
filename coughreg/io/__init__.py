"""Storage and files, below every stage: URIs, S3, sources, data versions, atomic writes.

- ``storage``: ``s3://``, ``file://`` and plain paths, the S3 client, atomic local writes;
- ``retry_budget``: S3 outages waited out for a bounded time;
- ``sources``: a zip or a folder, local or in S3, as a flat list of safe relative names;
- ``data_version``: the content identity of a data set URI (what makes new data a cache miss);
- ``local_s3``: a real S3-compatible endpoint on 127.0.0.1, for the demo and the tests;
- ``html_page``: self-contained HTML pages (pictures and sounds embedded).
"""
