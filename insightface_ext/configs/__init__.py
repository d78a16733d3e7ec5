"""Bundled configs (python modules defining ``config``), loaded by name with ``load_config``."""
