"""One process of a 2-process DDP run launched the way torchrun does (environment variables), for
test_ddp's preemption test: python ddp_preempt_worker.py OUT_DIR MAX_STEPS SIGTERM_AFTER|-1 [CKPT]."""
from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ddp_helpers  # noqa: E402
from conftest import random_images, tiny_config  # noqa: E402
from nvae.lightning import NVAEModule  # noqa: E402
from nvae.spec import ImageSpec  # noqa: E402

if __name__ == "__main__":
    out, max_steps, sigterm_after = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    ckpt = sys.argv[4] if len(sys.argv) > 4 else None
    torch.set_num_threads(1)
    spec = ImageSpec(channels=1, size=16, num_bits=1, pad=2)
    L.seed_everything(0, verbose=False)
    module = NVAEModule(arch=tiny_config(), image_spec=spec, optim={"warmup_epochs": 0.0}, ema_decay=0.9,
                        ema_bn_batches=2)  # an emergency save estimates the EMA's statistics on rank 0 alone
    callbacks = [L.pytorch.callbacks.ModelCheckpoint(dirpath=str(out / "ck"), save_last=True)]
    if sigterm_after >= 0:
        callbacks.append(ddp_helpers.SigtermAllRanks(step=sigterm_after))
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=max_steps, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(out),
                        num_sanity_val_steps=0, limit_val_batches=0, use_distributed_sampler=False,
                        callbacks=callbacks)
    data = random_images(spec, n=16, seed=2)
    trainer.fit(module, DataLoader(data, batch_size=2, sampler=ddp_helpers.RankInterleaved(len(data))),
                ckpt_path=ckpt)
