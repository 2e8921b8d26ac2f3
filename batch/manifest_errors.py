"""Pydantic's validation errors as plain words: each names the key, says what to write, and
never repeats the whole manifest back.

`describe` turns one error of `pydantic.ValidationError.errors()` into one line; the model
is passed in (rather than imported) so that this module stays below `batch.manifest`.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from typing import Any, Final, get_args

from pydantic import BaseModel

from batch.errors import quoted

DOCS: Final = "docs/manifest.md"
_WANTS_NUMBER: Final = frozenset({"int_type", "float_type", "int_parsing", "float_parsing"})
_INPUT_KINDS: Final = ("glob", "path", "list")
# What a key with a pattern takes, in words (the pattern itself means little to a reader).
_PATTERN_WORDS: Final = {
    "job": "use 1-128 letters, digits, - and _ only",
    "output.currency": "use a three-letter currency code such as USD or EUR",
}
_KEYS_LISTED_MAX: Final = 12


def describe(error: Any, root: type[BaseModel]) -> str:
    """One line for one pydantic error dict of a manifest validated by ``root``."""
    loc = list(error["loc"])
    tag = None
    if len(loc) > 2 and loc[0] == "inputs" and loc[2] in _INPUT_KINDS:
        tag = str(loc.pop(2))  # the discriminator's tag, not a key of the file
    location = ".".join(str(part) for part in loc) or "(top level)"
    kind = error["type"]
    given = error.get("input")
    if kind == "extra_forbidden":
        known = known_keys(root, loc[:-1], tag)
        return f"{location}: unknown key; {_spelling_hint(str(loc[-1]), known)}"
    if kind == "missing":
        where = ".".join(str(p) for p in loc[:-1]) or "the top level"
        return f"{location}: required; add `{loc[-1]}:` under {where} (see {DOCS})"
    if kind == "string_pattern_mismatch":
        words = _PATTERN_WORDS.get(".".join(str(p) for p in loc if not isinstance(p, int)))
        return f"{location}: {words or 'not in the expected form'} (got {_got(given)})"
    if kind == "input_kind":
        guess = _closest(list(given) if isinstance(given, dict) else [], _INPUT_KINDS)
        hint = f"; did you mean `{guess[1]}` (not `{guess[0]}`)?" if guess else ""
        return f"{location}: each input needs one of the keys glob, path or list{hint}"
    if kind in ("model_type", "dict_type", "model_attributes_type"):
        shape = "a mapping of keys (indented `key: value` lines)"
        return f"{location}: must be {shape}, got {_got(given)}"
    message = str(error["msg"]).removeprefix("Value error, ")
    unquoted = _quoted_scalar(kind, given)
    if unquoted is not None:
        return f'{location}: "{unquoted}" is quoted text; write {unquoted} without quotes'
    if kind == "value_error":
        # A whole-manifest check names its keys itself.
        return f"{location}: {message}" if loc else message
    message = message.replace("Input should be", "must be")
    return f"{location}: {message} (got {_got(given)})"


def known_keys(root: type[BaseModel], parents: list[Any], tag: str | None = None) -> list[str]:
    """The keys the mapping at ``parents`` (a key path, list indices included) takes; of
    an input, those of its kind (``tag``: the kind's own key, glob, path or list)."""
    models = [root]
    for part in parents:
        if isinstance(part, int):
            continue  # an entry of a list: the same models
        models = [
            found
            for model in models
            if part in model.model_fields
            for found in _models_in(model.model_fields[part].annotation)
        ]
    if tag is not None:
        models = [model for model in models if tag in model.model_fields] or models
    return sorted({key for model in models for key in model.model_fields})


def _models_in(annotation: Any) -> Iterator[type[BaseModel]]:
    """The models a field's type holds (through lists, unions and Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
        return
    for argument in get_args(annotation):
        yield from _models_in(argument)


def _spelling_hint(key: str, known: list[str]) -> str:
    guess = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if guess:
        return f"did you mean `{guess[0]}`?"
    if known and len(known) <= _KEYS_LISTED_MAX:
        return f"the keys here are {', '.join(known)}"
    return f"check its spelling against {DOCS}"


def _closest(given: list[Any], choices: tuple[str, ...]) -> tuple[str, str] | None:
    """(a given key, the choice it looks like a misspelling of), if any."""
    for key in given:
        guess = difflib.get_close_matches(str(key), choices, n=1, cutoff=0.6)
        if guess:
            return str(key), guess[0]
    return None


def _got(value: Any) -> str:
    """The offending value for a message; a mapping or list by its shape, not in full
    (it can be the whole manifest)."""
    if isinstance(value, dict):
        return f"a mapping with keys {quoted(sorted(map(str, value)))}"
    if isinstance(value, list):
        return f"a list of {len(value)}"
    return quoted(value)


def _quoted_scalar(kind: str, value: Any) -> str | None:
    """``concurrency: "4"`` or ``diarize: "true"``: the value is right but quoted (strict
    models take no text for numbers or booleans). Returns the value to write unquoted."""
    if not isinstance(value, str):
        return None
    text = value.strip()
    if kind in _WANTS_NUMBER:
        try:
            float(text)
        except ValueError:
            return None
        return text
    if kind == "bool_type" and text.lower() in ("true", "false"):
        return text.lower()
    return None
