"""The pre-settlement check (事前提示): hospitals ask, before settling, which rules a settlement would trip.

``check`` judges (pure), ``routing`` knows which worker holds which partition, ``server`` is the HTTP
API, ``openapi`` its document.
"""

from .check import Answer, Hit, Invalid, Prechecker, Prepared
from .routing import Owners, strategies
from .server import PrecheckLog, PrecheckServer, forward_key

__all__ = ["Answer", "Hit", "Invalid", "Owners", "PrecheckLog", "PrecheckServer", "Prechecker", "Prepared",
           "forward_key", "strategies"]
