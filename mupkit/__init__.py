"""mupkit: hyperparameter transfer across width for PyTorch models.

``mupkit.build(make, base=..., target=...)`` infers which dims scale with width, initializes
the target model per muP (Tensor Programs V) and attaches a :class:`Plan`;
``mupkit.param_groups(model)`` gives optimizer groups with per-parameter multipliers, which
``mupkit.optim.Adam``/``AdamW``/``SGD`` apply each step.
"""

from . import models, nn, optim, unit
from .bsh import load_bsh, save_bsh
from .build import build, parametrize, plan_from_base_shapes
from .forward_checks import ForwardScalingWarning
from .infer import NoDepthRuleWarning, TraceWarning, infer_plan
from .coord_check import CoordCheck, coord_check
from .explain import explain
from .groups import muon_param_groups, param_groups
from .plan import ParamSpec, Plan, plan_of
from .roles import Role
from .rules import FAMILIES, PARAMETRIZATIONS

__version__ = "0.1.0"

__all__ = ["CoordCheck", "FAMILIES", "ForwardScalingWarning", "NoDepthRuleWarning", "TraceWarning", "PARAMETRIZATIONS", "ParamSpec", "Plan", "Role", "build",
           "coord_check", "explain", "infer_plan", "load_bsh", "models", "muon_param_groups", "nn", "optim", "param_groups", "parametrize",
           "plan_from_base_shapes", "plan_of", "save_bsh", "unit"]
