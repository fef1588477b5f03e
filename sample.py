"""Sample images from a trained NVAE: `python sample.py --checkpoint CKPT` (see --help)."""
from nvae.sample_cli import main

if __name__ == "__main__":
    main()
