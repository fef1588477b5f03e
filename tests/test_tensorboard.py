"""TensorBoard: a debug run's event file holds the scalars, images and hyperparameters."""
from __future__ import annotations

from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from nvae.cli.train import main

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SCALARS = [
    "train/loss", "train/nelbo", "train/recon", "train/kl", "train/bpd", "train/kl_coeff", "train/reg_coeff",
    "train/spectral", "train/bn_penalty", "train/grad_norm", "train/skipped_steps", "train/rollbacks",
    "train/lr_scale", "train/kl_group/00", "train/kl_group/03", "train/kl_balance/00", "train/kl_balance/03",
    "train/active_channels/00", "train/active_channels/03", "train/active_channels/total", "lr-Adamax",
    "val/nelbo", "val/bpd", "val/recon", "val/kl", "hp/val_bpd",
]


def test_event_file_has_scalars_images_and_hparams(tmp_path: Path) -> None:
    cli = main(["fit", "--config", str(CONFIGS / "quickstart.yaml"), "--config", str(CONFIGS / "debug.yaml"),
                "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path)])
    events = sorted(Path(cli.trainer.log_dir).glob("events.out.tfevents.*"))
    assert events
    tags: dict[str, list[str]] = {"scalars": [], "images": [], "hparams": []}
    for path in events:
        acc = EventAccumulator(str(path), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
        acc.Reload()
        for kind in ("scalars", "images"):
            tags[kind] += acc.Tags()[kind]
        tags["hparams"] += list(acc.PluginTagToContent("hparams"))
    missing = [t for t in SCALARS if t not in tags["scalars"]]
    assert not missing, f"missing scalars: {missing}; have {sorted(tags['scalars'])}"
    assert {"samples/t1", "samples/t0.8", "samples/t0.6", "reconstructions"} <= set(tags["images"])
    assert "_hparams_/experiment" in tags["hparams"]  # the HPARAMS tab, with hp/val_bpd as its metric
    # each group's count of active channels is between 0 and the latent channels per group
    channels = cli.model.hparams.arch["num_latent_per_group"]
    values = []
    for path in events:
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
        acc.Reload()
        if "train/active_channels/00" in acc.Tags()["scalars"]:
            values += [e.value for e in acc.Scalars("train/active_channels/00")]
    assert values and all(0 <= v <= channels and v == int(v) for v in values)
