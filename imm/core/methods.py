"""The training objectives behind `loss.objective`, one module each (FastGen's shape): the registry is the
list of choices."""

from __future__ import annotations

from imm.core.consistency import ICTObjective
from imm.core.meanflow import MeanFlowObjective
from imm.core.objective import FMObjective, IMMObjective

OBJECTIVES = {"imm": IMMObjective, "fm": FMObjective, "meanflow": MeanFlowObjective, "ict": ICTObjective}
