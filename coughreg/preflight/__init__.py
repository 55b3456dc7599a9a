"""Step 0, preflight: everything that can be known before a recording is downloaded.

- ``checks``: the config, the data's version, output locations, GPUs and pretrained weights.
"""
