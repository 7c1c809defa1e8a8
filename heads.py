"""Task heads and losses of coarse FIBER: poolers, ITC, ITM, MLM, VQA, NLVR2.

Each head is a small module applied to the fused features; each loss is a plain function.
`PretrainObjective` ties them into one pre-training step (ITC + ITM with hard negatives + MLM).
This file stands on torch alone: the objective drives the model through its methods
(`image_lower`, `text_lower`, `fused`, `itc_image`, `itc_text`).

Shape alphabet: B batch, Lt text tokens, Li image tokens, D width (768), V vocabulary, Q queue.
"""
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


class Pooler(nn.Module):
    """dense + tanh on the first token (text: <s>; image: the mean token placed first)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dense = nn.Linear(dim, dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(tokens[:, 0]))  # (B, D)


class ITMHead(nn.Module):
    """Image-text matching: 2 logits (no match, match) from the joint cls feature (B, 2D)."""

    def __init__(self, dim: int):
        super().__init__()
        self.fc = nn.Linear(dim, 2)

    def forward(self, cls_feats):
        return self.fc(cls_feats)

    def rank_score(self, cls_feats):
        """The "match" logit alone: retrieval re-ranks candidates by it (the original's
        `rank_output` is row 1 of this layer)."""
        return F.linear(cls_feats, self.fc.weight[1:], self.fc.bias[1:])[:, 0]


class MLMTransform(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        # BERT's prediction-head eps (1e-12), unlike the 1e-5 of RoBERTa's own LayerNorms
        self.LayerNorm = nn.LayerNorm(dim, eps=1e-12)

    def forward(self, x):
        return self.LayerNorm(F.gelu(self.dense(x)))


class MLMHead(nn.Module):
    """Masked-token (and caption next-token) logits over the vocabulary; decoder not tied."""

    def __init__(self, dim: int, vocab_size: int):
        super().__init__()
        self.transform = MLMTransform(dim)
        self.decoder = nn.Linear(dim, vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, text_feats):
        return self.decoder(self.transform(text_feats)) + self.bias  # (B, Lt, V)


def classifier(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """Linear -> LayerNorm -> GELU -> Linear, the VQA and NLVR2 classifier shape."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.LayerNorm(hidden), nn.GELU(),
                         nn.Linear(hidden, out_dim))


def vqa_loss(logits, targets):
    """BCE over every answer, summed over answers (x num_answers) and averaged over questions."""
    return F.binary_cross_entropy_with_logits(logits, targets) * targets.shape[1]


def mlm_loss(logits, labels):
    """Cross-entropy on masked positions; 0 (not NaN) for a batch where nothing was masked."""
    V = logits.shape[-1]
    total = F.cross_entropy(logits.reshape(-1, V).float(), labels.reshape(-1),
                            ignore_index=-100, reduction="sum")
    return total / (labels != -100).sum().clamp(min=1)


