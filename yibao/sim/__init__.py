"""Synthetic traffic and what it is measured against: the traffic generator (``generator``), broken
events for the demo and the tests (``corrupt``), planted anomalies with their ground truth
(``planting``, ``planters*``), and the evaluation of the rules against that truth (``evaluate``).
"""
