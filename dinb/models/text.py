"""A decoder's text side, read from its Hugging Face folder: token ids to text and back
(``tokenizer.json``), the end tokens and the default sampling (``generation_config.json``), the
chat template (``tokenizer_config.json``'s ``chat_template``, or ``chat_template.jinja``), and
what the CLI and the magics print while a generation streams.

The chat template is rendered as transformers' ``apply_chat_template`` renders it: Jinja2 in a
sandbox with ``trim_blocks`` and ``lstrip_blocks``, ``raise_exception`` and ``strftime_now`` as
globals, ``tojson`` as a filter, and the tokenizer's special tokens (``bos_token``,
``eos_token``, ...) as variables; its text is then encoded without adding special tokens (the
template writes them).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dinb.errors import DinbError, InputError

#: what ``generate`` produces when no count is given: as many as the cache holds, at most this
DEFAULT_NEW_TOKENS = 64


@dataclass(frozen=True)
class TokenCodec:
    """Text to token ids and back with a checkpoint's ``tokenizer.json``, its end tokens and its
    chat template."""

    tokenizer: Any
    stop_ids: tuple[int, ...]
    where: str
    template: str | None = None
    special_tokens: dict[str, str] = field(default_factory=dict)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self.tokenizer is None:
            raise DinbError(f"no tokenizer.json in {self.where}; give the prompt as token ids (--ids 1,5,9) "
                            "or a --tokenizer directory")
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def render_chat(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The chat template applied to ``messages`` (``[{"role": ..., "content": ...}]``)."""
        if self.template is None:
            raise DinbError(f"{self.where} has no chat template (tokenizer_config.json's chat_template or "
                            "chat_template.jinja); give the prompt as text instead")
        check_messages(messages)
        return render_template(self.template, messages, add_generation_prompt, self.special_tokens)

    def encode_chat(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        """The token ids of ``messages`` under the chat template, the assistant's turn opened."""
        return self.encode(self.render_chat(messages), add_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids`` up to the first end token."""
        ids = list(ids)
        cut = next((i for i, t in enumerate(ids) if t in self.stop_ids), len(ids))
        if self.tokenizer is None:
            return " ".join(map(str, ids[:cut]))
        return str(self.tokenizer.decode(ids[:cut]))


def token_codec(model_dir: str | Path | None, config: dict[str, Any]) -> TokenCodec:
    """The tokenizer of ``model_dir`` (None without a ``tokenizer.json``), the end tokens of the
    config and of ``generation_config.json``, and the chat template."""
    folder = Path(model_dir) if model_dir else None
    tokenizer = None
    if folder is not None and (folder / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    stops = list(config.get("eos_token_id") or ()) + generation_defaults(folder).get("eos_token_id", [])
    template, special = chat_template(folder)
    stop_ids = tuple(dict.fromkeys(int(t) for t in stops))
    return TokenCodec(tokenizer, stop_ids, str(model_dir), template, special)


def _read_json(path: Path) -> dict[str, Any]:
    import json

    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise DinbError(f"{path} is not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise DinbError(f"{path}: expected a JSON object")
    return data


def generation_defaults(folder: Path | None) -> dict[str, Any]:
    """``generation_config.json``'s end tokens (``eos_token_id``, a list) and, where it samples
    (``do_sample``), its ``temperature``, ``top_k`` and ``top_p``: what a generation uses when
    the caller gives none."""
    data = _read_json(folder / "generation_config.json") if folder is not None else {}
    out: dict[str, Any] = {}
    eos = data.get("eos_token_id")
    if eos is not None:
        out["eos_token_id"] = [int(t) for t in (eos if isinstance(eos, list) else [eos])]
    if data.get("do_sample"):
        for key in ("temperature", "top_k", "top_p"):
            if data.get(key) is not None:
                out[key] = data[key]
    return out


def chat_template(folder: Path | None) -> tuple[str | None, dict[str, str]]:
    """The folder's chat template (``tokenizer_config.json``'s ``chat_template``: a string, or a
    list of named ones of which ``default`` is taken; else ``chat_template.jinja``) and its
    special tokens by name (``bos_token``, ``eos_token``, ...)."""
    if folder is None:
        return None, {}
    config = _read_json(folder / "tokenizer_config.json")
    special = {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            special[key] = value
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text()
    return (template if isinstance(template, str) else None), special


def check_messages(messages: Any) -> None:
    """A chat is a list of ``{"role": str, "content": str}``; anything else is a clear error."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InputError("messages: give a non-empty list of {'role': ..., 'content': ...}")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise InputError(f"messages[{i}]: give {{'role': str, 'content': str}}, got {m!r}")


def render_template(template: str, messages: Sequence[dict[str, Any]], add_generation_prompt: bool,
                    special: dict[str, str]) -> str:
    """Render a chat template as transformers does (see the module docstring)."""
    import json
    from datetime import datetime

    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: \
        json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f))
    try:
        return env.from_string(template).render(messages=list(messages),
                                                add_generation_prompt=add_generation_prompt, **special)
    except jinja2.exceptions.TemplateError as e:
        raise InputError(f"the chat template failed: {e}") from None



def default_new_tokens(max_len: int, prompt_lengths: Sequence[int]) -> int:
    """New tokens when none are asked for: what the cache holds after the longest prompt, at
    most :data:`DEFAULT_NEW_TOKENS` (and at least one)."""
    return max(1, min(DEFAULT_NEW_TOKENS, max_len - max(prompt_lengths) + 1))


def ms_per_step(timings: dict[str, Any]) -> float:
    """Milliseconds per decode step from a generation's ``timings`` (``decode_s``, ``decode_steps``)."""
    return 1000 * float(timings.get("decode_s", 0.0)) / max(int(timings.get("decode_steps", 0)), 1)


class TextStream:
    """``on_token`` for one sequence that prints its new text as the tokens come (a token may
    end in the middle of a character: only the text it completes is printed)."""

    def __init__(self, codec: TokenCodec, write: Callable[[str], Any] | None = None):
        self.codec, self.tokens = codec, []
        self.write = write or (lambda text: print(text, end="", flush=True))

    def __call__(self, row: int, token: int) -> None:
        before = self.codec.decode(self.tokens)
        self.tokens.append(token)
        self.write(self.codec.decode(self.tokens)[len(before):])
