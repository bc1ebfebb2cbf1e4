"""The one command-line convention of the project's commands.

Every command describes its options as dataclasses (help text in `field(metadata={"help": ...})`) and parses them
with :class:`ArgumentParser`, transformers' `HfArgumentParser` with three additions:

* a config file (`.json`, `.yaml`, `.yml`) may come first: `python train_distill.py configs/stage1.json
  --learning_rate 1e-5`; its keys are the option names, and flags typed after it win;
* `--help` lists each option once, in transformers' underscore style (`--output_dir`); the dashed spelling
  (`--output-dir`) is still accepted;
* user errors (:class:`InputError`: a missing model, image or folder, a bad value) end the command with one line
  naming the problem and exit status 2, through :func:`run_command`;
* one vocabulary (:data:`VOCABULARY`): the same thing has the same option name in every command (`--models`,
  `--names`, `--output_dir`, `--no_progress`, `--hub_private_repo`, ...); another spelling of one of them is refused
  with one line naming the project's option.

Model sources are checked before any Hub call by :func:`alibi_dinov2.hub.sources.check_model_source`.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from transformers import HfArgumentParser

from alibi_dinov2.errors import InputError, SourceNotFoundError, first_line


logger = logging.getLogger(__name__)

CONFIG_SUFFIXES = (".json", ".yaml", ".yml")

# The options shared by the commands, one name each: {other spelling (other tools', or this project's earlier): the
# project's option}. A parser refuses such a spelling, naming the option it has (`renamed`); no command may define
# one (tests/library/test_commands.py walks every parser).
VOCABULARY: dict[str, str] = {
    # the models and their display names
    "model_name_or_path": "model",
    "model_names": "names",
    "display_names": "names",
    # the folder a command writes (transformers' scripts' name)
    "output_folder": "output_dir",
    "out_dir": "output_dir",
    "outdir": "output_dir",
    "save_dir": "output_dir",
    # progress bars
    "disable_progress_bars": "no_progress",
    "disable_tqdm": "no_progress",
    # the Hub (transformers' TrainingArguments)
    "private": "hub_private_repo",
    "private_repo": "hub_private_repo",
    # the run options of the Accelerate jobs (transformers' *_no_trainer.py scripts)
    "epochs": "num_train_epochs",
    "batch_size": "per_device_train_batch_size",
    "train_batch_size": "per_device_train_batch_size",
    "eval_batch_size": "per_device_eval_batch_size",
    "max_steps": "max_train_steps",
    "lr": "learning_rate",
    "checkpoint_every_steps": "checkpointing_steps",
    "save_total_limit": "checkpoints_total_limit",
    "resume": "resume_from_checkpoint",
}


# --------------------------------------------------------------------------------------------------
# Config files
# --------------------------------------------------------------------------------------------------
def load_config_file(path) -> dict:
    """Options from a JSON or YAML mapping `{"option_name": value}` (dashes in keys read as underscores).

    Raises:
        SourceNotFoundError: the file does not exist.
        InputError: not a mapping, or not valid JSON / YAML.
    """
    path = Path(path)
    if not path.is_file():
        raise SourceNotFoundError(f"not found: {path} (config file)")
    if path.suffix.lower() not in CONFIG_SUFFIXES:
        raise InputError(f"{path}: a config file must end in {', '.join(CONFIG_SUFFIXES)}")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".json":
            values = json.loads(text)
        else:
            import yaml

            values = yaml.safe_load(text) or {}
    except ImportError as error:
        raise InputError(f"{path}: reading YAML needs PyYAML (`pip install pyyaml`); or write it as JSON") from error
    except Exception as error:  # json.JSONDecodeError, yaml.YAMLError
        raise InputError(f"{path} is not valid {path.suffix[1:].upper()}: {error}".replace("\n", " ")) from error
    if not isinstance(values, dict):
        raise InputError(f"{path} must hold a mapping of option names to values")
    return {str(key).replace("-", "_"): value for key, value in values.items() if not str(key).startswith("_")}


def _looks_like_config_file(token: str) -> bool:
    return not token.startswith("-") and token.lower().endswith(CONFIG_SUFFIXES)


def did_you_mean(name: str, choices) -> str:
    """' (did you mean 'x'?)' for the closest of `choices` to a mistyped `name`, or '' when none is close."""
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def option_hint(name: str, choices, renamed: Mapping[str, str] | None = None, prefix: str = "") -> str:
    """What to tell a user who typed the unknown option `name`: `' (renamed '--new')'` for an old name in `renamed`
    ({old: new}), else the closest of `choices` (or the new name of the closest old one) as :func:`did_you_mean`
    does, else ''. `prefix` (`"--"`) is the one `name` is written with and that the answer carries."""
    renamed = dict(renamed or {})
    bare = name[len(prefix):] if prefix and name.startswith(prefix) else name
    bare = bare.replace("-", "_")
    if bare in renamed:
        return f" (renamed {prefix + renamed[bare]!r})"
    close = difflib.get_close_matches(name, list(choices), n=1)
    if not close:
        close = [prefix + renamed[old] for old in difflib.get_close_matches(bare, list(renamed), n=1)]
    return f" (did you mean {close[0]!r}?)" if close else ""


# --------------------------------------------------------------------------------------------------
# The parser
# --------------------------------------------------------------------------------------------------
class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Prints the description as written (command examples stay intact) and each option under its first
    (underscore) spelling only."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if action.option_strings and len(action.option_strings) > 1:
            shown = [
                option for option in action.option_strings if not option.startswith("--") or "-" not in option[2:]
            ]
            action = _with_options(action, shown)
        return super()._format_action_invocation(action)


def _with_options(action: argparse.Action, option_strings: list[str]) -> argparse.Action:
    copy = argparse.Action.__new__(type(action))
    copy.__dict__.update(action.__dict__)
    copy.option_strings = option_strings or action.option_strings[:1]
    return copy


def _shown_prog(prog: str | None) -> str | None:
    """The name usage lines and errors give the command: under a console script, the script as typed
    (`alibi-probe` for `python -m evaluation.probe_runner`, `alibi-segment train` for `python -m
    alibi_dinov2.segmentation.command train`), else `prog`."""
    script = Path(sys.argv[0]).name
    if not prog or not script.startswith("alibi-"):
        return prog
    words = prog.split()
    return " ".join([script, *words[3:]]) if words[:2] == ["python", "-m"] else script


class ArgumentParser(HfArgumentParser):
    """`HfArgumentParser` over the command's dataclasses, taking an optional leading config file.

    Example:
        >>> parser = ArgumentParser(ProbeArguments, prog="python -m evaluation.probe_runner")
        >>> (arguments,) = parser.parse(["config.yaml", "--seed", "3"])
    """

    def __init__(
        self,
        dataclass_types,
        positionals: Sequence[str] = (),
        renamed: Mapping[str, str] | None = None,
        **kwargs,
    ) -> None:
        """`positionals`: option names that may also be given, in this order, as the leading bare words of the
        command line (`convert_checkpoint.py SOURCE OUTPUT_DIR` is `--source SOURCE --output_dir OUTPUT_DIR`).
        `renamed`: {old option name: new name}; an old name, typed or in a config file, is refused naming the new.
        The spellings of :data:`VOCABULARY` whose option this parser has are refused the same way."""
        kwargs.setdefault("formatter_class", _HelpFormatter)
        kwargs.setdefault("allow_abbrev", False)
        kwargs["prog"] = _shown_prog(kwargs.get("prog"))
        super().__init__(dataclass_types, **kwargs)
        self.positionals = tuple(positionals)
        options = self._option_actions()
        shared = {old: new for old, new in VOCABULARY.items() if new in options and old not in options}
        self.renamed = {**shared, **dict(renamed or {})}
        if self.usage is None:
            shown = " ".join(name.upper() for name in self.positionals)
            self.usage = f"%(prog)s [CONFIG_FILE] {f'[{shown}] ' if shown else ''}[--option VALUE ...]"
        if self.description is None:
            self.description = "Options may also come from a JSON or YAML config file given first."

    def _option_actions(self) -> dict[str, argparse.Action]:
        return {action.dest: action for action in self._actions if action.option_strings and action.dest != "help"}

    def apply_config(self, values: dict, source) -> None:
        """Make the values of a config file the defaults (so that typed flags win); unknown keys are errors."""
        actions = self._option_actions()
        unknown = [key for key in values if key not in actions]
        if unknown:
            hints = [repr(key) + option_hint(key, actions, self.renamed) for key in unknown]
            self.error(f"unknown option(s) in {source}: {', '.join(hints)}")
        for key, value in values.items():
            action = actions[key]
            convert = action.type if callable(action.type) else None
            if convert is not None and isinstance(value, str):
                value = convert(value)
            elif convert is not None and isinstance(value, list):
                value = [convert(item) if isinstance(item, str) else item for item in value]
            action.default = value
            action.required = False

    def parse(self, argv: Sequence[str] | None = None) -> tuple:
        """Parse `argv` (default `sys.argv[1:]`), a config file first if given, into the dataclasses."""
        argv = list(sys.argv[1:] if argv is None else argv)
        if argv and _looks_like_config_file(argv[0]):
            try:
                self.apply_config(load_config_file(argv[0]), argv[0])
            except InputError as error:
                self.error(str(error))
            argv = argv[1:]
        leading = []
        while argv and len(leading) < len(self.positionals) and not argv[0].startswith("-"):
            leading.append(argv.pop(0))
        for name, value in zip(self.positionals, leading):
            argv = [f"--{name}", value, *argv]
        try:
            *parsed, remaining = self.parse_args_into_dataclasses(
                args=argv, look_for_args_file=False, return_remaining_strings=True
            )
        except ValueError as error:  # a dataclass's __post_init__ check
            self.error(str(error))
        if remaining:
            self.error(self.unknown_arguments_message(remaining))
        return tuple(parsed)

    def unknown_arguments_message(self, remaining: Sequence[str]) -> str:
        """'unknown option '--epoch' (did you mean '--epochs'?)', naming the first unknown option (or
        '... (renamed '--num_train_epochs')' for a renamed one)."""
        options = [option for action in self._actions for option in action.option_strings]
        for token in remaining:
            if token.startswith("-"):
                flag = token.split("=")[0]
                hint = option_hint(flag, options, self.renamed, prefix="--")
                return f"unknown option {flag!r}{hint}; --help lists the options"
        return f"unrecognised arguments: {' '.join(remaining)}"


def parse_arguments(dataclass_types, argv: Sequence[str] | None = None, prog: str | None = None, **kwargs) -> tuple:
    """One call: build an :class:`ArgumentParser` for `dataclass_types` and parse `argv`."""
    return ArgumentParser(dataclass_types, prog=prog, **kwargs).parse(argv)


# --------------------------------------------------------------------------------------------------
# Errors, workers
# --------------------------------------------------------------------------------------------------


def run_command(
    main: Callable[[Sequence[str] | None], Any], argv: Sequence[str] | None = None, prog: str | None = None
):
    """Run a command's `main(argv)`; a user error ends it with one line on stderr (from the first process of a
    launched group) and exit status 2."""
    from alibi_dinov2.io.images import ImageReadError

    prog = prog or Path(sys.argv[0]).name
    try:
        return main(argv)
    except (InputError, ImageReadError, FileNotFoundError) as error:
        message = first_line(error) or type(error).__name__
        if os.environ.get("RANK", "0") == "0":  # the processes of a launched group share the same mistake
            print(f"{prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which containers and `taskset` restrict)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def default_num_workers(requested: int | None = None, processes: int = 1) -> int:
    """DataLoader workers: `requested` (or 4) capped so that all processes' workers fit the available CPUs."""
    cap = max(0, available_cpus() // max(1, processes) - 1)
    return min(4 if requested is None else int(requested), cap)
