"""Benchmarks of the core heads: ``python -m mhe_plugins.bench heads --num-classes N --dim D --batch B``."""
