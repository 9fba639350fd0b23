"""A job trained by the user's own Keras code (``runner.fit``, or the ``Checkpointing`` callback in their own
``model.fit``) instead of a spec: what its folder's ``code.json`` records, and how a model is told apart from it.

Such a job has no ``spec.yaml``: ``runner work`` cannot build its model or its data, so it never claims it; only
the notebook that trains it resumes it. ``code.json`` holds what a resume must find again (the model's variables
by path and shape, the optimizer's class) and what status shows (the epochs asked for). It is written once when
the job is made, and rewritten (under the lease) only when a later call asks for another number of epochs.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from runner.words import counted

CODE_JOB_KINDS = ("runner.fit", "Checkpointing")


class OwnCode(BaseModel):
    """The content of ``code.json``."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    kind: Literal["runner.fit", "Checkpointing"] = Field(description="which API made the job")
    epochs: int = Field(ge=1, description="the epochs the newest call asked for")
    model: str = Field(description="the model's class and name, for messages")
    variables: tuple[str, ...] = Field(description="every model variable as `name shape`, in the model's order")
    optimizer: str = Field(description="the optimizer's class")
    created_at: float

    def difference(self, other: OwnCode) -> str | None:
        """Why a checkpoint of this job cannot go into ``other``'s model, in one clause; ``None`` if it can."""
        if self.optimizer != other.optimizer:
            return f"its checkpoints hold a {self.optimizer} optimizer, the model is compiled with {other.optimizer}"
        if self.variables == other.variables:
            return None
        before, now = list(self.variables), list(other.variables)
        for index, (old, new) in enumerate(zip(before, now)):
            if old != new:
                return f"variable {index + 1} of its checkpoints is {old}, the model's is {new}"
        if len(before) != len(now):
            return (
                f"its checkpoints hold {counted(len(before), 'model variable')}, the model has {len(now)} "
                f"(first difference: {(before[len(now) :] or now[len(before) :])[0]})"
            )
        return None


def describe_variable(name: str, shape: tuple[int, ...]) -> str:
    """One entry of :attr:`OwnCode.variables`: ``kernel (3, 3, 3, 32)``."""
    return f"{name} {tuple(int(size) for size in shape)}"
