"""Sample images from a trained NVAE: `python sample.py --checkpoint CKPT` (see --help)."""
from nvae.entry import sample

if __name__ == "__main__":
    sample()
