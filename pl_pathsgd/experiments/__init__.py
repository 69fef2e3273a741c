"""The paper's experiments (Figures 1, 2a and 3): grids of ``pl-pathsgd fit`` runs, tables and figures.

    python -m pl_pathsgd.experiments {figure1,figure2,figure3} --dataset NAME --out DIR [--smoke] [overrides]
    python -m pl_pathsgd.experiments figure2b [--out DIR] [--no-figure]

:class:`CellRecorder` is the callback that turns a ``pl-pathsgd fit`` run into a cell of a sweep;
:class:`FinalCapacityReport` (Figure 1's path-norms after the last epoch) and :class:`PerturbWeights` (Figure 3's
rounding-level control) are callbacks that the figures' configs and cells use.
"""

from pl_pathsgd.experiments.callbacks import FinalCapacityReport, PerturbWeights
from pl_pathsgd.experiments.cell import CellRecorder

__all__ = ["CellRecorder", "FinalCapacityReport", "PerturbWeights"]
