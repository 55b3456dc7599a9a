"""One thin KFP component per step; the work is done by plain Python in ``coughreg``."""
