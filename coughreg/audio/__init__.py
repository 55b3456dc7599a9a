"""Audio, shared by every stage: files, the mel front end and the recording chain.

- ``files``: what a recording is (container, codec, the duration that decodes), decoding and encoding;
- ``feature_spec``: what a spectrogram depends on (its parameters and their hash), without torch;
- ``frontend``: the log-mel front end, used by the features step and inside the exported scorer;
- ``recording_chain``: gain, band limits, a browser's noise gate, lossy codecs, knocks.
"""
