"""``nvae-export CKPT DIR``: an nvae training checkpoint as a model directory that loads without pickle.

The directory (:mod:`nvae.pretrained`) holds ``config.json``, ``model.safetensors`` (the EMA weights
when the run kept them, the raw ones in ``model_raw.safetensors``) and a ``README.md`` model card.
Every ``--checkpoint`` option, ``load_checkpoint`` and ``NVAE.from_pretrained`` accept it. Also run
by ``python -m nvae.cli.export``; ``nvae-convert SRC DIR`` writes one from an official checkpoint.
It imports torch only once its arguments are read (``--help`` answers at once).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from nvae.model import NVAE

# the data module (class name) a model was trained on -> (data set, the paper's result: Vahdat & Kautz 2020, tables 1-2)
PAPER: dict[str, tuple[str, str]] = {
    "MNISTDataModule": ("MNIST 28x28, dynamically binarized", "78.01 nats (NLL, K = 1000)"),
    "CIFAR10DataModule": ("CIFAR-10 32x32", "2.91 bits/dim (NLL, K = 1000)"),
    "CelebA64DataModule": ("CelebA 64x64", "2.03 bits/dim (NLL, K = 1000)"),
    "ImageNet32DataModule": ("ImageNet 32x32 (Oord et al.)", "3.92 bits/dim (NLL, K = 1000)"),
    "CelebAHQ256DataModule": ("CelebA-HQ 256x256, 5 bits", "0.70 bits/dim (NLL, K = 1000)"),
    "FFHQ256DataModule": ("FFHQ 256x256, 5 bits", "0.69 bits/dim (NLL, K = 1000)"),
}
OFFICIAL_LICENCE = ("NVIDIA Source Code License-NC (the official NVAE code and checkpoints, "
                    "https://github.com/NVlabs/NVAE): non-commercial research and evaluation use only. "
                    "The converted weights are NVIDIA's and keep that licence.")
OWN_LICENCE = "set by whoever trained these weights (nvae, the code that wrote this directory, is Apache-2.0)."


def model_card(model: NVAE, data: Optional[dict[str, Any]], provenance: dict[str, Any]) -> str:
    """README.md of a model directory: what the model is, the paper's number, how it was made, the licence."""
    class_path = (data or {}).get("class_path", "")
    name = class_path.rpartition(".")[2]
    dataset, paper = PAPER.get(name, (name or "not recorded", "none (not one of the paper's data sets)"))
    official = "official_args" in provenance
    params = sum(p.numel() for p in model.parameters())
    made = (f"converted from the official NVAE checkpoint `{provenance.get('source')}` (sha256 "
            f"`{provenance.get('sha256')}`) by `nvae-convert`" if official else
            f"exported from the nvae checkpoint `{provenance.get('source')}` (sha256 `{provenance.get('sha256')}`) "
            f"by `nvae-export`, {provenance.get('weights', 'raw')} weights")
    return "\n".join([
        "---", "library_name: nvae", "tags: [nvae, vae, generative-model, image-generation]", "---", "",
        f"# NVAE: {dataset}", "",
        "A deep hierarchical VAE (Vahdat & Kautz, \"NVAE: A Deep Hierarchical Variational Autoencoder\", "
        "NeurIPS 2020) for the `nvae` framework.", "",
        f"- **Data:** {dataset} (`{class_path or 'unknown'}`); images {model.spec.channels} x {model.spec.size} x "
        f"{model.spec.size}, {model.spec.num_bits} bit(s), likelihood `{model.likelihood_family.describe(model.cfg)}`.",
        f"- **Parameters:** {params:,}.",
        f"- **The paper's result on this data:** {paper}. Check this model with "
        "`python evaluate.py nll --checkpoint THIS_DIR -K 1000`.",
        f"- **How it was made:** {made}.",
        f"- **Licence:** {OFFICIAL_LICENCE if official else OWN_LICENCE}", "",
        "```python", "from nvae.model import NVAE", "model = NVAE.from_pretrained(\"THIS_DIR\")  # no pickle is read",
        "images = model.sample(16, temperature=0.7)", "```", "",
        "Files: `config.json` (architecture, image format, provenance), `model.safetensors` (weights and "
        "BatchNorm statistics)" + (", `model_raw.safetensors` (the raw weights)" if provenance.get("weights") == "ema"
                                    else "") + ".", ""])


def export(checkpoint: str | Path, folder: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """Write the model directory of an nvae checkpoint; returns a summary."""
    from nvae.checkpoint import load_checkpoint
    from nvae.pretrained import WEIGHTS
    from nvae.pretrained_save import check_destination, save_model_dir, sha256

    folder, source = Path(folder), Path(checkpoint)
    check_destination(folder, overwrite, [source, source / WEIGHTS])  # before the work
    loaded = load_checkpoint(checkpoint, "cpu", use_ema=True)
    raw = load_checkpoint(checkpoint, "cpu", use_ema=False).model.state_dict() if loaded.weights == "ema" else None
    provenance = {"source": source.name, "sha256": sha256(source), "weights": loaded.weights}
    save_model_dir(loaded.model, folder, raw, loaded.data, provenance, model_card(loaded.model, loaded.data, provenance),
                   channels_last=bool(loaded.hparams.get("channels_last")), overwrite=overwrite,
                   sources=[source, source / WEIGHTS])
    return {"checkpoint": str(checkpoint), "directory": str(folder), "weights": loaded.weights,
            "parameters": sum(p.numel() for p in loaded.model.parameters())}


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    """``nvae-export`` / ``python -m nvae.cli.export``: one summary line and one JSON line, or one error line."""
    parser = argparse.ArgumentParser(prog="nvae-export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="nvae checkpoint written by train.py (or nvae-convert)")
    parser.add_argument("folder", help="model directory to write (config.json, model.safetensors, README.md)")
    parser.add_argument("--overwrite", action="store_true", help="replace a model directory already there")
    args = parser.parse_args(argv)
    try:
        summary = export(args.checkpoint, args.folder, args.overwrite)
    except (FileNotFoundError, ValueError, OSError) as err:
        if os.environ.get("NVAE_DEBUG"):
            raise
        parser.exit(2, f"nvae-export: error: {str(err).replace(chr(10), ' ')}\n")
    print(f"exported {summary['checkpoint']} ({summary['weights']} weights, {summary['parameters']:,} parameters) "
          f"-> {summary['directory']}", file=sys.stdout)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
