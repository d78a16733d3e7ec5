"""Benchmarks of the core heads (``python -m mhe_plugins.bench heads --num-classes N --dim D --batch B``) and
the kit every benchmark of the adapters is built on.

The kit, one job per module:

* :mod:`.store`: run keys and the committed run store (one JSON per finished run; a rerun with the same
  arguments skips it, even on a fresh machine), plus keyed caches of measurements;
* :mod:`.report`: PARTIAL marking and the .json / .md / .png writers (atomic);
* :mod:`.env`: machine, thread and load recording, thread limits for child processes.
"""
