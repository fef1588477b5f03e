"""Evaluate a trained NVAE: `python evaluate.py nll|fid|recon --checkpoint CKPT` (see --help)."""
from nvae.cli import nvae_eval

if __name__ == "__main__":
    nvae_eval()
