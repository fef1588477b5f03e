"""Sample images from a trained NVAE: `python sample.py --checkpoint CKPT` (see --help)."""
from nvae.cli import nvae_sample

if __name__ == "__main__":
    nvae_sample()
