"""Evaluate a trained NVAE: `python evaluate.py nll|fid|recon --checkpoint CKPT` (see --help)."""
from nvae.entry import evaluate

if __name__ == "__main__":
    evaluate()
