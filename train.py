"""Train an NVAE: `python train.py fit --config configs/<preset>.yaml` (no arguments: the quickstart)."""
from nvae.cli import main

if __name__ == "__main__":
    main()
