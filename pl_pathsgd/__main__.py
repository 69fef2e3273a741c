"""``python -m pl_pathsgd`` runs the ``pl-pathsgd`` command line."""

from pl_pathsgd.cli import main

if __name__ == "__main__":
    main()
