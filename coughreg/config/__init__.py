"""The experiment config: the user's Hydrogen Torch YAML, read unchanged.

- ``experiment``: the config model, loading, ``--set`` overrides, resolving and saving;
- ``ownership``: which step owns which key, and how one step's config is put together.
"""
