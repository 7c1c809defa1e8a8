"""The text side of fine-grained data: prompts, character spans -> tokens, positive maps.

A box is grounded in a *label*, and a label in character spans of the text (a category name in
a detection prompt, a phrase of a caption). The tokenizer's offsets give, for every character,
the token covering it; a span maps to the tokens from its first to its last character. As in
the original, a span whose first (last) character is not covered by a token (a space, say) is
retried one and two characters further in. The result per text is `{label: [token indices]}`
and, per box, a row of the binary positive map (boxes x Lt).

Detection prompts join category names with ". ", as the original: every category in label
order at evaluation (in chunks when they do not fit the text length, as for LVIS), and at
training time the positives plus a random share of the negatives, shuffled.
"""
import logging
import random
import re

import torch

from detection import label_to_token_map

log = logging.getLogger("fiber.data_fine")

SEPARATOR = ". "  # between category names in a detection prompt (no trailing period)


def clean_name(name):
    """A category name as the original writes it into prompts: no "(...)", "_" -> " "."""
    name = re.sub(r"\(.*\)", "", name)
    name = re.sub(r"_", " ", name)
    return re.sub(r"  ", " ", name)


def build_prompt(names, separator=SEPARATOR):
    """Names -> (prompt, [(start, end)] char span of each name)."""
    prompt, spans = "", []
    for i, name in enumerate(names):
        spans.append((len(prompt), len(prompt) + len(name)))
        prompt += name + (separator if i < len(names) - 1 else "")
    return prompt, spans


def char_to_token_table(offsets, length):
    """For each character of the text, the index of the token covering it (or -1)."""
    table = [-1] * length
    for t, (start, end) in enumerate(offsets):
        for c in range(start, min(end, length)):
            if table[c] < 0:  # bytes of one character may span several tokens: keep the first
                table[c] = t
    return table


def span_tokens(table, start, end):
    """(first, last) token of the char span [start, end), or None. Like the original, a
    boundary that falls on a space or outside the tokens is retried 1 and 2 characters in."""
    def at(c):
        return table[c] if 0 <= c < len(table) and table[c] >= 0 else None

    first = next((t for t in (at(start), at(start + 1), at(start + 2)) if t is not None), None)
    last = next((t for t in (at(end - 1), at(end - 2), at(end - 3)) if t is not None), None)
    if first is None or last is None or last < first:
        return None
    return first, last


def encode_with_spans(tokenizer, text, label_spans, max_len, where=""):
    """Tokenize `text` and map each label's char spans to tokens.

    label_spans: {label: [(start, end), ...]}. Returns ids (max_len,), mask (max_len,) and
    {label: sorted token indices}; a label whose spans map to no token, or only to tokens past
    the max_len cut, gets no entry (with a warning). A text longer than max_len tokens is
    truncated, keeping </s> last, with a warning.
    """
    full_ids, offsets = tokenizer.encode_with_offsets(text, max_len=10**9)
    ids, mask = tokenizer.encode([text], max_len)
    if len(full_ids) > max_len:
        log.warning(f"{where}: text of {len(full_ids)} tokens truncated to {max_len} "
                    f"(max_query_len): {text[:60]!r}...")
    table = char_to_token_table(offsets, len(text))
    tokens = {}
    for label, spans in label_spans.items():
        found = set()
        for start, end in spans:
            hit = span_tokens(table, start, end)
            if hit is None:
                log.warning(f"{where}: phrase {text[start:end]!r} (chars {start}-{end}) covers "
                            "no token; it is left out")
                continue
            found.update(t for t in range(hit[0], hit[1] + 1) if t < max_len - 1)
        if found:
            tokens[label] = sorted(found)
        elif spans:
            log.warning(f"{where}: label {label} has no token within the first {max_len}; its "
                        "boxes are left out")
    return ids[0], mask[0], tokens


def positive_map(label_tokens, labels, max_len):
    """(G, max_len) binary map: row i marks the tokens of box i's label."""
    pm = torch.zeros(len(labels), max_len)
    for i, label in enumerate(labels):
        pm[i, label_tokens.get(int(label), [])] = 1.0
    return pm


def label_to_tokens(pm, plus=1):
    """{label: [token indices]} of a (num_labels, Lt) positive map; row i is label i + plus."""
    return label_to_token_map(pm, plus=plus)


def detection_text(names, positives, generator, *, train):
    """The prompt of a detection sample: every category at eval (label order); at train time
    the positives plus a random share of the negatives, shuffled (the original's simplified
    recipe: all categories half of the time, else each negative with probability 1/2)."""
    labels = sorted(names)
    if train:
        rng = random.Random(int(torch.randint(2**31, (), generator=generator)))
        keep_all = rng.random() < 0.5
        labels = [lb for lb in labels if lb in positives or keep_all or rng.random() < 0.5]
        rng.shuffle(labels)
    prompt, spans = build_prompt([names[lb] for lb in labels])
    return prompt, {lb: [span] for lb, span in zip(labels, spans)}


def fit_prompt(names, label_spans, prompt, tokenizer, max_len, positives):
    """Drop negative categories from the end of a prompt until it fits max_len tokens."""
    order = sorted(label_spans, key=lambda lb: label_spans[lb][0][0])
    while len(tokenizer.encode_with_offsets(prompt, 10**9)[0]) > max_len:
        negatives = [lb for lb in order if lb not in positives]
        if not negatives:
            break  # positives alone overflow: encode_with_spans truncates with a warning
        order.remove(negatives[-1])
        prompt, spans = build_prompt([names[lb] for lb in order])
        label_spans = {lb: [span] for lb, span in zip(order, spans)}
    return prompt, label_spans


def detection_prompts(categories, tokenizer, max_len):
    """Evaluation prompts covering every category: [(prompt, {label: [tokens]})], as few as
    fit `max_len` tokens each (one when they all fit, like COCO; chunks like LVIS)."""
    chunks, current = [], []
    for label, _, name in categories:
        trial = current + [(label, clean_name(name))]
        prompt, _ = build_prompt([n for _, n in trial])
        if current and len(tokenizer.encode_with_offsets(prompt, 10**9)[0]) > max_len:
            chunks.append(current)
            trial = [(label, clean_name(name))]
        current = trial
    chunks.append(current)
    out = []
    for chunk in chunks:
        prompt, spans = build_prompt([n for _, n in chunk])
        _, _, tokens = encode_with_spans(tokenizer, prompt,
                                         {lb: [s] for (lb, _), s in zip(chunk, spans)}, max_len,
                                         "detection prompt")
        out.append((prompt, tokens))
    return out
