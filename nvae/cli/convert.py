"""``nvae-convert SRC DST``: an official NVAE checkpoint (NVlabs/NVAE) as an nvae checkpoint.

The conversion is :func:`nvae.convert.convert` (what it carries over and what it does not is said
there); this is its command line, also run by ``python -m nvae.cli.convert``. It imports torch only
once its arguments are read (``--help`` answers at once).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Optional


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    """``nvae-convert`` / ``python -m nvae.cli.convert``: one summary line, or one error line (exit 2)."""
    parser = argparse.ArgumentParser(prog="nvae-convert", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="The converted model evaluates with the official likelihood bins; "
                                            "evaluate.py --dmol-bins exact uses nvae's instead.")
    parser.add_argument("src", help="official checkpoint.pt (read with weights_only=True: nothing in it runs)")
    parser.add_argument("dst", help="a .ckpt file: an nvae training checkpoint (e.g. nvae_cifar10.ckpt, for --resume); "
                                    "any other name: a model directory (config.json + model.safetensors + README.md, "
                                    "loads without pickle)")
    parser.add_argument("--data-root", default=None,
                        help="data folder recorded for evaluation and training (default: the official args.data)")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    args = parser.parse_args(argv)
    from nvae.convert import convert
    from nvae.official_checks import OfficialFormatError

    try:
        summary = convert(args.src, args.dst, args.data_root, args.overwrite)
    except (OfficialFormatError, OSError, ValueError) as err:  # OSError: a missing SRC, DST not writable
        if os.environ.get("NVAE_DEBUG"):
            raise
        message = str(err).replace("\r", "\\r").replace("\n", "\\n")  # one line, whatever a name holds
        parser.exit(2, f"nvae-convert: error: {message}\n")
    if summary["filled"]:
        print(f"official args lacked {len(summary['filled'])} field(s), filled with the official defaults: "
              f"{', '.join(summary['filled'])}", file=sys.stdout)
    opt = "with its optimizer state" if summary["optimizer_state"] else "without optimizer state (moments start at 0)"
    if summary["format"] == "directory":
        opt = "as a model directory (weights only)"
    print(f"converted {summary['source']} (official {summary['dataset']}, epoch {summary['epoch']}, step "
          f"{summary['global_step']}): {summary['parameters']:,} parameters, {summary['tensors']} tensors, {opt}; "
          f"data module {summary['data_module']}; wrote {summary['checkpoint']}", file=sys.stdout)
    return summary


if __name__ == "__main__":
    main()
