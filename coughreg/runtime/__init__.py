"""Facts of the running process, at the bottom of the house (imports only the scoring package).

- ``errors``: the one exception type users see, and its kinds;
- ``images``: container image references;
- ``resources``: CPUs and GPUs this process may use.
"""
