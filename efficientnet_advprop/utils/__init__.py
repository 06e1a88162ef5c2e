"""Small helpers every layer of the package may use (they import nothing of it): the
progress bar and the TFRecord container's framing and checksums."""
