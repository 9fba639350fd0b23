"""Corpus: a factory that does not take the keyword arguments runner passes (input_shape, num_classes, params)."""


def build(shape):
    raise AssertionError("never reached: the call fails first")
