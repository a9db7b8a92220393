"""python -m passtctl."""

from __future__ import annotations

import sys

from passtctl.cli import main

sys.exit(main())
