"""``python -m monitor`` == ``npt-monitor``."""

import sys

from .cli import main

sys.exit(main())
