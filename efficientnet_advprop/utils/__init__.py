"""Small helpers every layer of the package may use (they import nothing of it): the
progress bar, the TFRecord container's framing and checksums, the filter that keeps
TensorFlow's start-up noise off stderr (quiet.py), and the plots both reports share
(plots.py)."""
