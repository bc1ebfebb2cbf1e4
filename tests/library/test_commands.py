"""Every command: one flag style in --help, a config file accepted first, and a missing model named in one line
before any Hub call."""

import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from alibi_dinov2.cli import VOCABULARY, run_command
from alibi_dinov2.commands import COMMANDS, command_parsers, console_scripts
from alibi_dinov2.errors import InputError
from alibi_dinov2.hub.sources import check_model_source
from conftest import REPO_ROOT


def model_options(command: str, missing: str, folder: Path) -> list[str]:
    """Command-line options that name `missing` as the model, the rest valid."""
    images = str(folder)
    return {
        "alibi-convert": [missing, str(folder / "out")],
        "alibi-distill": ["--teacher", missing, "--train_dir", images, "--output_dir", str(folder / "out")],
        "alibi-quickstart": ["--teacher", missing, "--output_dir", str(folder / "out")],
        "alibi-probe": ["--models", missing],
        "alibi-report": ["--models", missing, "--output_dir", str(folder / "out")],
        "alibi-scribbles": ["--models", missing, "--output_dir", str(folder / "out")],
        "alibi-linear-seg": ["--model", missing, "--data_dir", images, "--num_classes", "3",
                             "--output_dir", str(folder / "out")],
        "alibi-segment": ["train", "--images", str(folder / "a.png"), "--labels", str(folder / "a.png"),
                          "--output", str(folder / "out.zip"), "--model", missing, "--features", "classical+vit"],
        "alibi-demo": ["--models", missing],
        "alibi-publish": [missing],
    }[command]


# Leading bare words of the commands that take them.
POSITIONALS = {"alibi-convert": ("source", "output_dir"), "alibi-publish": ("folder",)}


def as_config(command: str, options: list[str]) -> dict:
    """The same options as a config mapping (leading bare words named by the command's positionals)."""
    if options[0] in ("train", "apply"):
        return {"command": options[0], **as_config(command, options[1:])}
    if not options[0].startswith("--"):
        return dict(zip(POSITIONALS[command], options))
    config, key = {}, None
    for token in options:
        if token.startswith("--"):
            key = token[2:]
            config[key] = True
        else:
            config[key] = [token] if key in ("models", "images", "labels") else token
    return config


@pytest.fixture
def image_folder(tmp_path):
    import numpy as np
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(folder / "a.png")
    return folder


def test_every_command_has_a_console_entry_point():
    setup_text = (REPO_ROOT / "setup.py").read_text()
    assert "entry_points" in setup_text
    listed = re.search(r"for name in \((.*?)\)", setup_text, re.S).group(1)
    assert {f"alibi-{name.replace('_', '-')}" for name in re.findall(r'"(\w+)"', listed)} == set(COMMANDS)
    for line in console_scripts():
        name, target = (part.strip() for part in line.split("="))
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), line
        assert name in COMMANDS


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_uses_one_flag_style(command, capsys):
    module = importlib.import_module(COMMANDS[command])
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    options = set(re.findall(r"(?<![\w-])--[a-z][\w-]*", text))
    assert len(options) > 1, text
    dashed = sorted(option for option in options if "-" in option[2:])
    assert not dashed, f"{command} --help shows dashed options {dashed}"


def every_parser() -> dict:
    """{command line: parser} of every command (alibi-segment's subcommands apart)."""
    return {name: parser for command in COMMANDS for name, parser in command_parsers(command).items()}


def option_kind(action) -> tuple:
    """What an option takes: a flag, one value or a list, and the type of the values."""
    if action.nargs == 0 or (action.nargs == "?" and action.const is True):
        return ("flag",)
    values = "list" if action.nargs in ("+", "*") or isinstance(action.nargs, int) else "one"
    kind = "choice" if action.choices else getattr(action.type, "__name__", "str").replace("Path", "str")
    return values, kind


def test_shared_options_have_one_name_and_one_kind_across_commands():
    kinds: dict = {}
    for name, parser in every_parser().items():
        options = {action.dest: action for action in parser._actions if action.option_strings}
        others = sorted(set(options) & set(VOCABULARY))
        assert not others, f"{name} spells shared options another way: {others} (the project's names: " \
                           f"{[VOCABULARY[other] for other in others]})"
        for dest, action in options.items():
            if dest != "help":
                kinds.setdefault(dest, {}).setdefault(option_kind(action), []).append(name)
    mixed = {dest: by_kind for dest, by_kind in kinds.items() if len(by_kind) > 1}
    assert not mixed, f"one option name, different kinds of value: {mixed}"
    # The concepts the commands share are spelt alike where they occur.
    assert {name for name, parser in every_parser().items() if "names" in parser._option_actions()} >= {
        "alibi-probe", "alibi-report", "alibi-scribbles", "alibi-demo"}
    assert {name for name, parser in every_parser().items() if "output_dir" in parser._option_actions()} >= {
        "alibi-probe", "alibi-report", "alibi-scribbles", "alibi-linear-seg", "alibi-distill", "alibi-convert"}


