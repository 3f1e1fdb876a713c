"""Tokenizer loading and chat-prompt rendering for minihuatuo.

Hugging Face checkpoints describe their chat format as a Jinja program: the
file chat_template.jinja (written by transformers >= 4.43) or the
`chat_template` entry of tokenizer_config.json (older checkpoints). When both
exist the .jinja file wins, as in transformers' own loading. We deliberately do
not run Jinja at run time: it would add a dependency, and a template is code
shipped with a checkpoint that can do anything. Instead we recognise the
handful of formats HuatuoGPT-o1 is built on (Llama-3, Llama-3.1/3.2 and
Qwen2.5's ChatML, plus this project's `plain` format) and write each one out by
hand in a few auditable lines. The few values that vary between checkpoints
(ChatML's default system prompt, Llama-3.1's date and knowledge cutoff) are
read from the template source with regexes instead of being hard-coded.
tests/test_tokenizer.py proves the output matches transformers'
`apply_chat_template` token for token.

A template we do not recognise, or no template at all (a base model), is never
replaced by a guessed format: loading still succeeds (encode/decode, `generate
--raw` and classifiers need no chat format), and rendering a chat raises a
ValueError naming the file and `chat_format` (`--chat-template NAME`), the way
to pick one of the hand-written formats explicitly.
"""

from __future__ import annotations

import datetime
import json
import os
import re
from dataclasses import dataclass

from tokenizers import Tokenizer as _Backend

ROLES = ("system", "user", "assistant")
KINDS = ("llama3", "llama3.1", "chatml", "plain")
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # transformers >= 4.43 writes the template here

# ChatML's default system prompt, e.g. in Qwen2.5:
#   {{- '<|im_start|>system\nYou are Qwen, ...<|im_end|>\n' }}
# The captured text may not contain quotes, which skips the branch that
# splices in messages[0]['content'] and the tool-use branch.
_CHATML_DEFAULT_RE = re.compile(r"<\|im_start\|>system(?:\\n|\n)([^'\"]*?)<\|im_end\|>")
# Llama-3.1: {%- set date_string = "26 Jul 2024" %}
_DATE_RE = re.compile(r"set\s+date_string\s*=\s*[\"']([^\"']+)[\"']")
# Llama-3.1: {{- "Cutting Knowledge Date: December 2023\n" }}
_CUTOFF_RE = re.compile(r"Cutting Knowledge Date:[ \t]*([^\"'\\\n]+)")
# plain (world_pretrain.PLAIN_JINJA): the role itself is written between "<|" and "|>",
#   <|{{ m['role'] }}|>   (also message.role, and the whitespace-control dashes)
_PLAIN_ROLE_RE = re.compile(r"<\|\{\{-?\s*\w+(?:\[\s*['\"]role['\"]\s*\]|\.role)\s*-?\}\}\|>")
# The special tokens of the plain format; a vocabulary holding all of them and no
# other format's markers can only have been made for it (see Tokenizer.from_dir).
_PLAIN_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
_OTHER_MARKERS = ("<|im_start|>", "<|start_header_id|>")


def _unescape(s: str) -> str:
    # Text captured from a Jinja string literal still has its escapes (\n, \t,
    # \u...), which Jinja decodes the same way Python does.
    return s.encode("ascii", "backslashreplace").decode("unicode_escape")


@dataclass
class ChatTemplate:
    """A recognised chat format; `render` turns messages into prompt text.

    `default_system`: ChatML only, the system message inserted when a
    conversation has none (None: insert nothing).
    `date_string`: llama3.1 only, the "Today Date" value. None means today's
    date formatted "%d %b %Y", which is what templates built on
    strftime_now (Llama-3.2) produce; set it for reproducible prompts.
    """

    kind: str = "plain"
    default_system: str | None = None
    date_string: str | None = None
    knowledge_cutoff: str = "December 2023"
    bos_token: str = "<|begin_of_text|>"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown chat template kind {self.kind!r}; expected one of {KINDS}")

    @property
    def end_of_turn(self) -> str:
        """The special token that closes an assistant turn: the last token SFT trains on, and the
        token generation stops at."""
        return {"llama3": "<|eot_id|>", "llama3.1": "<|eot_id|>", "chatml": "<|im_end|>", "plain": "<|end|>"}[self.kind]

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        _check_messages(messages)
        return getattr(self, "_render_" + self.kind.replace(".", "_"))(messages, add_generation_prompt)

    def _render_llama3(self, messages, gen):
        # Llama-3: BOS, then every message with its content trimmed. No default system.
        return self.bos_token + _llama_turns(messages, gen)

    def _render_llama3_1(self, messages, gen):
        # Llama-3.1 always opens with a system block holding the cutoff and date;
        # a leading user system message is appended to that block, trimmed.
        system = ""
        if messages[0]["role"] == "system":
            system, messages = messages[0]["content"].strip(), messages[1:]
        date = self.date_string or datetime.datetime.now().strftime("%d %b %Y")
        head = f"Cutting Knowledge Date: {self.knowledge_cutoff}\nToday Date: {date}\n\n"
        return self.bos_token + _llama_turn("system", head + system) + _llama_turns(messages, gen)

    def _render_chatml(self, messages, gen):
        # ChatML (Qwen2.5) does not trim content. Without a leading system
        # message the template's default one (if any) is inserted.
        out = []
        if messages[0]["role"] != "system" and self.default_system is not None:
            out.append(f"<|im_start|>system\n{self.default_system}<|im_end|>\n")
        out += [f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages]
        if gen:
            out.append("<|im_start|>assistant\n")
        return "".join(out)

    def _render_plain(self, messages, gen):
        # Our own format for the tiny models trained in this project:
        #   <|system|>\n{content}<|end|>\n   (likewise <|user|>, <|assistant|>)
        # and the generation prompt is "<|assistant|>\n". Content is not trimmed
        # and no BOS is added. The assistant's turn ends with <|end|>, which is
        # therefore its stop token (Tokenizer puts it in eos_ids).
        out = [f"<|{m['role']}|>\n{m['content']}<|end|>\n" for m in messages]
        if gen:
            out.append("<|assistant|>\n")
        return "".join(out)


