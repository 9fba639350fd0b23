"""Stand-in for ``google.colab.errors`` (see the package docstring): the exception the real runtime calls raise."""


class Error(Exception):
    """Base class of Colab's errors."""


class RuntimeManagementError(Error):
    """Raised by ``runtime.unassign()`` when Colab's backend cannot be reached or refuses."""
