"""The experiment config: the user's Hydrogen Torch YAML, read unchanged.

- ``schema``: every key, its type, default and meaning (the Hydrogen Torch keys and the project's own);
- ``loading``: reading a file, ``--set`` overrides, resolving, saving, and the default config;
- ``ownership``: which step owns which key, and how one step's config is put together;
- ``given``: the keys given to a step run (a KFP parameter, or a file and ``--set``), and where from;
- ``reference``: the generated config reference (``docs/config-reference.md``).
"""
