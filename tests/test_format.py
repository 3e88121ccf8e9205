"""Formatting: the exact label mask on a known chat, EOS closing every response, BOS once, truncation."""

from __future__ import annotations

import copy

from tunesmith.data.format import IGNORE, encode, encode_chat, encode_text, preview_marked, stats
from tunesmith.data.records import Record

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "Later."},
]


def trained_segments(tokenizer, ids, labels):
    """Decoded runs of consecutive trained tokens."""
    segments, current = [], []
    for tok, lab in zip(ids, labels):
        if lab != IGNORE:
            current.append(tok)
        elif current:
            segments.append(tokenizer.decode(current))
            current = []
    if current:
        segments.append(tokenizer.decode(current))
    return segments


def test_label_mask_on_known_chat_is_exact(tokenizer):
    ids, labels = encode_chat(tokenizer, CHAT)
    text = tokenizer.decode(ids)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                    "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
                    "<|im_start|>assistant\nLater.<|im_end|>\n")
    assert trained_segments(tokenizer, ids, labels) == ["Hello!<|im_end|>", "Later.<|im_end|>"]
    # exactly the content tokens plus one end-of-turn token per response
    expected = (len(tokenizer("Hello!", add_special_tokens=False)["input_ids"]) + 1
                + len(tokenizer("Later.", add_special_tokens=False)["input_ids"]) + 1)
    assert sum(lab != IGNORE for lab in labels) == expected
    assert all(lab in (IGNORE, tok) for tok, lab in zip(ids, labels))


def test_bos_appears_once(tokenizer):
    ids, _ = encode_chat(tokenizer, CHAT)
    bos = tokenizer.bos_token_id
    assert ids[0] == bos and ids[1] != bos


def test_train_on_all_labels_every_token(tokenizer):
    ids, labels = encode_chat(tokenizer, CHAT, train_on="all")
    assert labels == ids


def test_eos_is_added_when_template_has_no_end_of_turn(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    ids, labels = encode_chat(tok, CHAT[1:3])
    segments = trained_segments(tok, ids, labels)
    assert segments == [" Hello!" + tok.eos_token]  # the token straddling the prompt boundary is trained
    trained = [t for t, lab in zip(ids, labels) if lab != IGNORE]
    assert trained[-1] == tok.eos_token_id


def test_instruction_record_is_a_two_turn_chat(tokenizer):
    record = Record("instruction", {"instruction": "Add.", "input": "2 and 3", "output": "5"}, "f", 1)
    enc = encode(record, tokenizer, max_len=512)
    assert "<|im_start|>user\nAdd.\n\n2 and 3<|im_end|>" in tokenizer.decode(enc.input_ids)
    assert trained_segments(tokenizer, enc.input_ids, enc.labels) == ["5<|im_end|>"]
    assert enc.trained_tokens == 2 and not enc.truncated


def test_system_prompt_is_added_once(tokenizer):
    record = Record("instruction", {"instruction": "Add.", "input": "", "output": "5"}, "f", 1)
    enc = encode(record, tokenizer, max_len=512, system_prompt="You add numbers.")
    text = tokenizer.decode(enc.input_ids)
    assert text.count("<|im_start|>system") == 1 and "You add numbers." in text
    assert "helpful AI assistant" not in text


def test_text_record_trains_everything_and_ends_with_eos(tokenizer):
    ids, labels = encode_text(tokenizer, "Plain domain text.")
    assert ids[-1] == tokenizer.eos_token_id and labels == ids
    assert tokenizer.decode(ids[:-1]) == "Plain domain text."


def test_truncation_keeps_the_start_and_is_counted(tokenizer):
    record = Record("chat", {"messages": CHAT}, "f", 1)
    full = encode(record, tokenizer, max_len=10_000)
    cut = encode(record, tokenizer, max_len=20)
    assert cut.truncated and cut.full_length == len(full.input_ids) and len(cut.input_ids) == 20
    assert cut.input_ids == full.input_ids[:20] and cut.labels == full.labels[:20]
    s = stats([full, cut])
    assert s["truncated_rows"] == 1 and s["rows"] == 2 and s["length_max"] == len(full.input_ids)


def test_preview_marks_exactly_the_trained_tokens(tokenizer):
    enc = encode(Record("chat", {"messages": CHAT}, "f", 1), tokenizer, max_len=512)
    marked = preview_marked(tokenizer, enc)
    assert marked.count("⟦") == 2 and "⟦Hello!<|im_end|>⟧" in marked and "⟦Later.<|im_end|>⟧" in marked
