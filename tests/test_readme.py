"""Every command of the README is exercised here, as written, on a quickstart checkpoint.

Commands that need what a test machine lacks (data sets, GPUs, NVIDIA's files, Inception weights)
go as far as that lack: training commands are parsed and validated by the real command line
(``--print_config``), a missing file is refused by name after the options were accepted. The rest
run for real with fewer images, samples and iterations appended (argparse keeps the last value).
"""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any, Callable

import pytest

from nvae.cli import convert as convert_cli
from nvae.cli import evaluate as eval_cli
from nvae.cli import export as export_cli
from nvae.cli import restore as restore_cli
from nvae.cli import sample as sample_cli
from nvae.cli import train as train_cli

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
RUN = "runs/quickstart/version_0/checkpoints/last.ckpt"
SETUP = "python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.14.1 torchvision==0.29.1 && pip install -e"


def commands() -> list[str]:
    """Every shell command of the README's bash blocks: continuations joined, comments dropped."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            if line:
                found.append(" ".join(line.split()))
    return found


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, re.DOTALL)


# What each command is shrunk by (appended) so that it runs in seconds on the quickstart model.
SHRINK = {
    "sample.py": ["--num-samples", "2", "--readjust-bn", "2", "--bn-batch-size", "2", "--device", "cpu"],
    "evaluate.py nll": ["-K", "2", "--num-images", "2", "--device", "cpu", "--quiet"],
    "evaluate.py recon": ["--num-images", "2", "--device", "cpu"],
    "evaluate.py fid": ["--num-samples", "4", "--batch-size", "2", "--device", "cpu", "--quiet"],
    "restore.py": ["--num-images", "2", "--num-samples", "2", "--iterations", "2", "--device", "cpu"],
}


def test_the_two_setup_commands_are_the_quickstart_and_what_ci_runs() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    setup = [c for c in commands() if c.startswith("python3 -m venv")]
    assert setup == [f'{SETUP} ".[quickstart]" && python train.py', f'{SETUP} ".[test]" && python -m pytest -q']
    for step in ["python3 -m venv .venv", ". .venv/bin/activate", "pip install -q torch==2.14.1 torchvision==0.29.1",
                 'pip install -q -e ".[test]"', "python -m pytest -q"]:
        assert step in ci.splitlines(), step  # CI runs the test command, step by step


def test_no_arguments_train_the_quickstart(monkeypatch: pytest.MonkeyPatch) -> None:
    """``python train.py`` is ``fit --config quickstart``, which the quickstart_checkpoint fixture
    runs for real (with the debug overlay) and the next test validates."""
    seen = []
    monkeypatch.setattr(train_cli, "NVAECLI", lambda *_, args, **__: seen.append(args))
    train_cli.main([])
    train_cli.main(["fit", "--config", "quickstart"])
    assert seen[0] == seen[1] and seen[0][-1].endswith("quickstart.yaml")


@pytest.mark.parametrize("command", ["python train.py fit --config quickstart"]
                         + [c for c in commands() if c.startswith("python train.py ")])
def test_training_commands_are_valid(command: str, capsys: pytest.CaptureFixture) -> None:
    args = shlex.split(command)[2:]
    with pytest.raises(SystemExit) as stop:
        train_cli.main([*args, "--print_config"])
    assert stop.value.code in (None, 0), capsys.readouterr().err
    assert "model:" in capsys.readouterr().out


def _program(argv: list[str]) -> tuple[str, Callable[[list[str]], Any], list[str]]:
    """(the SHRINK key, the entry function, its arguments) of a README command."""
    if argv[0] == "nvae-convert":
        return "nvae-convert", convert_cli.main, argv[1:]
    if argv[0] == "nvae-export":
        return "nvae-export", export_cli.main, argv[1:]
    script, rest = argv[1], argv[2:]
    if script == "evaluate.py":
        return f"evaluate.py {rest[0]}", eval_cli.main, rest
    return script, {"sample.py": sample_cli.main, "restore.py": restore_cli.main}[script], rest


def test_every_other_command_runs(quickstart_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    ckpt = str(quickstart_checkpoint)
    runnable = [c for c in commands() if c.startswith(("python sample.py", "python evaluate.py", "python restore.py",
                                                       "nvae-convert", "nvae-export"))]
    assert len(runnable) >= 8
    for command in runnable:
        argv = shlex.split(command.replace("$CKPT", ckpt).replace(RUN, ckpt))
        name, main, args = _program(argv)
        if "nvae_cifar10" in args and name != "nvae-convert" and not (tmp_path / "nvae_cifar10").exists():
            export_cli.main([ckpt, "nvae_cifar10"])  # the converted model, played by the quickstart one
        if name == "nvae-convert":  # NVIDIA's file is not here: refused by name, after its options were accepted
            with pytest.raises(SystemExit):
                main(args)
            assert "official checkpoint 'cifar10/checkpoint.pt' does not exist" in capsys.readouterr().err
            continue
        if name == "evaluate.py fid":  # Inception's weights are not here: refused by name, nothing sampled yet
            with pytest.raises(SystemExit, match="pt_inception-2015-12-05-6726825d.pth"):
                main([*args, *SHRINK[name]])
            continue
        result = main([*args, *SHRINK.get(name, [])])
        line = capsys.readouterr().out.strip().splitlines()[-1]
        assert json.loads(line) is not None, command  # each ends with its JSON line
        assert result is None or isinstance(result, dict)
    assert (tmp_path / "recon.png").is_file() and (tmp_path / "restored" / "grid.png").is_file()
    assert (tmp_path / "my_model" / "model.safetensors").is_file()

    # The README's Python blocks, in the same folder: the latent API, then the model directory one.
    latent, pretrained = ([b for b in python_blocks() if "model.encode" in b],
                          [b for b in python_blocks() if "from_pretrained" in b])
    assert len(latent) == len(pretrained) == 1 and len(python_blocks()) == 2
    scope: dict = {}
    exec(compile(latent[0].replace(RUN, ckpt), "README.md", "exec"), scope)
    assert len(scope["groups"]) == scope["model"].num_groups
    assert scope["frames"].shape[:2] == (8, 1) and scope["recon"].shape == scope["x"].shape
    exec(compile(pretrained[0], "README.md", "exec"), {})
    assert (tmp_path / "copy" / "config.json").is_file()


def test_links_point_at_files() -> None:
    """No pointer to a missing document, from the README or any page of docs/."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)[^)]*\)", page.read_text()):
            if not target.startswith(("http://", "https://")):
                assert (page.parent / target).exists(), f"{page.name}: {target}"
