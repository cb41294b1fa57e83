"""expo_engine: ExPO model extrapolation, streamed with bounded memory.

    theta_expo = theta_aligned + alpha * (theta_aligned - theta_sft)
"""

__version__ = "0.1.0"

from .api import Summary, SweepSummary, extrapolate, extrapolate_sweep, scale_adapter  # noqa: E402
from .errors import (  # noqa: E402
    ExpoError,
    FormatError,
    InputChangedError,
    MismatchError,
    OptionError,
    OutputError,
    RewardError,
    SourceError,
)
from .norms import parameter_norms  # noqa: E402
from .plan import Plan, make_plan  # noqa: E402
from .search import search  # noqa: E402
from .sources import Checkpoint, open_checkpoint  # noqa: E402
from .verify import VerifyReport, verify  # noqa: E402

__all__ = [
    "Checkpoint",
    "ExpoError",
    "FormatError",
    "InputChangedError",
    "MismatchError",
    "OptionError",
    "OutputError",
    "Plan",
    "RewardError",
    "SourceError",
    "Summary",
    "SweepSummary",
    "VerifyReport",
    "__version__",
    "extrapolate",
    "extrapolate_sweep",
    "make_plan",
    "parameter_norms",
    "scale_adapter",
    "open_checkpoint",
    "search",
    "verify",
]
