"""How well does mplslb balance? A study over a grid of scenarios, with plots and a Markdown report.

``mplslb study`` (see :mod:`mplslb.study.report`) runs the queue-level simulator (:mod:`mplslb.study.queueing`,
mplslb's own algorithm and pool objects fed with session starts and ends) over scenarios, policies, loads and
seeds, measures in the frame-level simulator (:mod:`mplslb.study.consistency`) whether sessions keep their server
through pool changes, and writes ``study.md`` with its figures. :mod:`mplslb.study.metrics` holds the statistics.
"""
