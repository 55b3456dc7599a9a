"""Generated data: the demo's embedded default and the tests' fixture.

- ``coughvid``: COUGHVID-format recordings and metadata whose labels follow a known law.
"""
