"""``python -m gradguard run script.py``: the same as the ``gradguard`` command."""

from __future__ import annotations

import sys

from gradguard.cli import main

if __name__ == "__main__":
    sys.exit(main())
