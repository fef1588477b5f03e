"""The README's latent-API example runs as written (on a quickstart checkpoint)."""
from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_latent_api_example_runs(quickstart_checkpoint: Path) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.DOTALL)
    (example,) = [b for b in blocks if "model.encode" in b]
    code = example.replace("runs/quickstart/version_0/checkpoints/last.ckpt", str(quickstart_checkpoint))
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert len(scope["groups"]) == scope["model"].num_groups
    assert scope["frames"].shape[:2] == (8, 1) and scope["recon"].shape == scope["x"].shape
