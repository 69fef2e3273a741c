from pl_pathsgd.experiments.runner import main

if __name__ == "__main__":  # not when a --jobs worker process imports the main module
    main()
