"""Corpus: a factory that raises when it is called."""


def build(input_shape, num_classes, **params):
    raise RuntimeError("corpus: the factory gave up")
