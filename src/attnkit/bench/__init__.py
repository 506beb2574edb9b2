"""``attnkit bench``: every mechanism and backend measured side by side on this machine.

Layout (one concept per file):

* ``case.py`` -- what a case is (:class:`~attnkit.bench.case.Case`, ``Runner``); providers in
  ``cases/<family>.py`` expose ``cases()``; ``discover.py`` finds them (a broken one is recorded);
* ``suites.py`` -- suites as data (quick, default, masks, scaling, full);
* ``harness.py`` -- plan comparisons, run them in the worker, record; ``client.py``/``worker.py`` --
  an idle zygote that forks a child per job (timeouts, crashes and OOM stay contained; fresh-process
  peak memory); ``timing.py`` -- interleaved rounds, medians; ``memory.py``; ``machine.py`` (roof);
* ``flops.py`` -- LongCA-bench's FLOP accounting; ``results.py`` -- the JSONL file (append, resume);
* ``analysis.py``, ``plots.py``, ``report.py`` -- speedups, crossovers, report.md/.html/PNGs;
  ``compare.py`` -- regressions between two runs; ``live.py`` -- the terminal view.

Example:
    >>> from attnkit.bench.harness import BenchOptions, Harness
    >>> from attnkit.bench.report import write_reports
    >>> Harness(BenchOptions(suite="quick", out="bench-quick")).run()
    >>> write_reports("bench-quick")
"""
