"""Tokenizer from tokenizer.json (the `tokenizers` library), incremental detokenization and stop strings."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from lorafleet.infra.errors import InvalidModel

# Prompt tokens decoded with the first output tokens, so word-boundary spaces come out right.
_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Text of the output tokens so far, grown one token at a time (vLLM's prefix/read offsets).

    Decoding a window [prefix_offset:] and subtracting the text of [prefix_offset:read_offset] gives the new
    text; a window that ends in an incomplete UTF-8 sequence ("\\ufffd") waits for the next token.
    """

    __slots__ = ("tokenizer", "tokens", "prefix_offset", "read_offset", "text", "skip_special_tokens")

    def __init__(self, tokenizer: HFTokenizer, prompt_ids: list[int], skip_special_tokens: bool) -> None:
        self.tokenizer = tokenizer
        self.tokens = list(prompt_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.tokens)
        self.text = ""
        self.skip_special_tokens = skip_special_tokens

    def add(self, token_id: int) -> str:
        """Append one token; returns the new text it completes (possibly empty)."""
        self.tokens.append(token_id)
        decode = self.tokenizer.decode
        prefix = decode(self.tokens[self.prefix_offset:self.read_offset], skip_special_tokens=self.skip_special_tokens)
        window = decode(self.tokens[self.prefix_offset:], skip_special_tokens=self.skip_special_tokens)
        if len(window) <= len(prefix) or window.endswith("\ufffd"):
            return ""
        delta = window[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
        self.text += delta
        return delta

    def flush(self) -> str:
        """At the end of generation: emit whatever the last tokens decode to, complete or not."""
        if self.read_offset == len(self.tokens):
            return ""
        decode = self.tokenizer.decode
        prefix = decode(self.tokens[self.prefix_offset:self.read_offset], skip_special_tokens=self.skip_special_tokens)
        delta = decode(self.tokens[self.prefix_offset:], skip_special_tokens=self.skip_special_tokens)[len(prefix):]
        self.prefix_offset = self.read_offset = len(self.tokens)
        self.text += delta
        return delta


def find_stop(text: str, stops: tuple[str, ...], num_new_chars: int) -> int | None:
    """Index where the earliest stop string starts in `text`, looking only where the last num_new_chars
    could have completed one; None if none does."""
    found = None
    for stop in stops:
        start = max(0, len(text) - num_new_chars - len(stop) + 1)
        index = text.find(stop, start)
        if index >= 0 and (found is None or index < found):
            found = index
    return found


class Tokenizer:
    """encode / decode with the checkpoint's special tokens; EOS ids from generation_config.json or config.json."""

    def __init__(self, tokenizer: HFTokenizer, eos_token_ids: tuple[int, ...], bos_token_id: int | None,
                 chat_template: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.bos_token_id = bos_token_id
        self.chat_template = chat_template

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, config_eos: tuple[int, ...] = ()) -> Tokenizer:
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise InvalidModel(f"{path}: tokenizer.json not found (only `tokenizers` fast tokenizers are supported)")
        tokenizer = HFTokenizer.from_file(str(path))
        settings = _read_json(model_dir / "tokenizer_config.json")
        generation = _read_json(model_dir / "generation_config.json")
        eos = generation.get("eos_token_id")
        eos_ids = tuple(eos if isinstance(eos, list) else [eos]) if eos is not None else config_eos
        if not eos_ids and isinstance(settings.get("eos_token"), str):
            eos_id = tokenizer.token_to_id(settings["eos_token"])
            eos_ids = (eos_id,) if eos_id is not None else ()
        bos = settings.get("bos_token")
        bos_id = tokenizer.token_to_id(bos) if isinstance(bos, str) else None
        return cls(tokenizer, eos_ids, bos_id, _chat_template(model_dir, settings))

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def detokenizer(self, prompt_ids: list[int], skip_special_tokens: bool = True) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self.tokenizer, prompt_ids, skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render the checkpoint's Jinja chat template (jinja2 is imported only here)."""
        if not self.chat_template:
            raise InvalidModel("the model has no chat template (chat_template.jinja or tokenizer_config.json "
                               "chat_template); use /v1/completions")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        template = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(self.chat_template)
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt)


def _chat_template(model_dir: Path, settings: dict) -> str | None:
    """chat_template.jinja (what transformers >= 5 writes), else tokenizer_config.json's chat_template (a string,
    or a list of named templates of which 'default' is used)."""
    path = model_dir / "chat_template.jinja"
    if path.is_file():
        return path.read_text()
    template = settings.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidModel(f"{path}: not valid JSON ({exc})") from None
    return data if isinstance(data, dict) else {}