def test_other_spellings_are_refused_naming_the_option():
    checked = 0
    for name, parser in every_parser().items():
        options = parser._option_actions()
        for old, new in VOCABULARY.items():
            if new in options:
                message = parser.unknown_arguments_message([f"--{old}", "x"])
                assert message == f"unknown option '--{old}' (renamed '--{new}'); --help lists the options", name
                checked += 1
    assert checked > 40


def test_the_probe_refuses_output_naming_output_dir(capsys):
    module = importlib.import_module(COMMANDS["alibi-probe"])
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--models", "m", "--output", "results.json"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.endswith("error: unknown option '--output' (renamed '--output_dir'); --help lists the options")


@pytest.mark.parametrize("command", ["alibi-probe", "alibi-report", "alibi-scribbles"])
def test_names_must_match_the_models(command, capsys):
    module = importlib.import_module(COMMANDS[command])
    with pytest.raises(SystemExit):
        module.main(["--models", "a", "b", "--names", "only-one"])
    assert "--names gives 1 names for 2 models" in capsys.readouterr().err


def test_linear_segmentation_config_keys_take_the_shared_names():
    from evaluation.linear_segmentation.config import make_config

    with pytest.raises(InputError, match="Unknown key 'disable_progress_bars' \\(renamed 'no_progress'\\)"):
        make_config({"disable_progress_bars": True})
    with pytest.raises(InputError, match="Unknown key 'epochs' \\(renamed 'num_train_epochs'\\)"):
        make_config({"epochs": 3})


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_missing_model_is_named_before_any_hub_call(command, tmp_path, image_folder):
    missing = str(tmp_path / "no-such-model")
    module = COMMANDS[command]
    code = (
        f"import sys; from alibi_dinov2.cli import run_command; import {module} as m; "
        f"run_command(m.main, sys.argv[1:], prog={command!r})"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0",
           "HF_ENDPOINT": "http://127.0.0.1:9"}  # a Hub call would fail with a connection error instead
    result = subprocess.run([sys.executable, "-c", code, *model_options(command, missing, image_folder)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1] == (
        f"{command}: error: not found: {missing} (no such file or folder, and not a Hub id)"
    ), result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "127.0.0.1" not in result.stderr


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_reads_a_config_file_first(command, tmp_path, image_folder, capsys):
    missing = str(tmp_path / "model-from-config")
    config = tmp_path / "options.json"
    config.write_text(json.dumps(as_config(command, model_options(command, missing, image_folder))))
    module = importlib.import_module(COMMANDS[command])
    with pytest.raises(SystemExit) as exit_info:
        run_command(module.main, [str(config)], prog=command)
    assert exit_info.value.code == 2
    assert f"{command}: error: not found: {missing}" in capsys.readouterr().err


def test_hub_ids_pass_and_offline_misses_are_named(monkeypatch):
    from alibi_dinov2.hub import offline

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    monkeypatch.setattr(offline, "_reachable", {offline.hub_endpoint(): True})  # as with a network
    assert check_model_source("facebook/dinov2-small") == "facebook/dinov2-small"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="not found: someone/not-cached .*not in the local cache"):
        check_model_source("someone/not-cached")
    for path in ("./model", "/abs/model", "a/b/c", "weights.pth", "~/model"):
        with pytest.raises(FileNotFoundError, match=f"not found: {re.escape(path)}"):
            check_model_source(path)


def test_file_urls_are_sources_not_missing_paths(monkeypatch):
    """hf:// names and URLs are resolved (and, offline, named when not cached) by alibi_dinov2.hub.remote_files."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for source in ("hf://rmdocherty/dino-saw/alibi_coco_dv2_vits14_reg4.pth",
                   "https://huggingface.co/rmdocherty/dino-saw/resolve/main/nope_coco_dv2_vits14_reg4.pth",
                   "https://huggingface.co/rmdocherty/dino-saw/blob/main/alibi_dv2_vits14_reg4.pth",
                   "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_reg4_pretrain.pth"):
        assert check_model_source(source) == source