def _llama_turn(role: str, content: str) -> str:
    return f"<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>"


def _llama_turns(messages, gen: bool) -> str:
    out = "".join(_llama_turn(m["role"], m["content"].strip()) for m in messages)
    return out + ("<|start_header_id|>assistant<|end_header_id|>\n\n" if gen else "")


def _check_messages(messages) -> None:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("a chat needs a non-empty list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            role = m.get("role") if isinstance(m, dict) else m
            raise ValueError(f"message {i}: unknown role {role!r}; expected one of {ROLES}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"message {i}: content must be a str, got {type(m.get('content')).__name__}")


def detect_template(chat_template_source: str | None, date_string: str | None = None) -> ChatTemplate | None:
    """Recognise the format a Jinja chat template produces, from its source text;
    None when it is none of ours (or there is no source): the caller decides
    what that means, we never guess.

    `date_string` overrides the llama3.1 "Today Date" (for reproducibility).
    """
    src = chat_template_source
    if not isinstance(src, str):
        return None
    if "<|im_start|>" in src:
        m = _CHATML_DEFAULT_RE.search(src)
        # Fallback None: a ChatML template without a recognisable default
        # system prompt gets none, rather than an invented one.
        return ChatTemplate("chatml", default_system=_unescape(m.group(1)) if m else None)
    if "<|start_header_id|>" in src and "Cutting Knowledge Date" in src:
        if date_string is None and "strftime_now" not in src:
            # A fixed default date (Llama-3.1). transformers always provides
            # strftime_now, so templates that call it (Llama-3.2) use today.
            # Without either we also fall back to today (date_string None).
            m = _DATE_RE.search(src)
            date_string = _unescape(m.group(1)) if m else None
        m = _CUTOFF_RE.search(src)
        cutoff = m.group(1).strip() if m else "December 2023"
        return ChatTemplate("llama3.1", date_string=date_string, knowledge_cutoff=cutoff)
    if "<|start_header_id|>" in src:
        return ChatTemplate("llama3")
    if _PLAIN_ROLE_RE.search(src) and "<|end|>" in src:
        # Only the shape we write ourselves (role spliced into "<|...|>"). Phi-3,
        # which spells out '<|user|>' etc. and appends eos_token, is not it.
        return ChatTemplate("plain")
    return None


def read_chat_template(path: str, cfg: dict) -> tuple[str | None, str]:
    """The checkpoint's Jinja source and the file it came from (for messages).

    chat_template.jinja first: transformers' from_pretrained lets "independent
    chat template file(s)" take priority over the tokenizer_config entry, and
    save_pretrained (>= 4.43) writes the file and drops the entry. In
    tokenizer_config.json the entry is a string, or (multi-template
    checkpoints) a list of {"name", "template"} of which transformers uses
    "default" when none is asked for; so do we. Source None: no template.
    """
    jinja = os.path.join(path, CHAT_TEMPLATE_FILE)
    if os.path.isfile(jinja):
        try:
            with open(jinja, encoding="utf-8") as f:
                return f.read(), jinja
        except UnicodeDecodeError as e:
            raise ValueError(f"{jinja}: not UTF-8 text ({e})") from e
    cfg_file = os.path.join(path, "tokenizer_config.json")
    src = cfg.get("chat_template")
    if src is None or isinstance(src, str):
        return src, cfg_file
    if isinstance(src, list):
        named = {t.get("name"): t.get("template") for t in src if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"], f"{cfg_file} (chat_template 'default')"
        raise ValueError(f"{cfg_file}: field 'chat_template': a list of named templates without a 'default' "
                         f"one (names: {sorted(map(str, named))})")
    raise ValueError(f"{cfg_file}: field 'chat_template': expected a string or a list of "
                     f"{{\"name\", \"template\"}}, got {type(src).__name__}")


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
        if all(t in vocab for t in _PLAIN_TOKENS) and not any(t in vocab for t in _OTHER_MARKERS):
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
