"""Corpus: a factory module whose top level raises while it is imported."""

raise RuntimeError("corpus: this module breaks on import")
