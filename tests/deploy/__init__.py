"""Tests of what operators run (deploy/): compose, Kubernetes, systemd, alert rules and dashboards."""
