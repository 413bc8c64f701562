"""Tokenizer, chat template and incremental detokenization, over a Hugging Face fast tokenizer.

Loaded from a Hugging Face folder (tokenizer.json, tokenizer_config.json) or from a GGUF file's metadata
(transformers converts it; the converted tokenizer is cached under ``$PDSERVE_CACHE/tokenizers`` so later
loads skip the conversion). transformers is imported lazily: it takes seconds.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pdserve.errors import InvalidRequestError, ModelLoadError
from pdserve.model.registry import checkpoint_path
from pdserve.paths import cache_dir

logger = logging.getLogger(__name__)

# Tokens of context kept before the read offset, so merges and leading spaces decode as in the full text.
_PREFIX_CONTEXT = 5


class Tokenizer:
    """Text <-> token ids for one model. ``eos_token_ids`` joins the tokenizer's eos with the model's."""

    def __init__(self, hf_tokenizer: Any, eos_token_ids: tuple[int, ...] = ()) -> None:
        self.hf = hf_tokenizer
        own = () if hf_tokenizer.eos_token_id is None else (int(hf_tokenizer.eos_token_id),)
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(own + tuple(eos_token_ids)))
        self.bos_token_id: int | None = hf_tokenizer.bos_token_id
        self.vocab_size: int = len(hf_tokenizer)  # base vocabulary plus added tokens
        self.chat_template: str | None = getattr(hf_tokenizer, "chat_template", None)

    @classmethod
    def from_pretrained(cls, path: str | Path, eos_token_ids: tuple[int, ...] = ()) -> Tokenizer:
        """From a Hugging Face folder or a ``.gguf`` file (raises ModelLoadError when neither works)."""
        path = Path(path).expanduser()
        if path.is_file() and path.suffix == ".gguf":
            return cls(_load_gguf_tokenizer(path), eos_token_ids)
        if path.is_dir():
            from transformers import AutoTokenizer

            try:
                return cls(AutoTokenizer.from_pretrained(str(path), local_files_only=True), eos_token_ids)
            except (OSError, ValueError) as e:
                raise ModelLoadError(f"cannot load a tokenizer from {path}: {e}") from e
        raise ModelLoadError(f"no tokenizer at {path} (expected a .gguf file or a Hugging Face folder)")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        """Raw vocabulary strings (byte-level symbols included), e.g. for logprobs."""
        return self.hf.convert_ids_to_tokens(ids)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tokenize: bool = True, **template_kwargs: Any) -> list[int] | str:
        """Render ``messages`` with the model's chat template; token ids, or the text if not ``tokenize``.
        Raises InvalidRequestError when the model has no template or the messages do not fit it."""
        if not self.chat_template:
            raise InvalidRequestError("this model has no chat template; use the completions API", "messages")
        try:
            text = self.hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                               tokenize=False, **template_kwargs)
        except Exception as e:  # jinja2 TemplateError / raise_exception() in templates: bad user messages
            raise InvalidRequestError(f"messages do not fit the chat template: {e}", "messages") from e
        # Special tokens are in the rendered text already (as transformers does when it tokenizes).
        return self.encode(text, add_special_tokens=False) if tokenize else text


class IncrementalDetokenizer:
    """Text deltas for a growing token stream, exact across multi-byte characters and merges.

    Keeps a window of ids ``[prefix_offset, read_offset)`` already turned into text; each push decodes
    the window plus the new ids and emits what extends the window's text, unless it ends in an
    incomplete UTF-8 sequence (U+FFFD), in which case the ids wait for the next push.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = list(prompt_ids)
        self.read_offset = len(self.ids)
        self.prefix_offset = max(self.read_offset - _PREFIX_CONTEXT, 0)
        self.text = ""  # all output text emitted so far

    def push(self, new_ids: list[int]) -> str:
        """Append ``new_ids``; return the new text (possibly empty)."""
        if not new_ids:
            return ""
        self.ids.extend(new_ids)
        decode = self.tokenizer.decode
        prefix_text = decode(self.ids[self.prefix_offset:self.read_offset], self.skip_special_tokens)
        full_text = decode(self.ids[self.prefix_offset:], self.skip_special_tokens)
        if len(full_text) <= len(prefix_text) or full_text.endswith("\ufffd"):
            return ""
        delta = full_text[len(prefix_text):]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        self.text += delta
        return delta


def load_tokenizer(model: str | Path, eos_token_ids: tuple[int, ...] = ()) -> Tokenizer:
    """The tokenizer of a model name (``smollm2-135m``), GGUF file or Hugging Face folder."""
    return Tokenizer.from_pretrained(checkpoint_path(str(model)), eos_token_ids)


def _load_gguf_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    stat = path.stat()
    cached = cache_dir() / "tokenizers" / f"{path.stem}-{stat.st_size}-{stat.st_mtime_ns}"
    if (cached / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(cached), local_files_only=True)
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    except Exception as e:  # conversion errors vary by tokenizer model (KeyError, ValueError, ...)
        raise ModelLoadError(f"cannot build a tokenizer from GGUF file {path}: "
                             f"{type(e).__name__}: {e}") from e
    _save_atomically(tok, cached)
    return tok


def _save_atomically(tok: Any, dest: Path) -> None:
    """Save into a temporary sibling folder, then rename: concurrent processes never see half a cache."""
    import shutil
    import tempfile

    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=dest.parent))
        tok.save_pretrained(str(tmp))
        try:
            tmp.rename(dest)
        except OSError:  # another process got there first: keep its copy
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:
        logger.warning("cannot cache the converted tokenizer in %s: %s", dest, e)
