"""Tests of the stream processing (streams/): validation, processors, privacy, the checkpoint, monitors, rules."""
