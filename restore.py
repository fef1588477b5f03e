"""Restore images with a trained NVAE as the prior: `python restore.py --checkpoint CKPT --images DIR` (see --help)."""
from nvae.cli import nvae_restore

if __name__ == "__main__":
    nvae_restore()
