"""Train an NVAE: `python train.py fit --config configs/<preset>.yaml` (no arguments: the quickstart)."""
from nvae.entry import train

if __name__ == "__main__":
    train()
