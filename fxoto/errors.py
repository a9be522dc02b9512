"""Every failure fxoto reports on purpose is an ``FxotoError``.

Each message says what was found, where (module path and fx node), and what to
do next.
"""


class FxotoError(Exception):
    """Base class of the errors fxoto raises on purpose."""


class UntraceableModelError(FxotoError):
    """torch.fx could not trace the model (data-dependent control flow, ...)."""


class NoSearchSpaceError(FxotoError):
    """The model has no generalized zero-invariant group (nothing removable)."""


class KTooLargeError(FxotoError):
    """The requested group sparsity K exceeds what a valid removal allows."""


class InvalidRemovalError(FxotoError):
    """A set of zero groups whose erasure would leave the graph invalid."""


class NonFiniteGradientError(FxotoError):
    """A gradient held inf or NaN during an H2SPG step."""


class ExampleInputError(FxotoError, RuntimeError):
    """The example inputs do not run through the model (wrong shape, wrong channel count).

    A ``RuntimeError`` too, as the failing operation's own error was.
    """


class UnknownGroupError(FxotoError, IndexError):
    """A GeZIG id outside ``0 .. len(space.groups) - 1``.

    An ``IndexError`` too, as a list lookup's would be.
    """


class DeviceError(FxotoError):
    """The model's tensors are spread over several devices, or some are on ``meta``."""


class InPlaceError(FxotoError):
    """The sub-network cannot be built in the model's own modules (``construct_subnet(in_place=True)``);
    the model is left as it was."""


class SubnetCheckError(FxotoError):
    """The sub-network fxoto wrote does not run, or does not give the super-network's output
    shapes: a bug in the rewrite, caught before the sub-network is handed out."""
