"""fxoto: automatic sub-network search inside any PyTorch super-network (OTOv3, on torch.fx)."""

from fxoto.errors import (
    DeviceError,
    ExampleInputError,
    FxotoError,
    InvalidRemovalError,
    KTooLargeError,
    NoSearchSpaceError,
    NonFiniteGradientError,
    SubnetCheckError,
    UnknownGroupError,
    UntraceableModelError,
)
from fxoto.distributed import DistributedSetupError, RankMismatchError
from fxoto.optimizer import H2SPG, GroupStats, half_space_project, redundancy_score, reference_score
from fxoto.roles import DEFAULT_TABLE, Channel, Joint, OpRule, OpTable, Role, Zero
from fxoto.search import Search, build_space, search
from fxoto.space import GeZIG, Member, SearchSpace
from fxoto.train import MixedPrecisionError

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_TABLE", "Channel", "DeviceError", "DistributedSetupError", "ExampleInputError", "FxotoError", "GeZIG",
    "GroupStats", "H2SPG", "InvalidRemovalError", "Joint", "KTooLargeError", "Member", "MixedPrecisionError",
    "NoSearchSpaceError", "NonFiniteGradientError", "OpRule", "OpTable", "RankMismatchError", "Role", "Search",
    "SearchSpace", "SubnetCheckError", "UnknownGroupError", "UntraceableModelError", "Zero", "build_space",
    "half_space_project", "redundancy_score", "reference_score", "search",
]
