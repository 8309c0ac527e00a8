"""`python -m dist_train.gpu_check`."""

from dist_train.gpu_check.cli import main

if __name__ == "__main__":
    main()
