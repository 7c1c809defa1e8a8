"""Caption generation with FIBER's causal text decoder: greedy, beam search and sampling.

The image is encoded once (`Fiber.caption_image_tokens`: the whole Swin, no fusion); the
decoder (`Fiber.caption_forward`, causal RoBERTa cross-attending to those tokens) is re-run on
the growing prefix at every step and `Fiber.mlm_score` gives next-token logits at its last
position. A sequence starts with <s>, ends at the first </s> (or <pad>, which the original also
treats as an end) and holds at most `max_len` tokens, <s> included; one that reaches max_len
without </s> is cut there. The <mask> token is never generated.

    tokens = beam_search(model, images, beam_size=5, max_len=50)  # (B, <=50) ids
    captions = decode(tokens, tokenizer)                           # ["a cat on a couch", ...]

Beam search ranks hypotheses by sum(log p) / length ** length_penalty, where length counts the
generated tokens including </s>; length_penalty 1 (the mean log-probability per token) is what
the original FIBER evaluation uses (its `caption_test_step`, beam size 5).
"""
import torch

BOS_ID, PAD_ID, EOS_ID, MASK_ID = 0, 1, 2, 50264  # RoBERTa's <s>, <pad>, </s>, <mask>


def next_log_probs(model, image_tokens, ids):
    """Log-probabilities (N, V) of the token after each prefix ids (N, t)."""
    feats, _ = model.caption_forward(image_tokens, ids, torch.ones_like(ids))  # (N, t, D)
    logits = model.mlm_score(feats[:, -1]).float()  # (N, V)
    if MASK_ID < logits.shape[1]:
        logits[:, MASK_ID] = float("-inf")  # the original sets it to -10000: never chosen
    return torch.log_softmax(logits, dim=-1)


def ends(tokens):
    return (tokens == EOS_ID) | (tokens == PAD_ID)


@torch.no_grad()
def greedy(model, images, *, max_len=50, image_tokens=None):
    """Most likely token at every step -> ids (B, L<=max_len), <pad> after each </s>."""
    tokens = model.caption_image_tokens(images) if image_tokens is None else image_tokens
    B = tokens.shape[0]
    ids = torch.full((B, 1), BOS_ID, dtype=torch.long, device=tokens.device)
    done = torch.zeros(B, dtype=torch.bool, device=tokens.device)
    for _ in range(max_len - 1):
        best = next_log_probs(model, tokens, ids).argmax(-1)  # (B,)
        best = best.masked_fill(done, PAD_ID)
        ids = torch.cat([ids, best[:, None]], dim=1)
        done |= ends(best)
        if bool(done.all()):
            break
    return ids


@torch.no_grad()
def beam_search(model, images, *, beam_size=5, max_len=50, length_penalty=1.0,
                image_tokens=None):
    """Beam search -> the best hypothesis per image, ids (B, L<=max_len), padded with <pad>.

    A finished hypothesis keeps its score and stays in the beam (continued by <pad> at no
    cost) until better ones push it out. The original lets a finished beam take several slots
    at once (every vocabulary entry continues it at the same score); here each finished
    hypothesis is kept once, so the beam always holds `beam_size` distinct hypotheses.
    """
    tokens = model.caption_image_tokens(images) if image_tokens is None else image_tokens
    B, K, dev = tokens.shape[0], beam_size, tokens.device
    tokens = tokens.repeat_interleave(K, dim=0)  # (B*K, Li, C)
    ids = torch.full((B * K, 1), BOS_ID, dtype=torch.long, device=dev)
    logp = torch.zeros(B, K, device=dev)
    logp[:, 1:] = float("-inf")  # all beams start equal: expand only the first at step 1
    length = torch.zeros(B, K, device=dev)
    done = torch.zeros(B, K, dtype=torch.bool, device=dev)
    for _ in range(max_len - 1):
        step = next_log_probs(model, tokens, ids).view(B, K, -1)  # (B, K, V)
        V = step.shape[-1]
        finished_row = torch.full((V,), float("-inf"), device=dev)
        finished_row[PAD_ID] = 0.0
        step = torch.where(done[..., None], finished_row, step)
        total = logp[..., None] + step  # (B, K, V)
        new_length = length + (~done).float()
        score = total / new_length.clamp(min=1)[..., None] ** length_penalty
        top = score.view(B, K * V).topk(K, dim=1).indices  # (B, K), best first
        beam, token = top // V, top % V
        logp = total.view(B, K * V).gather(1, top)
        length, done = new_length.gather(1, beam), done.gather(1, beam) | ends(token)
        rows = (beam + torch.arange(B, device=dev)[:, None] * K).view(-1)  # (B*K,)
        ids = torch.cat([ids[rows], token.view(-1, 1)], dim=1)
        if bool(done.all()):
            break
    return ids.view(B, K, -1)[:, 0]


@torch.no_grad()
def sample(model, images=None, *, num_samples=5, max_len=50, generator=None,
           image_tokens=None):
    """Draw `num_samples` captions per image from the model's distribution (self-critical /
    CIDEr training) -> ids (B * num_samples, L), the samples of image b in rows b*n .. b*n+n-1.
    """
    tokens = model.caption_image_tokens(images) if image_tokens is None else image_tokens
    tokens = tokens.repeat_interleave(num_samples, dim=0)
    N = tokens.shape[0]
    ids = torch.full((N, 1), BOS_ID, dtype=torch.long, device=tokens.device)
    done = torch.zeros(N, dtype=torch.bool, device=tokens.device)
    for _ in range(max_len - 1):
        probs = next_log_probs(model, tokens, ids).exp()
        drawn = torch.multinomial(probs, 1, generator=generator)[:, 0].masked_fill(done, PAD_ID)
        ids = torch.cat([ids, drawn[:, None]], dim=1)
        done |= ends(drawn)
        if bool(done.all()):
            break
    return ids


def decode(ids, tokenizer):
    """ids (N, L) starting with <s> -> captions: the tokens before the first </s> or <pad>."""
    captions = []
    for row in ids.tolist():
        body = row[1:]
        stop = next((k for k, t in enumerate(body) if t in (EOS_ID, PAD_ID)), len(body))
        captions.append(tokenizer.decode(body[:stop]).strip())
    return captions


def generate_captions(model, images, tokenizer, *, beam_size=5, max_len=50,
                      length_penalty=1.0):
    """images (B,3,S,S) -> B caption strings (beam_size 1: greedy)."""
    if beam_size <= 1:
        ids = greedy(model, images, max_len=max_len)
    else:
        ids = beam_search(model, images, beam_size=beam_size, max_len=max_len,
                          length_penalty=length_penalty)
    return decode(ids, tokenizer)
