"""fxoto: automatic sub-network search inside any PyTorch super-network (OTOv3, on torch.fx)."""

from fxoto.errors import (
    DeviceError,
    ExampleInputError,
    FxotoError,
    InvalidRemovalError,
    KTooLargeError,
    NoSearchSpaceError,
    NonFiniteGradientError,
    UnknownGroupError,
    UntraceableModelError,
)
from fxoto.optimizer import H2SPG, half_space_project, redundancy_score
from fxoto.roles import DEFAULT_TABLE, Channel, Joint, OpRule, OpTable, Role, Zero
from fxoto.search import Search, build_space, search
from fxoto.space import GeZIG, Member, SearchSpace

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_TABLE", "Channel", "DeviceError", "ExampleInputError", "FxotoError", "GeZIG", "H2SPG", "half_space_project", "redundancy_score", "InvalidRemovalError", "Joint",
    "KTooLargeError", "Member", "NoSearchSpaceError", "NonFiniteGradientError", "OpRule",
    "OpTable", "Role", "Search", "SearchSpace", "UnknownGroupError", "UntraceableModelError", "Zero",
    "build_space", "search",
]
