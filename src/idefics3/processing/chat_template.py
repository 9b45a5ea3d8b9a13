"""Chat templates: where a checkpoint keeps them, and rendering them exactly as transformers does.

Sources, in transformers' processor order: a `chat_template` key in processor_config.json, then
`chat_template.json` (4.x layout), then `chat_template.jinja` plus `additional_chat_templates/*.jinja` (5.x layout).
When none exists we fall back to the tokenizer's template (`chat_template` in tokenizer_config.json), which the
transformers processor does not read but its tokenizer does.

Rendering mirrors `transformers.utils.chat_template_utils.render_jinja_template` (v5.24): an immutable sandboxed
jinja2 environment with trim_blocks and lstrip_blocks, the loop-controls extension, a no-op `{% generation %}`
tag, a `tojson` filter that does not escape HTML, and the `raise_exception`, `strftime_now`, `dict` and
`namespace` globals. Messages are reduced to plain JSON data before the template sees them (images become
placeholder strings such as "<Image>"), `None` fields are dropped, OpenAI `image_url` blocks become `image`
blocks, and `continue_final_message` cuts the rendering right after the final message's text.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.meta
import jinja2.nodes
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment

CONTENT_TYPES = ("text", "image")
_IMAGE_KEYS = ("image", "url", "path", "base64")
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "

Conversation = list[dict[str, Any]]


# ---------------------------------------------------------------------------------------------- loading

def load_chat_template(folder: Path, processor_config: dict[str, Any]) -> str | dict[str, str] | None:
    """The processor's chat template(s) from a checkpoint folder; a dict when there are named templates."""
    if processor_config.get("chat_template") is not None:
        return processor_config["chat_template"]
    extra = {p.stem: p.read_text(encoding="utf-8")
             for p in sorted((folder / "additional_chat_templates").glob("*.jinja"))}
    legacy = folder / "chat_template.json"
    if legacy.is_file():
        if extra:
            raise ValueError(f"{folder} has both a legacy chat_template.json and additional_chat_templates/*.jinja; "
                             "keep only one layout")
        try:
            templates: dict[str, str] = {"default": json.loads(legacy.read_text(encoding="utf-8"))["chat_template"]}
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{legacy} must be JSON with a 'chat_template' string: {err}") from err
    else:
        templates = extra
        if (folder / "chat_template.jinja").is_file():
            templates["default"] = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if not templates:
        return None
    return templates["default"] if list(templates) == ["default"] else templates


def resolve_chat_template(templates: str | dict[str, str] | None, chat_template: str | None = None) -> str:
    """The template source to render: `chat_template` may name one of several templates or be a template."""
    if chat_template is not None:
        if isinstance(templates, dict) and chat_template in templates:
            return templates[chat_template]
        return chat_template
    if isinstance(templates, dict):
        if "default" in templates:
            return templates["default"]
        raise ValueError(f"this processor has several chat templates and none is named 'default'; pass "
                         f"chat_template= one of {sorted(templates)}")
    if templates is None:
        raise ValueError("this processor has no chat template (no chat_template.jinja, chat_template.json or "
                         "tokenizer_config.json template in its folder); pass chat_template=")
    return templates


# ---------------------------------------------------------------------------------------------- jinja

class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; it renders its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """`dict(...)` for templates, without exposing the dict type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """A jinja namespace that refuses underscore-prefixed attributes (no reaching into internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - jinja's own signature trick
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes, got {name!r}")


@lru_cache(maxsize=32)
def compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_TemplateDict(),
                       namespace=_TemplateNamespace)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as err:
        raise ValueError(f"the chat template is not valid jinja (line {err.lineno}): {err.message}") from err


@lru_cache(maxsize=32)
def template_variables(source: str) -> frozenset[str]:
    """Names the template reads from its context (to tell template kwargs from processor kwargs)."""
    env = compile_template(source).environment
    return frozenset(jinja2.meta.find_undeclared_variables(env.parse(source)))


# ---------------------------------------------------------------------------------------------- messages

