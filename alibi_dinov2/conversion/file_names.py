"""Settings read from a checkpoint's file name: the reference ALiBi code records some settings only in its file names
(`nope_coco_dv2_vits14_reg4.pth`, `alibi_dv2_no_norm_no_wrap_cb.pth`), not in the keys."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath


logger = logging.getLogger(__name__)


# Name tokens that set an ALiBi option: (configuration field, value).
ALIBI_NAME_SETTINGS = {
    "norm": ("alibi_normalize", True),
    "no_norm": ("alibi_normalize", False),
    "wrap": ("alibi_wrap", True),
    "no_wrap": ("alibi_wrap", False),
    "euclidean": ("alibi_metric", "euclidean"),
    "manhattan": ("alibi_metric", "manhattan"),
}


# Name tokens about the position scheme, which the keys decide (a non-zero embedding, RoPE periods, slopes); the name
# only tells NoPE from constant-slope ALiBi when the keys hold none of them.
SCHEME_NAME_TOKENS = ("nope", "learned")


# Negated words of the reference names that describe training only (`no_cb`: trained without channel blanking,
# `no_ms`: without multi-scale crops): they leave nothing in the model to set.
TRAINING_ONLY_NEGATIONS = {"no_cb", "no_ms"}


@dataclass(frozen=True)
class NameSettings:
    """What a file name says: ALiBi options (`{"alibi_wrap": False}`), the position-scheme words it holds
    (`"nope"`, `"learned"`), and negated words that look like settings the converter does not know (`"no_cls"`)."""

    alibi_options: dict = field(default_factory=dict)
    scheme_tokens: tuple = ()
    unknown: tuple = ()

    def describe(self) -> str:
        words = [token for token, setting in ALIBI_NAME_SETTINGS.items() if setting in self.alibi_options.items()]
        return ", ".join(f"{word!r}" for word in words + list(self.scheme_tokens))


def name_tokens(name) -> list[str]:
    """The words of a file name's stem, lower case, a negation joined to its word: `alibi_dv2_no-norm_noWrap.pth`
    gives `alibi, dv2, no_norm, no_wrap`."""
    stem = PurePosixPath(str(name).split("?")[0]).name.lower()
    stem = re.sub(r"\.(pth|pt|bin|safetensors)$", "", stem)
    words = [word for word in re.split(r"[^a-z0-9+]+", stem) if word]
    tokens, index = [], 0
    while index < len(words):
        word = words[index]
        if word == "no" and index + 1 < len(words):
            tokens.append("no_" + words[index + 1])
            index += 2
            continue
        if word.startswith("no") and f"no_{word[2:]}" in (*ALIBI_NAME_SETTINGS, *TRAINING_ONLY_NEGATIONS):
            word = f"no_{word[2:]}"  # `nocb`, `nowrap`
        tokens.append(word)
        index += 1
    return tokens


def read_name_settings(name) -> NameSettings:
    """The settings a checkpoint's file name carries (see `ALIBI_NAME_SETTINGS`); a later word wins over an earlier
    one for the same option."""
    options, scheme, unknown = {}, [], []
    for token in name_tokens(name):
        if token in ALIBI_NAME_SETTINGS:
            key, value = ALIBI_NAME_SETTINGS[token]
            options[key] = value
        elif token in SCHEME_NAME_TOKENS:
            scheme.append(token)
        elif token.startswith("no_") and token not in TRAINING_ONLY_NEGATIONS:
            unknown.append(token)
    return NameSettings(options, tuple(dict.fromkeys(scheme)), tuple(dict.fromkeys(unknown)))


def alibi_options_of_name(name, scheme: str, has_slopes: bool) -> dict:
    """The ALiBi options a state-dict file's name sets, for a source whose keys give `scheme` (and learned slopes
    when `has_slopes`); one warning names what the name says and the converter reads from it, does not apply (the
    keys say otherwise) or does not know."""
    settings = read_name_settings(name)
    file_name = PurePosixPath(str(name)).name
    applied = settings.alibi_options if "alibi" in scheme.split("+") else {}
    notes = []
    if applied:
        notes.append("read from the name: " + ", ".join(f"{key}={value}" for key, value in applied.items()))
    if settings.alibi_options and not applied:
        notes.append(f"not applied: {settings.describe()} (the source is read as a {scheme} model, without ALiBi)")
    contradicted = [
        token
        for token in settings.scheme_tokens
        if (token == "nope" and scheme != "nope") or (token == "learned" and not has_slopes)
    ]
    if contradicted:
        notes.append(
            f"not applied: {', '.join(repr(t) for t in contradicted)} (the source is read as a {scheme} model"
            + (", without learned slopes `blocks.N.attn.m`)" if "learned" in contradicted else ")")
        )
    if settings.unknown:
        known = ", ".join(ALIBI_NAME_SETTINGS)
        notes.append(
            f"{', '.join(repr(t) for t in settings.unknown)} looks like a setting but is not read (the name words "
            f"read are {known}, nope, learned): check the printed configuration and set it with --alibi_* options"
        )
    if notes:
        logger.warning("%s: %s", file_name, "; ".join(notes))
    return dict(applied)
