"""Chat formats: which hand-written format a checkpoint's chat template is, and rendering it.

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
import os
import re
from dataclasses import dataclass

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
PLAIN_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
OTHER_MARKERS = ("<|im_start|>", "<|start_header_id|>")


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
