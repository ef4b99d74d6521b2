"""`python -m cytosae ...` runs the command line (also what `torchrun -m cytosae extract ...` needs)."""
from cytosae.cli import main

if __name__ == "__main__":  # pragma: no cover - entry point
    main()
