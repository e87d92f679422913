"""Importable actor classes that the configuration tests name in ``class = "..."``."""