def _plain(value: Any) -> Any:
    """Plain JSON data for the template; anything else (images, arrays) becomes a "<TypeName>" placeholder."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, np.generic):
        return _plain(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _check_block(block: Any, where: str) -> dict[str, Any]:
    if not isinstance(block, dict):
        raise TypeError(f"{where} must be a dict like {{'type': 'text', 'text': ...}}, got {type(block).__name__}")
    kind = block.get("type")
    if kind == "image_url" and "image_url" in block:  # OpenAI style
        info = block["image_url"]
        return {"type": "image", "url": info.get("url", "") if isinstance(info, dict) else info}
    if kind not in CONTENT_TYPES:
        raise ValueError(f"{where} has unsupported content type {kind!r}; supported: 'text', 'image' (and "
                         "OpenAI-style 'image_url')")
    if kind == "text" and not isinstance(block.get("text"), str):
        raise ValueError(f"{where} is a 'text' block without a 'text' string")
    return block


def normalize_conversations(conversation: Any) -> tuple[list[Conversation], bool]:
    """(conversations, batched): one conversation or a batch, messages as dicts without None fields, content
    blocks checked (text/image) and OpenAI `image_url` blocks turned into `image` blocks."""
    if not isinstance(conversation, (list, tuple)) or not conversation:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts "
                         "(or a list of such lists for a batch)")
    batched = isinstance(conversation[0], (list, tuple))
    conversations = []
    for chat in (conversation if batched else [conversation]):
        messages = []
        for i, message in enumerate(chat):
            if dataclasses.is_dataclass(message) and not isinstance(message, type):
                message = {f.name: getattr(message, f.name) for f in dataclasses.fields(message)}
            elif callable(getattr(message, "model_dump", None)):
                message = message.model_dump()
            if not isinstance(message, dict):
                raise TypeError(f"message {i} must be a dict with 'role' and 'content', got {type(message).__name__}")
            message = {k: v for k, v in message.items() if v is not None}
            if isinstance(message.get("content"), (list, tuple)):
                message["content"] = [_check_block(block, f"message {i} content block {j}")
                                      for j, block in enumerate(message["content"])]
            messages.append(message)
        conversations.append(messages)
    return conversations, batched


def collect_images(conversations: list[Conversation]) -> list[list[Any]]:
    """Per conversation, the images named by its `image` blocks (an object, URL, path or base64), in order."""
    batch = []
    for chat in conversations:
        images = []
        for message in chat:
            content = message.get("content")
            if isinstance(content, list):
                for block in content:
                    if block.get("type") == "image":
                        images.extend(block[key] for key in _IMAGE_KEYS if key in block)
        batch.append(images)
    return batch


def _alias_reasoning(chat: Conversation) -> Conversation:
    out = []
    for message in chat:
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        out.append({"thinking": reasoning, **message, "reasoning_content": reasoning} if reasoning is not None
                   else message)
    return out


def _mark_final_message(chat: Conversation, field: str, source: str) -> str:
    """Append the continue tag to the final message's text; returns that text (before tagging)."""
    final = chat[-1].get(field)
    if final is None:
        raise ValueError(f'continue_final_message is set but the final message has no "{field}" to continue')
    fields = [f for f in _REASONING_FIELDS if chat[-1].get(f) == final] if field in _REASONING_FIELDS else [field]
    if not any(f in source for f in fields):
        raise ValueError(f'continue_final_message is set to "{field}" but the chat template never reads that field')
    if isinstance(final, (list, tuple)):
        for block in reversed(final):
            if "text" in block:
                text = block["text"]
                block["text"] = text + _CONTINUE_TAG
                return text
        raise ValueError("continue_final_message is set but the final message has no text to continue")
    for f in fields:
        chat[-1][f] = chat[-1][f] + _CONTINUE_TAG
    return final


def render(conversations: list[Conversation], source: str, add_generation_prompt: bool = False,
           continue_final_message: bool | str = False, tools: list[dict] | None = None,
           documents: list[dict] | None = None, **variables: Any) -> list[str]:
    """Render each conversation with the template `source`; `variables` are extra template variables."""
    if continue_final_message and add_generation_prompt:
        raise ValueError("continue_final_message and add_generation_prompt are not compatible: the first continues "
                         "the last message, the second starts a new assistant message")
    if tools is not None and not all(isinstance(tool, dict) for tool in tools):
        raise TypeError("tools must be JSON-schema dicts")
    if documents is not None and not all(isinstance(doc, dict) for doc in documents):
        raise TypeError("documents must be dicts with 'title' and 'text' keys")
    template = compile_template(source)
    tools, documents, variables = _plain(tools), _plain(documents), _plain(variables)
    rendered = []
    for chat in conversations:
        chat = _alias_reasoning(_plain(chat))
        final = None
        if continue_final_message:
            if not chat:
                raise ValueError("continue_final_message is set but the conversation is empty")
            field = continue_final_message if isinstance(continue_final_message, str) else "content"
            final = _mark_final_message(chat, field, source)
        try:
            text = template.render(messages=chat, tools=tools, documents=documents,
                                   add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.exceptions.TemplateError as err:
            raise ValueError(f"the chat template failed: {err}") from err
        if final is not None:
            if final.strip() not in text or _CONTINUE_TAG.strip() not in text:
                raise ValueError("continue_final_message is set but the final message does not appear in the "
                                 f"rendered chat; the template drops part of it. Final message: {final.strip()!r}")
            cut = text.rindex(_CONTINUE_TAG.strip())
            text = text[:cut] if text[cut:cut + len(_CONTINUE_TAG)] == _CONTINUE_TAG else text[:cut].rstrip()
        rendered.append(text)
    return rendered
