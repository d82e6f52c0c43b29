"""``python -m yibao.cli``: the same command as ``yibao``."""

from . import main

main()
