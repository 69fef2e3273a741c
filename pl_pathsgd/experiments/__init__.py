"""The paper's experiments (Figures 1, 2a and 3): grids of ``pl-pathsgd fit`` runs, tables and figures.

    python -m pl_pathsgd.experiments {figure1,figure2,figure3} --dataset NAME --out DIR [--smoke] [overrides]
"""
