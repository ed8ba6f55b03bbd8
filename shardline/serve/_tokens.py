"""Text to token ids and back for a completion model: bytes for the reference GPT, a
Hugging Face ``tokenizer.json`` (with its chat template) for a checkpoint directory.

Generated tokens are turned into text as they come, so a stream can send each piece at
once; a piece is held back while it ends inside a character (a byte-level token that
carries half of one, shown as U+FFFD until the rest comes)."""

from __future__ import annotations

import codecs
import json
from pathlib import Path
from typing import Any, Protocol

from ._chat import ChatTemplate, TemplateError

__all__ = ["ByteTokens", "Decoder", "HFTokens", "Tokens", "TokensError"]


class TokensError(ValueError):
    """A tokenizer directory that cannot be used (missing or unreadable files)."""


class Decoder(Protocol):
    def add(self, token: int) -> str:
        """The text ``token`` completes, maybe ``""`` (held until a character ends)."""

    def flush(self) -> str:
        """What is still held, at the end of the generation."""


class Tokens(Protocol):
    context: int
    """Tokens the model takes, prompt and completion together."""
    eos: frozenset[int]
    """Tokens that end a generation (not part of its text)."""
    chat: ChatTemplate | None

    def encode(self, text: str, special: bool = True) -> list[int]:
        """``special``: add what the tokenizer adds around a text (a BOS token); a chat
        template writes those itself."""

    def decoder(self, prompt: list[int]) -> Decoder: ...


class ByteTokens:
    """The reference GPT's: a token is a byte of UTF-8 (vocabulary 256), no EOS."""

    eos: frozenset[int] = frozenset()
    chat: ChatTemplate | None = None

    def __init__(self, context: int) -> None:
        self.context = context

    def encode(self, text: str, special: bool = True) -> list[int]:
        return list(text.encode("utf-8"))

    def decoder(self, prompt: list[int]) -> Decoder:
        return _ByteDecoder()


class _ByteDecoder:
    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token: int) -> str:
        return self._utf8.decode(bytes([token]))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


class HFTokens:
    """A checkpoint directory's ``tokenizer.json`` (read with ``tokenizers``), its
    ``tokenizer_config.json`` (special tokens, chat template; or ``chat_template.jinja``)
    and the model's context and EOS (given by the caller, from ``config.json`` and
    ``generation_config.json``; the tokenizer's ``eos_token`` if the model names none)."""

    def __init__(self, directory: str | Path, *, context: int,
                 eos: int | list[int] | None) -> None:
        from tokenizers import Tokenizer

        directory = Path(directory)
        file = directory / "tokenizer.json"
        if not file.is_file():
            raise TokensError(f"{directory} has no tokenizer.json (the fast tokenizer file "
                              "transformers saves with save_pretrained)")
        try:
            self._tok = Tokenizer.from_file(str(file))
        except Exception as exc:  # the Rust side raises plain Exception
            raise TokensError(f"cannot read {file}: {exc}") from None
        self._tok.no_padding()
        self._tok.no_truncation()
        config = _json(directory / "tokenizer_config.json")
        self.special = _special_tokens(config)
        self.context = context
        ids = [eos] if isinstance(eos, int) else list(eos or [])
        if not ids and "eos_token" in self.special:
            found = self._tok.token_to_id(self.special["eos_token"])
            ids = [] if found is None else [found]
        self.eos = frozenset(ids)
        template = _chat_template(directory, config)
        try:
            self.chat = None if template is None else ChatTemplate(template, self.special)
        except TemplateError as exc:
            raise TokensError(f"the chat template of {directory} does not parse: "
                              f"{exc}") from None

    def encode(self, text: str, special: bool = True) -> list[int]:
        ids: list[int] = self._tok.encode(text, add_special_tokens=special).ids
        return ids

    def decode(self, ids: list[int]) -> str:
        text: str = self._tok.decode(ids, skip_special_tokens=True)
        return text

    def decoder(self, prompt: list[int]) -> Decoder:
        return _TextDecoder(self, prompt)


class _TextDecoder:
    """Incremental detokenizing as vLLM and TGI do it: decode a window that starts a few
    tokens back (so a word's leading space, which some decoders drop at the start of a
    text, comes out right) and send what it adds beyond the window's older part."""

    CONTEXT = 5

    def __init__(self, tokens: HFTokens, prompt: list[int]) -> None:
        self._tokens = tokens
        self._ids = list(prompt[-self.CONTEXT:])
        self._prefix = 0           # where the window starts
        self._read = len(self._ids)  # what has been sent up to

    def add(self, token: int) -> str:
        self._ids.append(token)
        return self._take(final=False)

    def flush(self) -> str:
        return self._take(final=True)

    def _take(self, final: bool) -> str:
        decode = self._tokens.decode
        before = decode(self._ids[self._prefix:self._read])
        now = decode(self._ids[self._prefix:])
        if len(now) <= len(before) or (now.endswith("\ufffd") and not final):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return now[len(before):]


def _json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TokensError(f"cannot read {path}: {exc}") from None
    return data if isinstance(data, dict) else {}


def _special_tokens(config: dict[str, Any]) -> dict[str, str]:
    """``bos_token``, ``eos_token``... as strings (a config may give ``{"content": s}``)."""
    out: dict[str, str] = {}
    for key, value in config.items():
        if not key.endswith("_token"):
            continue
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            out[key] = value
    return out


def _chat_template(directory: Path, config: dict[str, Any]) -> str | None:
    """The default chat template: ``tokenizer_config.json``'s ``chat_template`` (a string,
    or a list of named ones), else ``chat_template.jinja`` (transformers >= 4.43)."""
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if isinstance(template, str):
        return template
    file = directory / "chat_template.jinja"
    return file.read_text(encoding="utf-8") if file.is_file() else None
