"""transformers' keyword arguments that ask for what idefics3 does anyway, accepted so drop-in code runs.

The model card's snippets and code written for transformers pass arguments such as `use_cache=True` or
`return_dict=True`. Where such an argument asks for exactly what we do, it is accepted and dropped; any other
value, and any name we do not know, raises a TypeError that names it (a misspelt `devcie=` must not pass
silently). Each entry point lists its neutral arguments next to its signature.
"""

from __future__ import annotations

from typing import Any

ANY = object()  # a neutral argument whose every value is fine (it changes nothing here)


def drop_neutral(where: str, kwargs: dict[str, Any], neutral: dict[str, Any]) -> None:
    """Check and remove the neutral arguments of `kwargs` (in place); a non-neutral value raises.

    neutral maps a name to the one value that is a no-op here (ANY: every value; None: None or a falsy value).
    """
    for name in [n for n in kwargs if n in neutral]:
        value, expected = kwargs.pop(name), neutral[name]
        if not (expected is ANY or value == expected or (expected is None and not value)):
            raise ValueError(f"{where} does not support {name}={value!r}")


def take_neutral(where: str, kwargs: dict[str, Any], neutral: dict[str, Any]) -> None:
    """`drop_neutral`, then a TypeError naming every keyword argument left: all must be neutral ones."""
    drop_neutral(where, kwargs, neutral)
    if kwargs:
        raise TypeError(f"{where} got unexpected keyword argument(s): {', '.join(sorted(kwargs))}")
