"""Tokenizer loading for minihuatuo: tokenizer.json through the `tokenizers` library, the special
tokens (BOS, the stop ids, PAD) from tokenizer_config.json and generation_config.json, and the
chat format found by chat_templates.py.
"""

from __future__ import annotations

import json
import os

from tokenizers import Tokenizer as _Backend

from minihuatuo.engine.chat_templates import (CHAT_TEMPLATE_FILE, KINDS, OTHER_MARKERS, PLAIN_TOKENS,
                                              ChatTemplate, detect_template, read_chat_template)


def _read_json(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_str(v) -> str | None:
    # tokenizer_config stores special tokens either as "<|x|>" or as
    # {"content": "<|x|>", "lstrip": ..., ...} (an AddedToken dump).
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


def _as_list(v) -> list[int]:
    if v is None:
        return []
    return [int(x) for x in (v if isinstance(v, (list, tuple)) else [v])]


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special ids and chat format of a checkpoint.

    When the checkpoint's chat format is unknown there is no template (the
    `template` property raises) and `template_error` says why: only rendering a
    chat fails, with that message; encode and decode work as always.
    """

    def __init__(self, backend: _Backend, *, bos_id: int | None, eos_ids: list[int], pad_id: int,
                 template: ChatTemplate | None, template_error: str | None = None):
        self.backend = backend
        self.bos_id = bos_id
        self.eos_ids = list(eos_ids)
        # the tokenizer's own eos_token (tokenizer_config.json), the one id the official PPO run
        # stops at (TRL: tokenizer.eos_token_id); from_dir sets it, else the first stop id
        self.eos_token_id = self.eos_ids[0] if self.eos_ids else None
        self.pad_id = pad_id
        self._template = template
        self.template_error = template_error if template is None else None

    @property
    def template(self) -> ChatTemplate:
        """The chat format; ValueError (naming the checkpoint's file and the way out) when unknown."""
        if self._template is None:
            raise ValueError(self.template_error or f"no chat template; pass chat_format, one of {', '.join(KINDS)}")
        return self._template

    @property
    def has_chat_template(self) -> bool:
        return self._template is not None

    @classmethod
    def from_dir(cls, path: str | os.PathLike, date_string: str | None = None,
                 chat_format: str | None = None) -> "Tokenizer":
        """Load tokenizer.json and the special tokens and chat format of a checkpoint directory.

        chat_format: one of KINDS to use that hand-written format and ignore the
        checkpoint's own template, parameters included (ChatML then gets no
        default system prompt, llama3.1 the December 2023 cutoff). None: the
        format is recognised from the checkpoint's template (`read_chat_template`);
        when that fails, loading succeeds and only rendering a chat raises.
        """
        path = os.fspath(path)
        if chat_format is not None and chat_format not in KINDS:
            raise ValueError(f"chat format {chat_format!r}: expected one of {', '.join(KINDS)}")
        tok_file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tok_file):
            raise FileNotFoundError(f"no tokenizer.json in {path!r} (looked for {tok_file!r})")
        try:
            backend = _Backend.from_file(tok_file)
        except Exception as e:  # the Rust side raises a bare Exception
            raise ValueError(f"{tok_file}: cannot load ({e})") from e
        # tokenizer.json may carry padding/truncation settings; encode must
        # return exactly the tokens of the text, so switch both off.
        backend.no_padding()
        backend.no_truncation()
        cfg_file = os.path.join(path, "tokenizer_config.json")
        cfg = _read_json(cfg_file) or {}
        gen = _read_json(os.path.join(path, "generation_config.json")) or {}

        def tid(tok: str) -> int:
            i = backend.token_to_id(tok)
            if i is None:
                raise ValueError(f"{cfg_file}: token {tok!r} is not in {tok_file}")
            return i

        # added_tokens_decoder repeats ids that tokenizer.json already holds; a
        # disagreement means the two files come from different checkpoints.
        for k, v in (cfg.get("added_tokens_decoder") or {}).items():
            t = _token_str(v)
            i = backend.token_to_id(t) if t is not None else None
            if i is not None and i != int(k):
                raise ValueError(f"{cfg_file}: {t!r} has id {k} but {i} in {tok_file}")

        # BOS: tokenizer_config wins when it has the key at all. Qwen2.5 sets
        # bos_token null there but bos_token_id in generation_config, and its
        # tokenizer never emits that token, so the honest answer is None.
        if "bos_token" in cfg:
            bos = _token_str(cfg["bos_token"])
            bos_id = tid(bos) if bos else None
        else:
            bos_id = next(iter(_as_list(gen.get("bos_token_id"))), None)

        template, template_error = cls._chat_template(path, cfg, backend, chat_format, date_string)

        # EOS: generation stops on any of them. Llama-3.1-Instruct lists
        # [<|end_of_text|>, <|eom_id|>, <|eot_id|>] in generation_config while
        # tokenizer_config names only <|eot_id|>; take the union, in order.
        # The token that closes an assistant turn in the chat format is always
        # one of them: a chat reply ends there even when the configs name only
        # the end of a document (the plain format's <|end|>, a base model given
        # a format with chat_format).
        eos_ids = _as_list(gen.get("eos_token_id"))
        eos = _token_str(cfg.get("eos_token"))
        extra = [tid(eos)] if eos else []
        if template is not None and backend.token_to_id(template.end_of_turn) is not None:
            extra.append(backend.token_to_id(template.end_of_turn))
        for i in extra:
            if i not in eos_ids:
                eos_ids.append(i)

        # PAD: only fills positions that the attention mask and the loss
        # ignore, so any valid id works. Llama-3 defines no pad token; like
        # transformers' generate() we then use the (first) EOS id, which always
        # exists in the embedding table. 0 is the last resort.
        pad = _token_str(cfg.get("pad_token"))
        if pad:
            pad_id = tid(pad)
        elif gen.get("pad_token_id") is not None:
            pad_id = int(gen["pad_token_id"])
        else:
            pad_id = eos_ids[0] if eos_ids else 0

        # The Llama templates write {{ bos_token }}, i.e. the configured string.
        if template is not None and template.kind in ("llama3", "llama3.1"):
            template.bos_token = _token_str(cfg.get("bos_token")) or template.bos_token
        tokenizer = cls(backend, bos_id=bos_id, eos_ids=eos_ids, pad_id=pad_id, template=template,
                        template_error=template_error)
        if eos:
            tokenizer.eos_token_id = tid(eos)
        return tokenizer

    @staticmethod
    def _chat_template(path: str, cfg: dict, backend: _Backend, chat_format: str | None,
                       date_string: str | None) -> tuple[ChatTemplate | None, str | None]:
        """(template, None), or (None, the message that rendering a chat will raise)."""
        if chat_format is not None:
            return ChatTemplate(chat_format, date_string=date_string), None
        src, where = read_chat_template(path, cfg)
        how = (f"pass chat_format=NAME (the --chat-template NAME flag) to use one of the hand-written "
               f"formats: {', '.join(KINDS)}")
        if src is not None:
            template = detect_template(src, date_string)
            if template is None:
                return None, (f"{where}: chat template not recognised as any hand-written format "
                              f"(Llama-3, Llama-3.1/3.2, ChatML, plain); {how}")
            return template, None
        # No template anywhere. Our own tiny checkpoints (tests, benchmarks) are
        # saved without one; a vocabulary holding every role token of the plain
        # format and no other format's markers was made for the plain format.
        vocab = backend.get_vocab(with_added_tokens=True)
        if all(t in vocab for t in PLAIN_TOKENS) and not any(t in vocab for t in OTHER_MARKERS):
            return ChatTemplate("plain"), None
        return None, (f"{path}: no chat template (neither {CHAT_TEMPLATE_FILE} nor a 'chat_template' in "
                      f"tokenizer_config.json; a base model?), so it cannot render a chat; {how}; or encode "
                      f"the prompt as is (generate --raw)")

    @property
    def vocab_size(self) -> int:
        # Includes added/special tokens. A model's embedding may be larger
        # (Qwen2.5 pads it to 152064), never smaller.
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # add_special_tokens runs tokenizer.json's post-processor: Llama-3's
        # prepends <|begin_of_text|>, Qwen's adds nothing.
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        # int() accepts python ints, numpy and 0-d torch values alike.
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return self.template.render(messages, add_generation_prompt)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        # The rendered text already holds every special token (BOS included),
        # so encode without the post-processor, as transformers does; otherwise
        # Llama-3 prompts would start with two BOS tokens.
        return self.encode(self.render_chat(messages, add_generation_prompt), add_special_tokens=False)
