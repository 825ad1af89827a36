"""The tokenizer of a checkpoint directory: ``tokenizer.json`` + ``tokenizer_config.json`` (+ the eos ids
of ``generation_config.json`` when present), with the checkpoint's own jinja2 chat template."""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer


def _raise(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


class Tokenizer:
    """Text <-> token ids and chat prompts for one checkpoint; build with ``Tokenizer.from_dir``."""

    def __init__(self, tokenizer: _HFTokenizer, config: dict[str, Any], generation_config: dict | None = None):
        self._tok = tokenizer
        self.config = config
        self._generation_config = generation_config or {}

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise ValueError(f"{tok_file} is missing: a checkpoint directory needs a tokenizers-format tokenizer.json")
        cfg_file, gen_file = path / "tokenizer_config.json", path / "generation_config.json"
        config = json.loads(cfg_file.read_text(encoding="utf-8")) if cfg_file.is_file() else {}
        generation = json.loads(gen_file.read_text(encoding="utf-8")) if gen_file.is_file() else None
        return cls(_HFTokenizer.from_file(str(tok_file)), config, generation)

    # -- token ids ---------------------------------------------------------------------------------------
    def token_to_id(self, token: str) -> int:
        tid = self._tok.token_to_id(token)
        if tid is None:
            raise ValueError(f"token {token!r} is not in the vocabulary")
        return tid

    def _special(self, key: str, default: str) -> str:
        value = self.config.get(key) or default
        return value["content"] if isinstance(value, dict) else value  # older configs nest AddedToken dicts

    @property
    def bos_token(self) -> str:
        return self._special("bos_token", "<|begin_of_text|>")

    @property
    def eos_token(self) -> str:
        return self._special("eos_token", "<|eot|>")

    @property
    def bos_token_id(self) -> int:
        return self.token_to_id(self.bos_token)

    @cached_property
    def eos_token_ids(self) -> tuple[int, ...]:
        # generation_config.json is what generation stops on (Llama 4 lists end_of_text, eom and eot);
        # tokenizer_config's single eos_token is the fallback.
        eos = self._generation_config.get("eos_token_id")
        if eos is None:
            return (self.token_to_id(self.eos_token),)
        return tuple(eos) if isinstance(eos, list) else (eos,)

    @property
    def pad_token_id(self) -> int | None:
        return self.token_to_id(self._special("pad_token", "")) if self.config.get("pad_token") else None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    # -- text <-> ids ------------------------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        # tokenizer.json has no post-processor, so BOS is ours to add (once: a chat template already has it).
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return [self.bos_token_id, *ids] if add_bos else ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # -- chat ----------------------------------------------------------------------------------------------
    @cached_property
    def _chat_template(self) -> jinja2.Template:
        source = self.config.get("chat_template")
        if not source:
            raise ValueError("tokenizer_config.json has no chat_template")
        # The same environment transformers renders chat templates in, so both give identical strings.
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = _raise
        return env.from_string(source)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """Render ``messages`` ([{"role": ..., "content": ...}, ...]) to the prompt text, BOS included;
        encode the result with ``add_bos=False``."""
        return self._chat_template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                          bos_token=self.bos_token, eos_token=self.eos_token)
