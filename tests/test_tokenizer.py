"""Tests for minihuatuo.tokenizer.

Small byte-level BPE tokenizers are trained here on a generated medical-ish
corpus, saved next to tokenizer_config.json files whose Jinja chat templates
(written for these tests) produce the Llama-3, Llama-3.1/3.2 and Qwen2.5
ChatML formats. transformers, used only here, is the oracle: our hand-written
renderer must give the same text and the same token ids.
"""

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from minihuatuo.engine.chat_templates import KINDS, ChatTemplate, detect_template
from minihuatuo.engine.tokenizer import Tokenizer
from minihuatuo.world.pretrain import PLAIN_JINJA

LLAMA_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                  "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>"]
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
PLAIN_SPECIALS = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

# --- chat templates written for these tests (Jinja, run only by transformers) ---
# Raw strings: the Jinja string literals carry "\n" escapes, as real templates do.
LLAMA3_JINJA = (
    r"{{- bos_token }}"
    r"{%- for m in messages %}"
    r"{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + (m['content'] | trim) + '<|eot_id|>' }}"
    r"{%- endfor %}"
    r"{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
)


def llama31_jinja(date='"26 Jul 2024"', cutoff="December 2023", use_clock=False):
    default = f"{{%- set date_string = {date} %}}"
    if use_clock:  # Llama-3.2 style: today's date when strftime_now exists
        default = (r'{%- if strftime_now is defined %}{%- set date_string = strftime_now("%d %b %Y") %}'
                   r"{%- else %}" + default + r"{%- endif %}")
    return (
        r"{%- if date_string is not defined %}" + default + r"{%- endif %}"
        r"{{- bos_token }}"
        r"{%- if messages[0]['role'] == 'system' %}"
        r"{%- set sys_text = messages[0]['content'] | trim %}{%- set rest = messages[1:] %}"
        r"{%- else %}{%- set sys_text = '' %}{%- set rest = messages %}{%- endif %}"
        r"{{- '<|start_header_id|>system<|end_header_id|>\n\n' }}"
        r"{{- 'Cutting Knowledge Date: " + cutoff + r"\n' }}"
        r"{{- 'Today Date: ' + date_string + '\n\n' + sys_text + '<|eot_id|>' }}"
        r"{%- for m in rest %}"
        r"{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + (m['content'] | trim) + '<|eot_id|>' }}"
        r"{%- endfor %}"
        r"{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
    )


def chatml_jinja(default=r"You are MediBot, a careful clinical assistant."):
    head = (r"{%- if messages[0]['role'] == 'system' %}"
            r"{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}")
    if default is not None:
        head += r"{%- else %}{{- '<|im_start|>system\n" + default + r"<|im_end|>\n' }}"
    return head + (
        r"{%- endif %}"
        r"{%- for m in messages %}{%- if m['role'] != 'system' or not loop.first %}"
        r"{{- '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
        r"{%- endif %}{%- endfor %}"
        r"{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
    )


