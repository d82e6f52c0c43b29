"""Tests of the application layer (yibao/): the CLI, simulator and evaluation, report, logging,
access, local servers."""
