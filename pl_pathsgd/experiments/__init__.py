"""The paper's experiments (Figures 1, 2a and 3): grids of ``pl-pathsgd fit`` runs, tables and figures.

    python -m pl_pathsgd.experiments {figure1,figure2,figure3} --dataset NAME --out DIR [--smoke] [overrides]

:class:`CellRecorder` is the callback that turns a ``pl-pathsgd fit`` run into a cell of a sweep.
"""

from pl_pathsgd.experiments.cell import CellRecorder

__all__ = ["CellRecorder"]
