"""`python -m dist_train ...` (also what torchrun workers run)."""

from dist_train.cli.main import main

if __name__ == "__main__":
    main()
