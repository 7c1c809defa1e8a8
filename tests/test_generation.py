"""Caption generation: greedy, beam search (checked against brute-force enumeration), sampling,
</s> and max-length handling, decoding, and the tiny Fiber's causal decoder."""
import itertools
import math

import pytest
import torch

import generation as G
from data import load_tokenizer
from model import Fiber, FiberConfig


class TableModel:
    """A stand-in decoder whose next-token logits are a fixed random function of (image,
    prefix), over a 6-token vocabulary: 0 <s>, 1 <pad>, 2 </s>, 3-5 words."""

    V = 6

    def __init__(self, seed=0, vocab=6, boost=None):
        self.seed, self.V, self.boost = seed, vocab, boost

    def caption_image_tokens(self, images):
        return images[:, :1, :1, 0].float()  # (B, 1, 1): the image's id

    def caption_forward(self, image_tokens, ids, mask):
        N, t = ids.shape
        codes = [hash((int(image_tokens[n, 0, 0]), tuple(ids[n].tolist()))) % (2 ** 31)
                 for n in range(N)]
        feats = torch.zeros(N, t, 1, dtype=torch.float64)
        feats[:, -1, 0] = torch.tensor(codes, dtype=torch.float64)
        return feats, None

    def mlm_score(self, last):
        rows = []
        for code in last[:, 0].tolist():
            g = torch.Generator().manual_seed(int(code) + self.seed)
            row = 2.0 * torch.randn(self.V, generator=g)
            if self.boost is not None:
                row[self.boost] += 100.0
            rows.append(row)
        return torch.stack(rows)


def images_with_ids(*ids):
    x = torch.zeros(len(ids), 3, 2, 2)
    x[:, 0, 0, 0] = torch.tensor(ids, dtype=torch.float)
    return x


def brute_force_best(model, image, max_len, alpha=1.0):
    """Score every complete or max-length sequence; return the best token list."""
    best, best_score = None, -math.inf
    words = [0, 1, 2, 3, 4, 5]  # <s> may be generated too: only <mask> is banned
    for n in range(1, max_len):
        for body in itertools.product(words, repeat=n):
            if any(t in (1, 2) for t in body[:-1]):
                continue  # ended earlier
            if n < max_len - 1 and body[-1] not in (1, 2):
                continue  # unfinished but not at max length
            ids = torch.tensor([[0, *body]])
            logp = sum(G.next_log_probs(model, model.caption_image_tokens(image), ids[:, :k + 1])
                       [0, ids[0, k + 1]].item() for k in range(n))
            score = logp / n ** alpha
            if score > best_score:
                best, best_score = list(body), score
    return best


def strip(ids_row):
    out = []
    for t in ids_row[1:]:
        out.append(t)
        if t in (1, 2):
            break
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_wide_beam_finds_the_brute_force_best(seed):
    model, max_len = TableModel(seed), 5
    image = images_with_ids(7)
    ids = G.beam_search(model, image, beam_size=64, max_len=max_len)
    assert strip(ids[0].tolist()) == brute_force_best(model, image, max_len)


def test_length_penalty_changes_the_ranking_rule():
    model, image = TableModel(3), images_with_ids(1)
    for alpha in (0.0, 2.0):
        ids = G.beam_search(model, image, beam_size=64, max_len=5, length_penalty=alpha)
        assert strip(ids[0].tolist()) == brute_force_best(model, image, 5, alpha)


def test_beam_of_one_is_greedy_and_images_are_independent():
    model = TableModel(5)
    images = images_with_ids(1, 2, 3)
    g = G.greedy(model, images, max_len=8)
    b = G.beam_search(model, images, beam_size=1, max_len=8)
    assert [strip(r) for r in g.tolist()] == [strip(r) for r in b.tolist()]
    alone = G.beam_search(model, images[1:2], beam_size=3, max_len=8)
    together = G.beam_search(model, images, beam_size=3, max_len=8)
    assert strip(alone[0].tolist()) == strip(together[1].tolist())


def test_max_length_and_padding_after_the_end():
    model = TableModel(0, boost=4)  # word 4 always wins: never ends by itself
    ids = G.greedy(model, images_with_ids(1, 2), max_len=6)
    assert ids.shape == (2, 6) and ids[:, 0].eq(0).all() and ids[:, 1:].eq(4).all()
    ends = TableModel(0, boost=2)  # </s> first: a one-token caption, then stop
    assert G.greedy(ends, images_with_ids(1), max_len=6).tolist() == [[0, 2]]
    assert G.beam_search(ends, images_with_ids(1), beam_size=3, max_len=6)[0, 1].item() == 2


def test_mask_token_is_never_generated():
    model = TableModel(0, vocab=G.MASK_ID + 1, boost=G.MASK_ID)
    ids = G.greedy(model, images_with_ids(1), max_len=3)
    assert G.MASK_ID not in ids.tolist()[0]
    assert G.MASK_ID not in G.sample(model, images_with_ids(1), num_samples=3, max_len=3).view(-1)


def test_sampling_is_reproducible_and_ends_with_padding():
    model = TableModel(1)
    a = G.sample(model, images_with_ids(1, 2), num_samples=4, max_len=7,
                 generator=torch.Generator().manual_seed(0))
    b = G.sample(model, images_with_ids(1, 2), num_samples=4, max_len=7,
                 generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape[0] == 8
    for row in a.tolist():
        body = row[1:]
        if 2 in body or 1 in body:
            first = min(body.index(t) for t in (1, 2) if t in body)
            assert all(t == 1 for t in body[first + 1:])


def test_decode_cuts_at_the_first_end_token():
    tok = load_tokenizer()
    ids, _ = tok.encode(["a cat sitting on a couch"], 12)
    row = ids[0].tolist()  # <s> ... </s> <pad> ...
    extra = torch.tensor([row[:4] + [2] + row[4:8]])
    assert G.decode(ids, tok) == ["a cat sitting on a couch"]
    assert G.decode(extra, tok) == ["a cat sitting"]


def test_tiny_fiber_incremental_steps_match_one_causal_pass():
    torch.manual_seed(0)
    model = Fiber(FiberConfig.tiny(heads=("caption",))).eval()
    images = torch.randn(2, 3, 64, 64)
    tokens = model.caption_image_tokens(images)
    ids = torch.tensor([[0, 10, 20, 30, 40, 50], [0, 11, 21, 31, 41, 51]])
    with torch.no_grad():
        feats, _ = model.caption_forward(tokens, ids, torch.ones_like(ids))
        full = torch.log_softmax(model.mlm_score(feats).float(), -1)  # (2, 6, V)
        for t in range(1, 6):
            step = G.next_log_probs(model, tokens, ids[:, :t])
            full_t = full[:, t - 1].clone()
            full_t[:, G.MASK_ID] = -math.inf
            full_t = torch.log_softmax(full_t, -1)
            # same arithmetic up to float32 reassociation of a different sequence length
            keep = torch.arange(full_t.shape[1]) != G.MASK_ID  # -inf there on both sides
            assert (step - full_t)[:, keep].abs().max() < 1e-4
    captions = G.generate_captions(model, images, load_tokenizer(), beam_size=2, max_len=6)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)
