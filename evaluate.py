"""Evaluate a trained NVAE: `python evaluate.py nll|fid|recon --checkpoint CKPT` (see --help)."""
from nvae.eval_cli import main

if __name__ == "__main__":
    main()
