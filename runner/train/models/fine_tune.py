"""Fine-tuning a pretrained base: after ``at_epoch`` epochs of training the head alone, the top ``layers`` of the
base are unfrozen, and the model is compiled again with a new optimizer at the fine-tune's learning rate.

This is Keras' transfer-learning recipe: trainable flags take effect only at ``compile()``, and an optimizer is
built for the variables it first trains, so a new one is made for the larger set. The BatchNormalization
layers among the unfrozen ones stay frozen, in inference mode, as Keras' EfficientNet fine-tuning example
keeps them: their statistics, learnt on ImageNet, are not overwritten by small batches.

The phase is a function of the epochs done (``epochs >= at_epoch``), so a resumed job needs no state of its own
to know it: the trainer puts the model in the phase of the snapshot before loading its variables, whose
optimizer variables are then the new optimizer's.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras

from runner.networks import PRETRAINED, fine_tune_of, with_defaults
from runner.spec import JobSpec
from runner.train.models.builtin import base_of


@dataclass(frozen=True)
class FineTune:
    """A spec's ``model.params.fine_tune``, its defaults filled in."""

    at_epoch: int
    """Epochs trained with the base frozen; the next one is the first fine-tuned."""
    layers: int | None
    """The base's top layers to unfreeze; ``None``: all of them."""
    learning_rate: float

    @classmethod
    def of(cls, spec: JobSpec) -> FineTune | None:
        """The spec's fine-tune, or ``None`` when it has none."""
        builtin = spec.model.builtin
        if builtin not in PRETRAINED:
            return None
        tune = fine_tune_of(with_defaults(builtin, spec.model.params))
        if tune is None:
            return None
        rate = tune["learning_rate"]
        return cls(
            at_epoch=tune["at_epoch"],
            layers=None if tune["layers"] == "all" else tune["layers"],
            learning_rate=spec.training.learning_rate / 10 if rate is None else float(rate),
        )

    def due(self, epochs_done: int) -> bool:
        """Whether the model is fine-tuned once ``epochs_done`` epochs are done."""
        return epochs_done >= self.at_epoch

    def unfreeze(self, model: keras.Model) -> int:
        """Make the top layers of the base trainable (BatchNormalization excepted); how many became trainable.
        The model must be compiled again for it to count."""
        base = base_of(model)
        base.trainable = True  # Keras 3 sets every layer inside too
        layers = base.layers[1:]  # the InputLayer first
        top = layers if self.layers is None else layers[-self.layers :]
        chosen = {id(layer) for layer in top}
        unfrozen = 0
        for layer in layers:
            keep = id(layer) in chosen and not isinstance(layer, keras.layers.BatchNormalization)
            layer.trainable = keep
            unfrozen += keep
        return unfrozen

    @staticmethod
    def freeze(model: keras.Model) -> None:
        """Freeze the whole base again, as it was built (before ``at_epoch``)."""
        base_of(model).trainable = False
