"""Pure alert detectors over the metric stream (shared by ``--check`` and the app), one module per family;
their exact definitions are in ``docs/alerts.md``."""
from .base import ERROR, FAILING, INFO, KINDS, WARNING, Alert, AlertConfig
from .engine import AlertEngine
from .loss_shape import periodicity
from .stall import stall_alert, stall_bound

__all__ = ["Alert", "AlertConfig", "AlertEngine", "ERROR", "WARNING", "INFO", "KINDS", "FAILING", "periodicity",
           "stall_alert", "stall_bound"]
