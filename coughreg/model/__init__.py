"""The network, its weights and how it is measured, shared by training, evaluation and export.

- ``network``: a timm image backbone on one-channel log-mel spectrograms, and the raw-audio scorer;
- ``weights``: pretrained backbone weights, fetched once, known by their SHA-256;
- ``metrics``: regression metrics and baselines (scikit-learn's).
"""
