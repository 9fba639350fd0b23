"""Corpus: a factory whose model ends in 5 softmax units, for a job with binary labels (one sigmoid unit)."""

import keras


def build(input_shape, num_classes, **params):
    inputs = keras.Input(shape=input_shape)
    x = keras.layers.Flatten()(inputs)
    return keras.Model(inputs, keras.layers.Dense(5, activation="softmax")(x))
