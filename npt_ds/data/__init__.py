"""Data: streaming and prepared token sources with one global cursor, `npt-ds prepare`, and held-out eval data."""
