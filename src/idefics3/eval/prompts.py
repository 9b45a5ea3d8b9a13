"""The prompts, per task and harness style, in one table; every piece can be overridden from the command line.

Two styles, each as the public harness writes it for Idefics3 / SmolVLM:

`lmms-eval` (the default; EvolvingLMMs-Lab/lmms-eval task yamls, `default` model kwargs):

| task      | user text (images first)                                                                        |
|-----------|--------------------------------------------------------------------------------------------------|
| docvqa    | {question}\\nAnswer the question using a single word or phrase.                                  |
| textvqa   | {question, .capitalize()d}\\nAnswer the question using a single word or phrase.                  |
| chartqa   | {question}\\nAnswer the question using a single word or phrase.                                  |
| ocrbench  | {question}                                                                                       |
| ai2d      | {question}\\nA. {option}\\nB. ...\\nAnswer with the option's letter from the given choices directly. |
| mmstar    | {question, options inside}\\nAnswer with the option's letter from the given choices directly     |
| mmmu      | multiple choice: {question}\\nA. {option}...\\n\\nAnswer with the option's letter from the given   |
|           | choices directly. / open: {question}\\n\\nAnswer the question using a single word or phrase.      |
| mathvista | "format-prompt": {question}[ (Unit: u)]\\nA. {choice}...\\n{hint by answer type}                   |

`vlmevalkit` (open-compass/VLMEvalKit, class IDEFICS2, also registered for Idefics3): VQA gets "\\nAnswer the
question using a single word or phrase.\\nGive a very brief answer."; multiple choice is written "Question: ...
\\nChoices:\\nA. ...\\nAnswer with the letter." and the assistant turn starts with " Answer:"; MMMU lists its
images as "<image k>:<image>" first; MathVista takes the dataset's `query` with "(A) " written "A. " and
"Hint: " removed.

Overrides (`--prompt KEY=VALUE`, repeatable; `TASK.KEY=VALUE` for one task only; "\\n" and "\\t" are read as
escapes): `pre` (before the question), `post` (after it), `mc_post` / `open_post` (MMMU's two kinds), and
`prefix` (the start of the assistant's turn; not sent to --server, whose chat API cannot take one).
The prompt version written into results is the style and, if anything was overridden, a digest of the overrides.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, fields, replace

PROMPT_VERSION = 1
SHORT = "\nAnswer the question using a single word or phrase."
LETTER = "\nAnswer with the option's letter from the given choices directly."
BRIEF = SHORT + "\nGive a very brief answer."
MC_LETTER = "Answer with the letter."


@dataclass(frozen=True)
class PromptSettings:
    style: str = "lmms-eval"
    pre: str = ""
    post: str = ""
    mc_post: str = ""
    open_post: str = ""
    prefix: str = ""


_LMMS = {
    "docvqa": PromptSettings(post=SHORT),
    "textvqa": PromptSettings(post=SHORT),
    "chartqa": PromptSettings(post=SHORT),
    "ocrbench": PromptSettings(),
    "ai2d": PromptSettings(post=LETTER),
    "mmstar": PromptSettings(post=LETTER.rstrip(".")),  # sic: lmms-eval's MMStar prompt has no full stop
    "mmmu": PromptSettings(mc_post=LETTER.lstrip("\n"), open_post=SHORT.lstrip("\n")),
    "mathvista": PromptSettings(),
    "shapes": PromptSettings(),
}
_VLMEVALKIT = {
    "docvqa": PromptSettings(post=BRIEF),
    "textvqa": PromptSettings(post=BRIEF),
    "chartqa": PromptSettings(post=BRIEF),
    "ocrbench": PromptSettings(),
    "ai2d": PromptSettings(mc_post=MC_LETTER, prefix=" Answer:"),
    "mmstar": PromptSettings(mc_post=MC_LETTER, prefix=" Answer:"),
    "mmmu": PromptSettings(mc_post=MC_LETTER, prefix=" Answer:"),  # the prefix only where options A. B. appear
    "mathvista": PromptSettings(mc_post=MC_LETTER, prefix=" Answer:"),  # the same, multiple choice only
    "shapes": PromptSettings(),
}
STYLES = {"lmms-eval": _LMMS, "vlmevalkit": _VLMEVALKIT}
KEYS = tuple(f.name for f in fields(PromptSettings) if f.name != "style")


def parse_overrides(items: list[str] | None, tasks: list[str]) -> dict[str | None, dict[str, str]]:
    """`KEY=VALUE` / `TASK.KEY=VALUE` strings -> {task or None (all): {key: value}}; ValueError on a bad one."""
    out: dict[str | None, dict[str, str]] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--prompt {item!r}: expected KEY=VALUE (keys: {', '.join(KEYS)})")
        task, dot, name = key.rpartition(".")
        if name not in KEYS:
            raise ValueError(f"--prompt {item!r}: unknown key {name!r} (keys: {', '.join(KEYS)})")
        if dot and task not in tasks:
            raise ValueError(f"--prompt {item!r}: {task!r} is not one of the tasks run ({', '.join(tasks)})")
        out.setdefault(task if dot else None, {})[name] = value.replace("\\n", "\n").replace("\\t", "\t")
    return out


def settings_for(task: str, style: str = "lmms-eval", overrides: dict[str | None, dict[str, str]] | None = None
                 ) -> PromptSettings:
    """The prompt pieces of `task` in `style`, with the overrides for all tasks, then for this task, applied."""
    if style not in STYLES:
        raise ValueError(f"unknown prompt style {style!r} (styles: {', '.join(STYLES)})")
    base = STYLES[style].get(task, PromptSettings())
    changes = {**(overrides or {}).get(None, {}), **(overrides or {}).get(task, {})}
    return replace(base, style=style, **changes)


def prompt_version(style: str, overrides: dict[str | None, dict[str, str]] | None = None) -> str:
    """"lmms-eval/v1", or with overrides "lmms-eval/v1+custom-<digest>" (the digest of the override table)."""
    version = f"{style}/v{PROMPT_VERSION}"
    if overrides:
        blob = json.dumps({str(k): v for k, v in overrides.items()}, sort_keys=True).encode()
        version += "+custom-" + hashlib.sha256(blob).hexdigest()[:8]
    return version