# Formats we do not write by hand: Mistral's [INST] and a Phi-3-like template (its role tokens look
# like the plain format's, but it appends eos_token after the last turn).
MISTRAL_LIKE_JINJA = (
    r"{{- bos_token }}{%- for m in messages %}{%- if m['role'] == 'user' %}"
    r"{{- '[INST] ' + m['content'] + ' [/INST]' }}{%- else %}{{- m['content'] + eos_token }}{%- endif %}"
    r"{%- endfor %}"
)
PHI3_LIKE_JINJA = (
    r"{% for m in messages %}{% if m['role'] == 'user' %}{{ '<|user|>\n' + m['content'] + '<|end|>\n' }}"
    r"{% elif m['role'] == 'assistant' %}{{ '<|assistant|>\n' + m['content'] + '<|end|>\n' }}{% endif %}"
    r"{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)


# --- a small corpus and tokenizer builders ---
def corpus():
    who = ["The patient", "A 54-year-old man", "The child", "She", "He", "The nurse", "Our elderly patient",
           "A pregnant woman", "The athlete", "A diabetic patient"]
    what = ["has a fever of 38.5 °C", "takes a β-blocker twice daily", "reports chest pain at rest",
            "was given 500 mg of amoxicillin", "shows elevated troponin", "needs an ECG today",
            "has a cough and dyspnea", "was started on metformin", "complains of headache and nausea",
            "has hypertension (160/95 mmHg)", "received 5 µg/kg of fentanyl", "denies any allergies",
            "has 发热 and 咳嗽", "should avoid NSAIDs", "was diagnosed with pneumonia"]
    tail = [".", "?", "; consider the differential diagnosis.", ", so we reassess in 24 h."]
    return [f"{a} {b}{c}" for a, b, c in itertools.product(who, what, tail)]


def build_backend(specials, bos=None, nfc=False):
    tok = Backend(models.BPE())
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    if bos:  # Llama-3 style: the post-processor prepends BOS
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    return tok


@pytest.fixture(scope="module")
def backends():
    return {"llama": build_backend(LLAMA_SPECIALS, bos="<|begin_of_text|>"),
            "qwen": build_backend(QWEN_SPECIALS, nfc=True),
            "plain": build_backend(PLAIN_SPECIALS)}


def write_dir(d, backend, config=None, generation=None):
    d.mkdir(parents=True, exist_ok=True)
    backend.save(str(d / "tokenizer.json"))
    if config is not None:
        (d / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    if generation is not None:
        (d / "generation_config.json").write_text(json.dumps(generation), encoding="utf-8")
    return d


def family_dir(kind, backends, root, template=None):
    """A checkpoint-like directory for one family, laid out like the real ones."""
    if kind in ("llama3", "llama3.1", "llama3.2"):
        b = backends["llama"]
        ids = {t: b.token_to_id(t) for t in LLAMA_SPECIALS}
        src = {"llama3": LLAMA3_JINJA, "llama3.1": llama31_jinja(),
               "llama3.2": llama31_jinja(use_clock=True)}[kind]
        # Like Llama-3.1-Instruct: no pad token, dict-form BOS, three EOS ids
        # in generation_config, and clean_up_tokenization_spaces true.
        config = {"bos_token": {"__type": "AddedToken", "content": "<|begin_of_text|>", "lstrip": False},
                  "eos_token": "<|eot_id|>", "clean_up_tokenization_spaces": True,
                  "chat_template": template or src,
                  "added_tokens_decoder": {str(i): {"content": t, "special": True} for t, i in ids.items()}}
        gen = {"bos_token_id": ids["<|begin_of_text|>"],
               "eos_token_id": [ids["<|end_of_text|>"], ids["<|eom_id|>"], ids["<|eot_id|>"]]}
    else:
        b = backends["qwen"]
        # Like Qwen2.5-Instruct: bos_token null, pad <|endoftext|>, eos <|im_end|>.
        # No tokenizer_class "Qwen2Tokenizer": transformers 5 would rebuild the
        # pre-tokenizer from its own Qwen regex instead of using tokenizer.json.
        config = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                  "chat_template": template or chatml_jinja()}
        gen = {"bos_token_id": b.token_to_id("<|endoftext|>"),
               "eos_token_id": [b.token_to_id("<|im_end|>"), b.token_to_id("<|endoftext|>")]}
    return write_dir(root / kind, b, config, gen)


@pytest.fixture(scope="module")
def dirs(backends, tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {k: family_dir(k, backends, root) for k in ("llama3", "llama3.1", "llama3.2", "chatml")}


@pytest.fixture(scope="module")
def hf():
    transformers = pytest.importorskip("transformers")
    cache = {}

    def load(path):
        if path not in cache:
            cache[path] = transformers.AutoTokenizer.from_pretrained(str(path))
        return cache[path]
    return load


def hf_chat_ids(tok, messages, gen):
    out = tok.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True)
    # transformers 5 returns a BatchEncoding (return_dict=True by default).
    return list(out["input_ids"]) if hasattr(out, "keys") else list(out)


CONVERSATIONS = {
    "system_3turns": [
        {"role": "system", "content": "  You are a cautious physician.\n"},
        {"role": "user", "content": "  My temperature is 37.5 °C and I take a β-blocker. Is that OK?  "},
        {"role": "assistant", "content": "\nA temperature of 37.5 °C is normal; keep taking the β-blocker.\n\n"},
        {"role": "user", "content": "What about 发热 at night?"},
    ],
    "no_system_4turns": [
        {"role": "user", "content": "I have chest pain at rest."},
        {"role": "assistant", "content": "  Please get an ECG and troponin today.  "},
        {"role": "user", "content": "\tThe ECG was normal.\n"},
        {"role": "assistant", "content": "Good. 500 mg of amoxicillin is not indicated."},
    ],
    "single_user": [{"role": "user", "content": "Hello?"}],
    "late_system": [
        {"role": "user", "content": "Dose of metformin?"},
        {"role": "assistant", "content": "Start at 500 mg daily."},
        {"role": "system", "content": " Be concise. "},
        {"role": "user", "content": "And fentanyl 5 µg/kg?"},
    ],
}


@pytest.mark.parametrize("kind", ["llama3", "llama3.1", "llama3.2", "chatml"])
@pytest.mark.parametrize("conv", sorted(CONVERSATIONS))
@pytest.mark.parametrize("gen", [True, False])
def test_chat_matches_transformers(kind, conv, gen, dirs, hf):
    ours, theirs = Tokenizer.from_dir(dirs[kind]), hf(dirs[kind])
    messages = CONVERSATIONS[conv]
    assert ours.render_chat(messages, gen) == theirs.apply_chat_template(
        messages, add_generation_prompt=gen, tokenize=False)
    assert ours.apply_chat_template(messages, gen) == hf_chat_ids(theirs, messages, gen)


def test_chat_formats_by_hand(dirs):
    """The oracle templates are ours too, so pin the formats to literal strings."""
    msgs = [{"role": "system", "content": " S "}, {"role": "user", "content": " U "}]
    assert Tokenizer.from_dir(dirs["llama3"]).render_chat(msgs) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nU<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert Tokenizer.from_dir(dirs["llama3.1"]).render_chat(msgs[1:], False) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nU<|eot_id|>")
    assert Tokenizer.from_dir(dirs["llama3.1"]).render_chat(msgs, False).startswith(
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\nS<|eot_id|>")
    chatml = Tokenizer.from_dir(dirs["chatml"])
    assert chatml.render_chat(msgs) == "<|im_start|>system\n S <|im_end|>\n<|im_start|>user\n U <|im_end|>\n<|im_start|>assistant\n"
    assert chatml.render_chat(msgs[1:], False) == (
        "<|im_start|>system\nYou are MediBot, a careful clinical assistant.<|im_end|>\n<|im_start|>user\n U <|im_end|>\n")


TEXTS = ["", "The patient takes a β-blocker; fever 37.5 °C.", "  leading and trailing  \n",
         "发热 and 咳嗽 since 3 days", "tabs\tand\nnewlines\r\n", "emoji 🩺 and é vs e\u0301",
         "inline special <|eot_id|><|im_end|> tokens", "Take 2 tablets . Then rest ? Don 't"]


@pytest.mark.parametrize("kind", ["llama3.1", "chatml"])
def test_encode_decode_match_transformers(kind, dirs, hf):
    ours, theirs = Tokenizer.from_dir(dirs[kind]), hf(dirs[kind])
    assert ours.vocab_size == len(theirs)
    for add in (True, False):
        assert ours.encode_batch(TEXTS, add) == [theirs.encode(t, add_special_tokens=add) for t in TEXTS]
        for t in TEXTS:
            ids = ours.encode(t, add_special_tokens=add)
            assert ids == theirs.encode(t, add_special_tokens=add)
            for skip in (True, False):
                # Llama's config has clean_up_tokenization_spaces=true; transformers 5
                # ignores it for BPE, so " ." and " 't" must survive in both.
                assert ours.decode(ids, skip) == theirs.decode(ids, skip_special_tokens=skip)


def test_bos_handling(dirs, backends):
    llama = Tokenizer.from_dir(dirs["llama3"])
    bos = backends["llama"].token_to_id("<|begin_of_text|>")
    assert llama.bos_id == bos
    assert llama.encode("fever")[0] == bos and llama.encode("fever", False)[0] != bos
    ids = llama.apply_chat_template([{"role": "user", "content": "fever"}])
    assert ids[0] == bos and ids.count(bos) == 1  # rendered text has BOS; not added twice
    qwen = Tokenizer.from_dir(dirs["chatml"])
    # bos_token null in tokenizer_config beats generation_config's bos_token_id.
    assert qwen.bos_id is None
    assert qwen.encode("fever") == qwen.encode("fever", add_special_tokens=False)


def test_special_ids(dirs, backends):
    b = backends["llama"]
    llama = Tokenizer.from_dir(dirs["llama3.1"])
    # generation_config's list first, tokenizer_config's <|eot_id|> not repeated.
    assert llama.eos_ids == [b.token_to_id(t) for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")]
    assert llama.pad_id == llama.eos_ids[0]  # no pad token: first EOS
    q = backends["qwen"]
    qwen = Tokenizer.from_dir(dirs["chatml"])
    assert qwen.eos_ids == [q.token_to_id("<|im_end|>"), q.token_to_id("<|endoftext|>")]
    assert qwen.pad_id == q.token_to_id("<|endoftext|>")
    assert qwen.token_to_id("<|im_start|>") == q.token_to_id("<|im_start|>")
    assert qwen.token_to_id("<|no_such_token|>") is None


def test_eos_union_and_pad_sources(backends, tmp_path):
    b = backends["llama"]
    eot, eos = b.token_to_id("<|eot_id|>"), b.token_to_id("<|end_of_text|>")
    d = write_dir(tmp_path / "a", b, {"eos_token": "<|eot_id|>"}, {"eos_token_id": eos, "pad_token_id": 7})
    t = Tokenizer.from_dir(d)
    assert t.eos_ids == [eos, eot] and t.pad_id == 7
    d = write_dir(tmp_path / "b", b, {"eos_token": {"content": "<|eot_id|>"}})
    t = Tokenizer.from_dir(d)
    assert t.eos_ids == [eot] and t.pad_id == eot and t.bos_id is None
    t = Tokenizer.from_dir(write_dir(tmp_path / "c", b))  # tokenizer.json alone: no chat format known
    assert t.eos_ids == [] and t.pad_id == 0 and not t.has_chat_template


def test_config_errors(backends, tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        Tokenizer.from_dir(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(e.value) and "tokenizer.json" in str(e.value)
    d = write_dir(tmp_path / "bad", backends["qwen"])
    (d / "generation_config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="generation_config.json"):
        Tokenizer.from_dir(d)
    (d / "generation_config.json").write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ValueError, match="generation_config.json"):
        Tokenizer.from_dir(d)
    (d / "tokenizer.json").write_text("{}", encoding="utf-8")
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_dir(d)
    d = write_dir(tmp_path / "unknown", backends["qwen"], {"eos_token": "<|eot_id|>"})
    with pytest.raises(ValueError, match="<\\|eot_id\\|>"):
        Tokenizer.from_dir(d)
    d = write_dir(tmp_path / "mismatch", backends["qwen"],
                  {"added_tokens_decoder": {"99999": {"content": "<|im_end|>", "special": True}}})
    with pytest.raises(ValueError, match="99999"):
        Tokenizer.from_dir(d)


def test_detect_template():
    assert detect_template(None) is None  # nothing to recognise: no guessed format
    assert detect_template("{{ messages }}") is None
    assert detect_template(PLAIN_JINJA).kind == "plain"
    assert detect_template(PLAIN_JINJA.replace("m['role']", "message.role").replace("{{ ", "{{- ")).kind == "plain"
    assert detect_template(PHI3_LIKE_JINJA) is None  # spells the role tokens out and appends eos: not ours
    assert detect_template(LLAMA3_JINJA).kind == "llama3"
    t = detect_template(llama31_jinja())
    assert (t.kind, t.date_string, t.knowledge_cutoff) == ("llama3.1", "26 Jul 2024", "December 2023")
    t = detect_template(llama31_jinja(date="'03 Mar 2031'", cutoff="June 2030"))
    assert (t.date_string, t.knowledge_cutoff) == ("03 Mar 2031", "June 2030")
    assert detect_template(llama31_jinja(use_clock=True)).date_string is None  # today, at render time
    assert detect_template(llama31_jinja(), date_string="01 Jan 2025").date_string == "01 Jan 2025"
    t = detect_template(chatml_jinja())
    assert (t.kind, t.default_system) == ("chatml", "You are MediBot, a careful clinical assistant.")
    assert detect_template(chatml_jinja(default=None)).default_system is None
    assert detect_template(chatml_jinja(default=r"Line one.\nLine two")).default_system == "Line one.\nLine two"
    with pytest.raises(ValueError):
        ChatTemplate("mistral")


@pytest.mark.parametrize("default", ["Du bist ein Arzt für Innere Medizin.", r"Two\nlines", None])
def test_chatml_default_system_read_from_template(default, backends, tmp_path, hf):
    d = family_dir("chatml", backends, tmp_path, template=chatml_jinja(default=default))
    ours, theirs = Tokenizer.from_dir(d), hf(d)
    msgs = [{"role": "user", "content": "Hi"}]
    text = ours.render_chat(msgs)
    expect = "" if default is None else f"<|im_start|>system\n{default.replace(chr(92) + 'n', chr(10))}<|im_end|>\n"
    assert text == expect + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert ours.apply_chat_template(msgs) == hf_chat_ids(theirs, msgs, True)


def test_llama31_dates(backends, tmp_path, hf):
    import datetime
    d = family_dir("llama3.1", backends, tmp_path, template=llama31_jinja(date='"03 Mar 2031"'))
    msgs = [{"role": "user", "content": "Hi"}]
    ours = Tokenizer.from_dir(d)
    assert "Today Date: 03 Mar 2031\n" in ours.render_chat(msgs)
    assert ours.apply_chat_template(msgs) == hf_chat_ids(hf(d), msgs, True)
    pinned = Tokenizer.from_dir(d, date_string="01 Jan 2025").render_chat(msgs)
    assert "Today Date: 01 Jan 2025\n" in pinned
    today = ChatTemplate("llama3.1").render(msgs)  # date_string None: today's date
    assert "Today Date: " + datetime.datetime.now().strftime("%d %b %Y") in today


def test_plain_template(backends, tmp_path):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Fever? "},
            {"role": "assistant", "content": "Rest."}, {"role": "user", "content": "Thanks"}]
    expected = ("<|system|>\nBe brief.<|end|>\n<|user|>\n Fever? <|end|>\n"
                "<|assistant|>\nRest.<|end|>\n<|user|>\nThanks<|end|>\n")
    assert ChatTemplate("plain").render(msgs, add_generation_prompt=False) == expected
    assert ChatTemplate("plain").render(msgs) == expected + "<|assistant|>\n"
    b = backends["plain"]
    t = Tokenizer.from_dir(write_dir(tmp_path / "p", b, {"eos_token": "<|endoftext|>"}))
    assert t.template.kind == "plain"
    assert t.eos_ids == [b.token_to_id("<|endoftext|>"), b.token_to_id("<|end|>")]  # <|end|> stops a turn
    ids = t.apply_chat_template(msgs[:2])
    assert ids[0] == b.token_to_id("<|system|>") and b.token_to_id("<|end|>") in ids
    assert t.decode(ids, skip_special_tokens=False) == t.render_chat(msgs[:2])


@pytest.mark.parametrize("kind", ["llama3", "llama3.1", "chatml", "plain"])
def test_bad_messages(kind):
    tpl = ChatTemplate(kind, date_string="01 Jan 2025")
    with pytest.raises(ValueError, match="non-empty"):
        tpl.render([])
    with pytest.raises(ValueError, match="tool"):
        tpl.render([{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}])
    with pytest.raises(ValueError, match="content"):
        tpl.render([{"role": "user", "content": None}])


def test_package_does_not_import_transformers():
    """Every module of the package, the benchmarks included (their transformers baselines import it
    inside the baseline functions only), imports without transformers."""
    code = ("import importlib, pkgutil, sys, minihuatuo\n"
            "names = [m.name for m in pkgutil.walk_packages(minihuatuo.__path__, 'minihuatuo.')"
            " if not m.name.endswith('__main__')]\n"
            "assert len(names) > 30 and 'minihuatuo.bench.generate' in names, names\n"
            "for n in names: importlib.import_module(n)\n"
            "assert 'transformers' not in sys.modules, 'imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


# --- where the chat template comes from, and what happens when it is unknown ---

def jinja_only_dir(kind, backends, root, source):
    """A checkpoint laid out as transformers >= 4.43 saves it: the template in chat_template.jinja and no
    "chat_template" key in tokenizer_config.json."""
    d = family_dir(kind, backends, root)
    cfg = json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8"))
    del cfg["chat_template"]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    (d / "chat_template.jinja").write_text(source, encoding="utf-8")
    return d


@pytest.mark.parametrize("kind, source", [("llama3", LLAMA3_JINJA), ("llama3.1", llama31_jinja()),
                                          ("chatml", chatml_jinja())])
def test_template_in_chat_template_jinja_only(kind, source, backends, tmp_path, hf):
    d = jinja_only_dir(kind, backends, tmp_path, source)
    ours, theirs = Tokenizer.from_dir(d), hf(d)
    assert ours.template.kind == kind
    msgs = CONVERSATIONS["system_3turns"]
    assert ours.render_chat(msgs) == theirs.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert ours.apply_chat_template(msgs) == hf_chat_ids(theirs, msgs, True)


def test_template_in_chat_template_jinja_by_hand(backends, tmp_path):
    d = jinja_only_dir("chatml", backends, tmp_path, chatml_jinja(default="You read the .jinja file."))
    assert Tokenizer.from_dir(d).render_chat([{"role": "user", "content": "Hi"}]) == (
        "<|im_start|>system\nYou read the .jinja file.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n")
    d = jinja_only_dir("llama3.1", backends, tmp_path / "l", llama31_jinja(date='"09 Sep 2029"', cutoff="May 2029"))
    assert Tokenizer.from_dir(d).render_chat([{"role": "user", "content": " U "}]) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: May 2029\nToday Date: 09 Sep 2029\n\n<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nU<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


def test_chat_template_jinja_wins_over_tokenizer_config(backends, tmp_path, hf):
    """Both present and different (ChatML defaults): the .jinja file is used, as transformers does."""
    d = family_dir("chatml", backends, tmp_path, template=chatml_jinja(default="From tokenizer_config."))
    (d / "chat_template.jinja").write_text(chatml_jinja(default="From the jinja file."), encoding="utf-8")
    msgs = [{"role": "user", "content": "Hi"}]
    text = Tokenizer.from_dir(d).render_chat(msgs)
    assert text.startswith("<|im_start|>system\nFrom the jinja file.<|im_end|>\n")
    assert text == hf(d).apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)


def test_named_templates_list_in_tokenizer_config(backends, tmp_path):
    """Multi-template checkpoints store [{"name", "template"}, ...]; without a name asked for, "default"."""
    named = [{"name": "tool_use", "template": LLAMA3_JINJA}, {"name": "default", "template": chatml_jinja()}]
    assert Tokenizer.from_dir(family_dir("chatml", backends, tmp_path, template=named)).template.kind == "chatml"
    d = family_dir("chatml", backends, tmp_path / "b", template=named[:1])
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: field 'chat_template': .*without a 'default'"):
        Tokenizer.from_dir(d)
    d = family_dir("chatml", backends, tmp_path / "c", template=7)
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: field 'chat_template': expected a string"):
        Tokenizer.from_dir(d)


@pytest.mark.parametrize("where", ["chat_template.jinja", "tokenizer_config.json"])
def test_unrecognised_template_is_a_clear_error_naming_the_file(where, backends, tmp_path):
    if where == "chat_template.jinja":
        d = jinja_only_dir("llama3", backends, tmp_path, MISTRAL_LIKE_JINJA)
    else:
        d = family_dir("llama3", backends, tmp_path, template=MISTRAL_LIKE_JINJA)
    t = Tokenizer.from_dir(d)  # loading works: encode/decode need no chat format
    assert not t.has_chat_template and t.decode(t.encode("fever", False)) == "fever"
    assert t.eos_ids == [backends["llama"].token_to_id(x) for x in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")]
    for use in (lambda: t.render_chat([{"role": "user", "content": "Hi"}]),
                lambda: t.apply_chat_template([{"role": "user", "content": "Hi"}]), lambda: t.template):
        with pytest.raises(ValueError) as e:
            use()
        msg = str(e.value)
        assert str(d / where) in msg and "not recognised" in msg and "--chat-template" in msg
        assert all(k in msg for k in KINDS)


def test_no_template_is_an_error_naming_the_directory_unless_the_vocabulary_is_plain(backends, tmp_path):
    b = backends["llama"]
    d = write_dir(tmp_path / "base", b, {"eos_token": "<|end_of_text|>"})  # a base model: no template
    t = Tokenizer.from_dir(d)
    with pytest.raises(ValueError) as e:
        t.render_chat([{"role": "user", "content": "Hi"}])
    assert f"{d}: no chat template" in str(e.value) and "--chat-template" in str(e.value)
    assert "generate --raw" in str(e.value)
    assert t.eos_ids == [b.token_to_id("<|end_of_text|>")]
    # the project's own tiny checkpoints carry no template; their vocabulary has only the plain format's tokens
    from conftest import write_plain_tokenizer
    tiny = Tokenizer.from_dir(write_plain_tokenizer(tmp_path / "tiny"))
    assert tiny.template.kind == "plain" and tiny.eos_ids == [tiny.token_to_id("<|end|>")]
    # the bundled world's base model: its tokenizer_config carries the plain Jinja template
    world = Path(__file__).resolve().parents[1] / "data" / "world" / "base"
    assert Tokenizer.from_dir(world).template.kind == "plain"


def test_chat_format_picks_a_hand_written_template(backends, tmp_path):
    q = backends["qwen"]
    d = family_dir("chatml", backends, tmp_path, template=MISTRAL_LIKE_JINJA)
    t = Tokenizer.from_dir(d, chat_format="chatml")
    # the override ignores the checkpoint's template entirely: no default system prompt
    assert t.render_chat([{"role": "user", "content": "Hi"}]) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert t.eos_ids == [q.token_to_id("<|im_end|>"), q.token_to_id("<|endoftext|>")]
    # it also replaces a recognised template (here: no MediBot system prompt)
    t = Tokenizer.from_dir(family_dir("chatml", backends, tmp_path / "known"), chat_format="chatml")
    assert t.render_chat([{"role": "user", "content": "Hi"}]).startswith("<|im_start|>user\n")
    # a base model given a format: the end of an assistant turn becomes a stop token
    b = backends["llama"]
    base = write_dir(tmp_path / "base", b, {"eos_token": "<|end_of_text|>"})
    t = Tokenizer.from_dir(base, chat_format="llama3.1", date_string="02 Feb 2026")
    assert t.render_chat([{"role": "user", "content": "Hi"}], False) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 02 Feb 2026\n\n<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>")
    assert t.eos_ids == [b.token_to_id("<|end_of_text|>"), b.token_to_id("<|eot_id|>")]
    with pytest.raises(ValueError, match="'mistral': expected one of llama3, llama3.1, chatml, plain"):
        Tokenizer.from_dir(base, chat_format="mistral")


def test_cli_chat_template_flag(tiny_checkpoint, capsys):
    """generate/chat: an unrecognised template stops the command with the file named (exit 2, no
    traceback); --raw needs no template; --chat-template picks the format (here the one the tiny
    checkpoint was written for, so the output equals that of the same weights without a template)."""
    from minihuatuo.cli import main

    base = ["generate", "--model", str(tiny_checkpoint), "--prompt", "fever and cough", "--max-new-tokens", "6",
            "--temperature", "0", "--device", "cpu"]
    assert main(base) == 0
    reference = capsys.readouterr().out
    assert reference  # the tiny checkpoint speaks (gibberish), so equality below means something
    (tiny_checkpoint / "chat_template.jinja").write_text(MISTRAL_LIKE_JINJA, encoding="utf-8")
    assert main(base) == 2
    err = capsys.readouterr().err
    assert f"minihuatuo generate: error: {tiny_checkpoint / 'chat_template.jinja'}: chat template not recognised" in err
    assert "--chat-template" in err and "Traceback" not in err
    assert main(base + ["--raw"]) == 0
    assert main(base + ["--chat-template", "plain"]) == 0
    assert capsys.readouterr().out.endswith(reference)  # --raw's output comes first
    with pytest.raises(SystemExit):
        main(base + ["--chat-template", "mistral"])
