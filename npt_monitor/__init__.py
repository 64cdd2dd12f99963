"""npt-monitor: a live terminal dashboard (Textual) for npt-ds training runs.

It only reads the metric stream ``RUN_DIR/metrics.jsonl`` (one flat JSON object
per line) and imports nothing from npt_ds.  Modules, one job each:

* :mod:`npt_monitor.parsing`    - lines into ``Batch`` records (pure)
* :mod:`npt_monitor.state`      - ``Series``/``RunState``: the records folded per run (pure)
* :mod:`npt_monitor.formatting` - numbers, rates and ETAs as the dashboard writes them
* :mod:`npt_monitor.alerts`     - alert detectors, one module per family (pure; docs/alerts.md)
* :mod:`npt_monitor.run`        - a run = state + alert engine; headless ``check_file``
* :mod:`npt_monitor.tailer`     - follow a growing file in a background thread
* :mod:`npt_monitor.widgets`    - the Textual widgets and screens
* :mod:`npt_monitor.app`        - the Textual app and ``make_app`` factory
* :mod:`npt_monitor.cli`        - ``npt-monitor`` command line (incl. ``--check``)
* :mod:`npt_monitor.synth`      - synthetic metric streams for tests, demos, benchmarks
"""

__version__ = "0.1.0"
