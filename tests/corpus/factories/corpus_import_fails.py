"""Corpus: a factory module that imports a package that is not installed."""

import runner_corpus_missing_dependency  # noqa: F401


def build(input_shape, num_classes, **params):
    raise AssertionError("never reached: the import fails first")