def itc_loss(image_feat, text_feat, temp, image_bank=None, text_bank=None, offset=0):
    """Contrastive loss of normalised features against all candidates.

    image_feat/text_feat (B, D) are this rank's; image_bank/text_bank (N, D) are the other
    candidates (every rank's batch, then the queue); row i's positive is column offset + i.
    Returns the loss and the similarity matrices (B, N) used to sample hard negatives.
    """
    image_bank = image_feat if image_bank is None else image_bank
    text_bank = text_feat if text_bank is None else text_bank
    sim_i2t = image_feat @ text_bank.t() / temp  # (B, N)
    sim_t2i = text_feat @ image_bank.t() / temp
    target = torch.arange(image_feat.shape[0], device=image_feat.device) + offset
    loss = (F.cross_entropy(sim_i2t.float(), target) + F.cross_entropy(sim_t2i.float(), target))
    return loss / 2, sim_i2t, sim_t2i


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's x along dim 0, keeping the gradient path to each rank's own x."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    import torch.distributed.nn.functional as dist_fn  # autograd-aware collectives
    return torch.cat(dist_fn.all_gather(x), dim=0)


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def rank_and_world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class FeatureQueue(nn.Module):
    """The ITC memory of past batches (ALBEF/FIBER): features, token ids and image indices.

    The original keeps the raw images of all 4096 entries in memory (7 GB at 384 px) to draw
    hard negatives from; this queue keeps each entry's dataset index instead, and the images
    a step samples are re-read through a callback. Buffers, so checkpoints carry the queue.
    """

    def __init__(self, *, size: int, dim: int, max_text_len: int):
        super().__init__()
        self.size = size
        self.register_buffer("image_feats", torch.zeros(size, dim))
        self.register_buffer("text_feats", torch.zeros(size, dim))
        self.register_buffer("text_ids", torch.ones(size, max_text_len, dtype=torch.long))
        self.register_buffer("text_mask", torch.zeros(size, max_text_len, dtype=torch.long))
        self.register_buffer("image_index", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    def valid(self) -> int:
        return int(self.filled)

    @torch.no_grad()
    def push(self, image_feats, text_feats, text_ids, text_mask, image_index):
        """Insert a (gathered) batch at the pointer, wrapping around (size 0: no queue)."""
        n = image_feats.shape[0]
        if self.size == 0:
            return
        slots = (int(self.ptr) + torch.arange(n)) % self.size
        slots = slots.to(self.image_feats.device)
        self.image_feats[slots] = image_feats.float()
        self.text_feats[slots] = text_feats.float()
        L = self.text_ids.shape[1]
        self.text_ids[slots] = pad_to(text_ids, L, value=1)[:, :L]  # 1 = RoBERTa's <pad>
        self.text_mask[slots] = pad_to(text_mask, L, value=0)[:, :L]
        self.image_index[slots] = image_index
        self.ptr.fill_((int(self.ptr) + n) % self.size)
        self.filled.fill_(min(int(self.filled) + n, self.size))


class PretrainObjective(nn.Module):
    """One pre-training step of FIBER: ITC + ITM with hard negatives + MLM.

    Wrap this module (it owns the model) in DistributedDataParallel. The lower halves of both
    backbones run once per distinct image and caption; only the fused top runs per pair.
    """

    def __init__(self, model, *, queue_size: int = 4096, weights=None):
        super().__init__()
        self.model = model
        self.weights = dict(itc=1.0, itm=1.0, mlm=1.0, **(weights or {}))
        cfg = model.config
        self.queue = FeatureQueue(size=queue_size, dim=cfg.hidden_size,
                                  max_text_len=cfg.max_text_len)

    def forward(self, batch, load_images, generator=None):
        """batch: images (B,3,S,S), text_ids/text_mask/mlm_ids/mlm_labels (B,Lt), index (B,).

        load_images(list of dataset indices) -> (n,3,S,S) re-reads queue negatives.
        generator: torch.Generator for negative sampling (reproducible runs).
        """
        m = self.model
        images, ids, mask = batch["images"], batch["text_ids"], batch["text_mask"]
        image_state = m.backbone.image_lower(images)
        text_state = m.backbone.text_lower(ids, mask)

        itc, image_feat, text_feat, neg_img, neg_txt = self.contrastive(
            image_state, text_state, batch, generator)
        itm, itm_acc = self.matching(image_state, text_state, batch, neg_img, neg_txt,
                                     load_images)
        mlm, mlm_acc = self.masked_lm(image_state, batch)
        if self.training:
            self.enqueue(image_feat, text_feat, batch)

        w = self.weights
        loss = w["itc"] * itc + w["itm"] * itm + w["mlm"] * mlm
        return dict(loss=loss, itc_loss=itc.detach(), itm_loss=itm.detach(),
                    mlm_loss=mlm.detach(), itm_acc=itm_acc, mlm_acc=mlm_acc)

    def contrastive(self, image_state, text_state, batch, generator):
        m = self.model
        with torch.no_grad():
            m.temp.clamp_(0.001, 1.0)
        image_feat = m.itc_image(image_state)[0]  # (B, D), normalised
        text_feat = m.itc_text(text_state)[0]
        rank, _ = rank_and_world()
        B = image_feat.shape[0]

        n = self.queue.valid()
        image_bank = torch.cat([gather_with_grad(image_feat),
                                self.queue.image_feats[:n].to(image_feat.dtype)])
        text_bank = torch.cat([gather_with_grad(text_feat),
                               self.queue.text_feats[:n].to(text_feat.dtype)])
        loss, _, _ = itc_loss(image_feat, text_feat, m.temp, image_bank, text_bank, rank * B)

        # hard negatives: as the original, drawn from this rank's batch and the queue
        with torch.no_grad():
            local = torch.cat([image_feat, self.queue.image_feats[:n].to(image_feat.dtype)])
            local_t = torch.cat([text_feat, self.queue.text_feats[:n].to(text_feat.dtype)])
            w_i2t = F.softmax(image_feat @ local_t.t() / m.temp, dim=1).float()
            w_t2i = F.softmax(text_feat @ local.t() / m.temp, dim=1).float()
            # a non-finite batch must reach the loop's NaN guard, not crash the sampling
            w_i2t, w_t2i = w_i2t.nan_to_num(0.0, 0.0, 0.0), w_t2i.nan_to_num(0.0, 0.0, 0.0)
            w_i2t.fill_diagonal_(0)
            w_t2i.fill_diagonal_(0)
            neg_img = torch.multinomial(w_t2i + 1e-9, 1, generator=generator)[:, 0]
            neg_txt = torch.multinomial(w_i2t + 1e-9, 1, generator=generator)[:, 0]
        return loss, image_feat.detach(), text_feat.detach(), neg_img, neg_txt

    def negative_images(self, image_state, neg_img, load_images):
        """Lower image states of the sampled negatives: batch ones reused, queue ones re-read."""
        B = image_state.x.shape[0]
        in_batch = neg_img < B
        if bool(in_batch.all()):
            return image_state.select(neg_img)
        queue_idx = self.queue.image_index[(neg_img[~in_batch] - B)].tolist()
        loaded = load_images(queue_idx).to(image_state.x.device, image_state.x.dtype)
        extra = self.model.backbone.image_lower(loaded)
        # rows: the batch's lower states, then the re-read ones; pick each negative's row
        pool_x = torch.cat([image_state.x, extra.x])
        pick = neg_img.clone()
        pick[~in_batch] = B + torch.arange(int((~in_batch).sum()), device=neg_img.device)
        outs = [torch.cat([a, b])[pick] for a, b in zip(image_state.stage_outputs,
                                                         extra.stage_outputs)]
        return type(image_state)(pool_x[pick], image_state.H, image_state.W, outs)

    def negative_texts(self, text_state, batch, neg_txt):
        B = text_state.h.shape[0]
        if bool((neg_txt < B).all()):
            return text_state.select(neg_txt)
        n, L = self.queue.valid(), batch["text_ids"].shape[1]
        # queue entries may be padded wider than this batch; real tokens fit in L because
        # every caption was truncated to the same maximum length
        width = max(L, self.queue.text_ids.shape[1])
        all_ids = torch.cat([pad_to(batch["text_ids"], width, 1), self.queue.text_ids[:n]])
        all_mask = torch.cat([pad_to(batch["text_mask"], width, 0), self.queue.text_mask[:n]])
        ids, mask = all_ids[neg_txt], all_mask[neg_txt]
        keep = max(L, int(mask.sum(1).max()))
        return self.model.backbone.text_lower(ids[:, :keep], mask[:, :keep])

    def matching(self, image_state, text_state, batch, neg_img, neg_txt, load_images):
        """ITM on 3B pairs: (image, text)=1, (image, hard text)=0, (hard image, text)=0."""
        m = self.model
        B = image_state.x.shape[0]
        neg_images = self.negative_images(image_state, neg_img, load_images)
        neg_texts = self.negative_texts(text_state, batch, neg_txt)
        images = cat_states([image_state, image_state, neg_images])
        width = max(text_state.h.shape[1], neg_texts.h.shape[1])
        positives, neg_texts = widen(text_state, width), widen(neg_texts, width)
        texts = cat_states([positives, neg_texts, positives])
        logits = m.itm_score(m.fused(images, texts)["cls_feats"])  # (3B, 2)
        labels = torch.cat([torch.ones(B), torch.zeros(2 * B)]).long().to(logits.device)
        acc = (logits.argmax(-1) == labels).float().mean().detach()
        return F.cross_entropy(logits.float(), labels), acc

    def masked_lm(self, image_state, batch):
        m = self.model
        text_state = m.backbone.text_lower(batch["mlm_ids"], batch["text_mask"])
        text_feats = m.fused(image_state, text_state)["text_feats"]  # (B, Lt, D)
        # the head is per token: run the vocabulary projection (the largest matmul of a small
        # model) on the masked positions only; the loss is the same
        picked = batch["mlm_labels"] != -100  # (B, Lt)
        labels = batch["mlm_labels"][picked]  # (n,)
        logits = m.mlm_score(text_feats[picked])  # (n, V)
        acc = (logits.argmax(-1) == labels).float().mean().nan_to_num(0.0)
        return mlm_loss(logits, labels), acc.detach()

    @torch.no_grad()
    def enqueue(self, image_feat, text_feat, batch):
        image_feat, text_feat = gather_no_grad(image_feat), gather_no_grad(text_feat)
        if not (torch.isfinite(image_feat).all() and torch.isfinite(text_feat).all()):
            return  # never let a bad step poison the queue (same decision on every rank)
        self.queue.push(image_feat, text_feat,
                        gather_no_grad(batch["text_ids"]), gather_no_grad(batch["text_mask"]),
                        gather_no_grad(batch["index"].to(image_feat.device)))


def pad_to(x: torch.Tensor, width: int, value: int) -> torch.Tensor:
    """Right-pad token ids or masks (B, L) to (B, width)."""
    return F.pad(x, (0, width - x.shape[1]), value=value) if x.shape[1] < width else x


def widen(text_state, width: int):
    """Append masked-out positions to a TextState. Masked positions are never attended to,
    so the real tokens' results are unchanged; this lets texts of two widths share a batch."""
    extra = width - text_state.h.shape[1]
    if extra <= 0:
        return text_state
    h, mask, ext = text_state.h, text_state.mask, text_state.extended
    return type(text_state)(F.pad(h, (0, 0, 0, extra)), F.pad(mask, (0, extra)),
                            F.pad(ext, (0, extra), value=torch.finfo(ext.dtype).min))


def cat_states(states):
    """Stack ImageStates or TextStates along the batch (duck-typed: both are dataclasses)."""
    first = states[0]
    fields = {}
    for name, value in vars(first).items():
        if torch.is_tensor(value):
            fields[name] = torch.cat([getattr(s, name) for s in states])
        elif isinstance(value, list):
            fields[name] = [torch.cat(parts) for parts in zip(*[getattr(s, name)
                                                                 for s in states])]
        else:
            fields[name] = value
    return type(first)(**fields)


def naive_pretrain_losses(model, batch, neg_img, neg_txt):
    """The original's way of computing the pre-training losses: a full forward of both
    backbones for ITC, for MLM and for each of the 3B ITM pairs (B positives, B pairs with a
    negative text, B with a negative image). PretrainObjective gives the same numbers with the
    lower backbones run once; this reference checks it (tests) and measures it (bench.py)."""
    images, ids, mask = batch["images"], batch["text_ids"], batch["text_mask"]
    itc, _, _ = itc_loss(model.encode_image(images), model.encode_text(ids, mask), model.temp)
    pair_images = torch.cat([images, images, images[neg_img]])
    pair_texts = torch.cat([ids, ids[neg_txt], ids])
    pair_masks = torch.cat([mask, mask[neg_txt], mask])
    logits = model.itm_score(model(pair_images, pair_texts, pair_masks)["cls_feats"])
    B = images.shape[0]
    labels = torch.cat([torch.ones(B), torch.zeros(2 * B)]).long().to(logits.device)
    itm = F.cross_entropy(logits, labels)
    mlm_states = model(images, batch["mlm_ids"], mask)["text_feats"]
    mlm = mlm_loss(model.mlm_score(mlm_states), batch["mlm_labels"])
    return itc + itm + mlm, (itc, itm, mlm)
