"""Chat messages -> prompt text with the model folder's Jinja chat template (layer 6; no jax).

Where the template comes from (first found): `chat_template.jinja` in the model folder,
then `tokenizer_config.json`'s "chat_template" (a string, or a list of {name, template}
of which the one named "default" is taken).

It is rendered the way `transformers`' `apply_chat_template` renders it, so a prompt is
the same text the model was trained / evaluated with: a sandboxed (immutable) Jinja
environment with trim_blocks and lstrip_blocks, the loop-control extension, a
`{% generation %}` block tag (rendered as its body), the globals `raise_exception`
and `strftime_now`, a `tojson` filter that keeps non-ASCII text, and the variables
`messages`, `tools`, `documents`, `add_generation_prompt` plus the special tokens of
tokenizer_config.json / special_tokens_map.json (`bos_token`, `eos_token`, ...).

The rendered text is tokenized WITHOUT the tokenizer's own special tokens (templates
write BOS themselves; transformers' `apply_chat_template(tokenize=True)` does the same).
"""
from __future__ import annotations

import datetime
import json
import os
from typing import Any, Optional, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                       "mask_token")


class ChatTemplateError(ValueError):
    """The template refused the conversation (raise_exception) or failed to render."""


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (marks assistant text for training masks): the body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    @staticmethod
    def _body(caller):
        return caller()


def _raise_exception(message):
    raise ChatTemplateError(str(message))


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _token_text(value) -> Optional[str]:
    """A special token entry: "<s>" or {"content": "<s>", ...}."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


class ChatTemplate:
    """A compiled chat template plus the special-token variables it is rendered with."""

    def __init__(self, source: str, special_tokens: Optional[dict] = None):
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        self._template = _environment().from_string(source)  # jinja2.TemplateSyntaxError if malformed

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = True, tools=None, documents=None,
               **extra: Any) -> str:
        """The prompt text of `messages` (dicts with "role" and "content").

        `extra` (e.g. a request's chat_template_kwargs) become template variables too;
        they cannot replace `messages` or `add_generation_prompt`.
        Raises:
          ChatTemplateError: the template raised (e.g. an unsupported role order) or failed.
        """
        variables = {**self.special_tokens, **extra, "messages": list(messages), "tools": tools,
                     "documents": documents, "add_generation_prompt": bool(add_generation_prompt)}
        try:
            return self._template.render(**variables)
        except ChatTemplateError:
            raise
        except jinja2.TemplateError as e:  # undefined names, sandbox refusals, ...
            raise ChatTemplateError(f"the chat template failed: {type(e).__name__}: {e}") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
            raise ChatTemplateError(f"the chat template failed: {type(e).__name__}: {e}") from None


def find_template_source(model_path: Optional[str]) -> Optional[str]:
    """The template text of a model folder, or None when it has none."""
    if not model_path or not os.path.isdir(model_path):
        return None
    file = os.path.join(model_path, TEMPLATE_FILE)
    if os.path.isfile(file):
        with open(file, encoding="utf-8") as f:
            return f.read()
    value = _read_json(os.path.join(model_path, TOKENIZER_CONFIG)).get("chat_template")
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # named templates: take "default"
        for entry in value:
            if isinstance(entry, dict) and entry.get("name") == "default" and isinstance(entry.get("template"), str):
                return entry["template"]
    return None


def special_tokens(model_path: Optional[str]) -> dict:
    """{"bos_token": "<s>", ...} from tokenizer_config.json, else special_tokens_map.json."""
    if not model_path:
        return {}
    out: dict = {}
    for name in (SPECIAL_TOKENS_MAP, TOKENIZER_CONFIG):  # the tokenizer config wins
        config = _read_json(os.path.join(model_path, name))
        for key in _SPECIAL_TOKEN_KEYS:
            text = _token_text(config.get(key))
            if text is not None:
                out[key] = text
    return out


def load_chat_template(model_path: Optional[str]) -> Optional[ChatTemplate]:
    """The folder's ChatTemplate, None when it has none.

    Raises:
      ValueError: the template (or a config file) exists but cannot be read or compiled.
    """
    source = find_template_source(model_path)
    if source is None:
        return None
    try:
        return ChatTemplate(source, special_tokens(model_path))
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat_template: the model's chat template does not compile: {e}") from None
