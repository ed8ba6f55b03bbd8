"""A tokenizer's chat template rendered as ``transformers``' ``apply_chat_template``
renders it: Jinja2 in an immutable sandbox (templates come with checkpoints, so they are
untrusted code), blocks trimmed, loop controls, ``raise_exception``, a ``tojson`` that
leaves HTML alone, ``strftime_now``, and the ``{% generation %}`` tag (its body is
rendered as is)."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

__all__ = ["ChatTemplate", "TemplateError"]


class TemplateError(ValueError):
    """The template refused the conversation (its ``raise_exception``) or failed on it."""


class ChatTemplate:
    """``render(messages)``: the prompt text for a conversation, with the tokenizer's
    special tokens (``bos_token``, ``eos_token``, ...) as template variables."""

    def __init__(self, source: str, special_tokens: dict[str, str]) -> None:
        import jinja2

        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateError as exc:
            raise TemplateError(str(exc)) from None
        self.special_tokens = dict(special_tokens)

    def render(self, messages: list[dict[str, Any]], *,
               add_generation_prompt: bool = True) -> str:
        import jinja2

        try:
            text: str = self._template.render(
                messages=messages, tools=None, documents=None,
                add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except jinja2.TemplateError as exc:
            raise TemplateError(f"the model's chat template refused the messages: "
                                f"{exc}") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
            raise TemplateError(f"the model's chat template failed on the messages: "
                                f"{type(exc).__name__}: {exc}") from None
        return text


def _environment() -> Any:
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` marks what the assistant said
        (transformers uses it to mask training labels); here it renders its body."""

        tags = {"generation"}  # noqa: RUF012 (jinja2 reads it as a class attribute)

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [],
                                          body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return str(caller())

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: Any = None, sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                          separators=separators, sort_keys=sort_keys)

    def strftime_now(format: str) -> str:
        return datetime.now().strftime(format)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env
