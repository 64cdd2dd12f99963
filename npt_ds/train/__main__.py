"""`deepspeed --module npt_ds.train --config RECIPE.yaml [key.path=value ...]` (and `python -m npt_ds.train`)."""
import sys

from .run import main

sys.exit(main())
