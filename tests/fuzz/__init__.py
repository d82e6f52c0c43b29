"""The fuzz harness (fuzz/) and the inputs it found, replayed."""
