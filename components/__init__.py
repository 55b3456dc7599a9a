"""One thin KFP component per step; the work is done by plain Python in ``coughreg``.

The images carry the pinned ``kfp`` (``requirements.txt``), so no component installs anything when its pod starts.
"""
