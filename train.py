"""Train an NVAE: `python train.py fit --config configs/<preset>.yaml` (no arguments: the quickstart)."""
from nvae.cli import nvae_train

if __name__ == "__main__":
    nvae_train()
