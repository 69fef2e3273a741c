from pl_pathsgd.experiments.runner import main

main()
