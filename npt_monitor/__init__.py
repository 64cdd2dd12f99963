"""npt-monitor: a live terminal dashboard (Textual) for npt-ds training runs.

It only reads the metric stream ``RUN_DIR/metrics.jsonl`` (one flat JSON object
per line).  Modules, one job each:

* :mod:`monitor.stream`  - parse lines, ``Batch``/``Series``/``RunState`` model (pure)
* :mod:`monitor.alerts`  - alert detectors and their exact definitions (pure)
* :mod:`monitor.run`     - a run = state + alert engine; headless ``check_file``
* :mod:`monitor.tailer`  - follow a growing file in a background thread
* :mod:`monitor.widgets` - the Textual widgets and screens
* :mod:`monitor.app`     - the Textual app and ``make_app`` factory
* :mod:`monitor.cli`     - ``npt-monitor`` command line (incl. ``--check``)
* :mod:`monitor.synth`   - synthetic metric streams for tests, demos, benchmarks
"""

__version__ = "0.1.0"
