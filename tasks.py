"""Fine-tuning objectives of coarse FIBER's downstream tasks, and `build_task`, the one entry
point a training loop needs for any of them.

    parts = build_task("vqa", model, image_size=64)          # model built with TASK_HEADS["vqa"]
    objective, train_set, eval_set, collate, evaluate = parts
    batch = collate([train_set[i] for i in range(8)])
    out = objective(batch)        # dict: loss (what to backpropagate) + detached metrics
    out["loss"].backward()
    print(evaluate(model))        # {"vqa_score": ...} on eval_set (eval.py does the work)

The interface, the same for every task ("vqa", "nlvr2", "irtr", "caption"):

  build_task(name, model, *, tokenizer=None, train_data="synthetic", eval_data="synthetic",
             image_root=None, eval_image_root=None, image_size=None, max_text_len=None,
             seed=0, train_augment=None, eval_count=None, image_names=None, world=None,
             **options) -> TaskParts
  TaskParts = (objective, train_dataset, eval_dataset, collate, evaluate)   # a NamedTuple
  objective(batch, load_images=None) -> dict(loss=scalar tensor, <name>=detached metric, ...)
  evaluate(model, *, device=None, out_dir=None, batch_size=32, limit=None, progress=True)
      -> dict of the benchmark's metric(s); writes the standard result file into out_dir
  save_task_files(objective, out_dir)   # the VQA answer vocabulary, beside the checkpoints

Data sources are strings (data_tasks.parse_source): "synthetic" (the embedded shapes world:
train split for training, val split for evaluation) or the benchmark's files. `options` go to
the task's objective (e.g. mode="gold" for captioning, k=128 for retrieval re-ranking).
Every dataset item may be None (an unreadable image): the collator counts and drops it; a
batch without any good item has no "images" key and must be skipped by the loop.

Wrapping an objective in DistributedDataParallel needs find_unused_parameters=True: each task
reads only part of the model (VQA never runs the ITC maps, captioning never runs the Swin
cross-attention), and DDP otherwise refuses parameters that get no gradient.
"""
import copy
import math
from functools import partial
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import eval as E
import generation
from data import load_tokenizer
from data_tasks import ANSWERS_FILE, AnswerVocab
from heads import PretrainObjective, vqa_loss
from metrics import coco_caption_tokenize
from synthetic import SyntheticWorld
from task_datasets import (TaskCollator, build_caption_pairs, build_corpus,
                           build_corpus_images, build_nlvr2, build_vqa, references_by_index,
                           vqa_vocab_for)

TASKS = ("vqa", "nlvr2", "irtr", "caption")
TASK_HEADS = {"vqa": ("vqa",), "nlvr2": ("nlvr2",), "irtr": ("itc", "itm"),
              "caption": ("caption",)}
# The original fine-tuning recipes (config.py task_finetune_*): defaults for a training script.
# All: AdamW, warm-up 10% then linear decay, text length 50, cross-modal lr x 5. VQA trains on
# train+val (minus 1,000 val images kept to validate); retrieval's ITM run is at 384 px.
RECIPES = {
    "vqa": dict(lr=2e-5, lr_mult_head=50, image_size=576, batch_size=512, epochs=10),
    "nlvr2": dict(lr=2e-5, lr_mult_head=50, image_size=384, batch_size=256, epochs=5),
    "irtr": dict(lr=2e-5, lr_mult_head=5, image_size=576, batch_size=1024, epochs=10),
    "caption": dict(lr=5e-5, lr_mult_head=5, image_size=576, batch_size=512, epochs=10),
}
for recipe in RECIPES.values():
    recipe.update(max_text_len=50, lr_mult_cross=5, warmup=0.1)


# ----------------------------------------------------------------------------- VQA, NLVR2

class VQAObjective(nn.Module):
    """VQA as multi-label classification: BCE with logits against the soft targets, summed
    over the answers (x num_answers) and averaged over questions. The batch score is the
    target value of each question's top answer, as the original's training metric."""

    def __init__(self, model, vocab=None):
        super().__init__()
        self.model, self.vocab = model, vocab

    def forward(self, batch, load_images=None):
        logits = self.model.vqa_logits(batch["images"], batch["text_ids"], batch["text_mask"])
        targets = batch["targets"].to(logits.dtype)  # (B, A)
        loss = vqa_loss(logits.float(), targets.float())
        score = targets.gather(1, logits.argmax(1, keepdim=True)).mean()
        return dict(loss=loss, vqa_loss=loss.detach(), vqa_score=score.detach())


class NLVR2Objective(nn.Module):
    """NLVR2: the statement is fused with each image, both cls features joined, 2-way CE."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch, load_images=None):
        logits = self.model.nlvr2_logits(batch["images"], batch["images_right"],
                                         batch["text_ids"], batch["text_mask"])  # (B, 2)
        loss = F.cross_entropy(logits.float(), batch["labels"])
        accuracy = (logits.argmax(1) == batch["labels"]).float().mean()
        return dict(loss=loss, nlvr2_loss=loss.detach(), nlvr2_accuracy=accuracy.detach())


# ----------------------------------------------------------------------------- retrieval

class RetrievalObjective(PretrainObjective):
    """Image-text retrieval fine-tuning.

    mode "itc+itm" (default): ITC against every rank's batch and the queue, plus ITM on hard
        negatives drawn from the ITC similarities, as pre-training does (heads.py), so one
        run trains both stages of the evaluation (ITC recall, ITM re-ranking).
    mode "itc": the original's first fine-tuning run (task_finetune_irtr_itc_*): ITC alone.
    mode "itm": the original's second run (task_finetune_irtr_itm_*): ITM alone, each pair
        kept with probability 1/2 or given another image of the batch (its draw_false_image).
    """

    MODES = ("itc+itm", "itc", "itm")

    def __init__(self, model, *, mode="itc+itm", queue_size=4096, load_images=None):
        if mode not in self.MODES:
            raise ValueError(f"RetrievalObjective: mode {mode!r}, choose from {self.MODES}")
        super().__init__(model, queue_size=queue_size)
        self.mode, self.load_images = mode, load_images

    def forward(self, batch, load_images=None, generator=None):
        m = self.model
        image_state = m.backbone.image_lower(batch["images"])
        text_state = m.backbone.text_lower(batch["text_ids"], batch["text_mask"])
        if self.mode == "itm":
            itm, acc = self.random_matching(image_state, text_state, generator)
            return dict(loss=itm, itm_loss=itm.detach(), itm_acc=acc)
        itc, image_feat, text_feat, neg_img, neg_txt = self.contrastive(
            image_state, text_state, batch, generator)
        out = dict(loss=itc, itc_loss=itc.detach())
        if self.mode == "itc+itm":
            itm, acc = self.matching(image_state, text_state, batch, neg_img, neg_txt,
                                     load_images or self.load_images or self.no_loader)
            out.update(loss=itc + itm, itm_loss=itm.detach(), itm_acc=acc)
        if self.training:
            self.enqueue(image_feat, text_feat, batch)
        return out

    @staticmethod
    def no_loader(indices):
        raise RuntimeError("RetrievalObjective drew a hard-negative image from the queue but "
                           "has no load_images: pass the dataset's load_images")

    def random_matching(self, image_state, text_state, generator):
        """ITM with random negatives: half of the pairs get another image of the batch."""
        m, B = self.model, image_state.x.shape[0]
        if B < 2:
            raise ValueError("ITM with in-batch negatives needs a batch of at least 2")
        dev = image_state.x.device
        labels = torch.zeros(B, dtype=torch.long)
        labels[torch.randperm(B, generator=generator)[: B // 2]] = 1
        shift = torch.randint(1, B, (B,), generator=generator)  # never the pair's own image
        source = torch.where(labels.bool(), torch.arange(B), (torch.arange(B) + shift) % B)
        logits = m.itm_score(m.fused(image_state.select(source.to(dev)), text_state)["cls_feats"])
        labels = labels.to(dev)
        acc = (logits.argmax(-1) == labels).float().mean().detach()
        return F.cross_entropy(logits.float(), labels), acc


# ----------------------------------------------------------------------------- captioning

def caption_labels(text_ids, pad_id=1):
    """Next-token labels: ids shifted left, <pad> appended, <pad> positions -> -100 (the
    original's compute_caption_mle). Position t predicts token t+1; </s> is a label."""
    labels = torch.cat([text_ids[:, 1:], torch.full_like(text_ids[:, :1], pad_id)], dim=1)
    return labels.masked_fill(labels == pad_id, -100)  # (B, Lt)


def gold_weights(ref_logp, labels, min_weight=0.1):
    """GOLD (Pang & He 2021) token weights, the original's compute_caption_gold:
    w_t = p_t * mean(p_t .. p_end) under a frozen copy of the model, floored at min_weight.

    ref_logp (B, Lt): log-probability of each label under the frozen model; labels (B, Lt)
    with -100 at ignored positions (their probability counts as 0)."""
    real = labels != -100
    p = ref_logp.exp() * real  # (B, Lt)
    suffix_sum = p.flip(1).cumsum(1).flip(1)
    suffix_len = real.float().flip(1).cumsum(1).flip(1).clamp(min=1)
    return torch.clamp(p * suffix_sum / suffix_len, min=min_weight)


class CiderReward:
    """CIDEr-D of sampled captions against an image's references, with document frequencies
    from a fixed training corpus (the original loads them from coco-train-words.p) rather
    than from the evaluated set. Captions are tokenised as the COCO evaluation does
    (metrics.coco_caption_tokenize) and end with an "<eos>" word, as the original's
    _wrap_sentence does, so that ending well is rewarded."""

    def __init__(self, corpus_references, n=4, sigma=6.0, end_word="<eos>"):
        self.n, self.sigma, self.end = n, sigma, [end_word] if end_word else []
        self.doc_freq = {}
        for refs in corpus_references:  # one document per image: its references together
            for gram in set().union(*[self.ngrams(r) for r in refs]):
                self.doc_freq[gram] = self.doc_freq.get(gram, 0) + 1
        self.log_docs = math.log(max(len(corpus_references), 1))

    def ngrams(self, caption):
        words = coco_caption_tokenize(caption) + self.end
        counts = {}
        for k in range(1, self.n + 1):
            for i in range(len(words) - k + 1):
                counts[tuple(words[i:i + k])] = counts.get(tuple(words[i:i + k]), 0) + 1
        return counts

    def vector(self, counts):
        vec = [{} for _ in range(self.n)]
        for gram, tf in counts.items():
            idf = self.log_docs - math.log(max(1.0, self.doc_freq.get(gram, 0.0)))
            vec[len(gram) - 1][gram] = tf * idf
        norms = [sum(w * w for w in v.values()) ** 0.5 for v in vec]
        return vec, norms, sum(tf for g, tf in counts.items() if len(g) == 2)  # CIDEr "length"

    def __call__(self, candidate, references):
        cand_vec, cand_norm, cand_len = self.vector(self.ngrams(candidate))
        total = 0.0
        for ref in references:
            ref_vec, ref_norm, ref_len = self.vector(self.ngrams(ref))
            penalty = math.exp(-((cand_len - ref_len) ** 2) / (2 * self.sigma ** 2))
            for k in range(self.n):
                dot = sum(min(w, ref_vec[k].get(g, 0.0)) * ref_vec[k].get(g, 0.0)
                          for g, w in cand_vec[k].items())
                if cand_norm[k] and ref_norm[k]:
                    dot /= cand_norm[k] * ref_norm[k]
                total += dot * penalty / self.n
        return 10.0 * total / len(references)


class CaptionObjective(nn.Module):
    """Captioning with the causal decoder.

    mode "mle": cross-entropy on the next token (the released fiber_coco_caption recipe).
    mode "gold": each token's loss weighted by gold_weights under a frozen copy of the model,
        refreshed every `gold_refresh` training calls (the original: every 1000 steps).
    mode "cider": alpha * MLE + (1 - alpha) * REINFORCE on `num_samples` sampled captions per
        image with reward 100 * (CIDEr-D - 1), i.e. a fixed baseline of CIDEr 1 (the
        original's compute_caption_cider: alpha 0.3, 5 samples); needs batch["references"]
        and a CiderReward over the training corpus.
    """

    MODES = ("mle", "gold", "cider")

    def __init__(self, model, *, mode="mle", gold_refresh=1000, gold_min_weight=0.1,
                 cider=None, alpha=0.3, num_samples=5, max_len=None, tokenizer=None):
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"CaptionObjective: mode {mode!r}, choose from {self.MODES}")
        if mode == "cider" and (cider is None or tokenizer is None):
            raise ValueError("mode 'cider' needs a CiderReward (cider=) and the tokenizer")
        self.model, self.mode, self.cider, self.tokenizer = model, mode, cider, tokenizer
        self.gold_refresh, self.gold_min_weight = gold_refresh, gold_min_weight
        self.alpha, self.num_samples = alpha, num_samples
        self.max_len = max_len or model.config.max_text_len
        self.calls = 0
        self._frozen = []  # GOLD's copy, kept out of the module tree (no DDP, no checkpoint)

    def forward(self, batch, load_images=None):
        m = self.model
        image_tokens = m.caption_image_tokens(batch["images"])  # (B, Li, C)
        feats, _ = m.caption_forward(image_tokens, batch["text_ids"], batch["text_mask"])
        labels = caption_labels(batch["text_ids"])
        real = labels != -100  # (B, Lt)
        # vocabulary logits only where there is a label: most of the step's arithmetic
        logits = m.mlm_score(feats[real]).float()  # (N, V), N labelled positions
        token_loss = F.cross_entropy(logits, labels[real], reduction="none")  # (N,)
        mle = token_loss.sum() / real.sum().clamp(min=1)
        acc = (logits.argmax(-1) == labels[real]).float().mean().nan_to_num(0.0)
        out = dict(caption_loss=mle.detach(), caption_acc=acc.detach())
        if self.mode == "gold" and self.training:
            out["loss"] = self.gold_loss(batch, token_loss, labels)
        elif self.mode == "cider" and self.training:
            if "references" not in batch:
                raise KeyError("mode 'cider' needs batch['references'] (TaskCollator with "
                               "references=references_by_index(corpus))")
            rl, reward = self.cider_loss(batch, image_tokens)
            out.update(loss=self.alpha * mle + (1 - self.alpha) * rl, cider_reward=reward)
        else:
            out["loss"] = mle
        self.calls += int(self.training)
        return out

    def frozen_model(self):
        if not self._frozen or (self.calls % self.gold_refresh == 0):
            frozen = self._frozen[0] if self._frozen else copy.deepcopy(self.model)
            frozen.load_state_dict(self.model.state_dict())
            self._frozen = [frozen.eval().requires_grad_(False)]
        return self._frozen[0]

    def gold_loss(self, batch, token_loss, labels):
        """token_loss (N,): the loss at each labelled position of labels (B, Lt)."""
        frozen, real = self.frozen_model(), labels != -100
        with torch.no_grad():
            tokens = frozen.caption_image_tokens(batch["images"])
            feats, _ = frozen.caption_forward(tokens, batch["text_ids"], batch["text_mask"])
            logp = torch.log_softmax(frozen.mlm_score(feats[real]).float(), -1)
            ref_logp = torch.zeros(labels.shape, device=logp.device)  # (B, Lt)
            ref_logp[real] = logp.gather(1, labels[real][:, None])[:, 0]
            weights = gold_weights(ref_logp, labels, self.gold_min_weight)
        weighted = torch.zeros(labels.shape, device=token_loss.device)
        weighted[real] = weights[real] * token_loss
        # per caption: weighted sum over its tokens / its token count; then the batch mean.
        # (The original divides by the number of *padded* positions instead, which depends on
        # the padding width; the token count is what the mean was meant to be.)
        return (weighted.sum(1) / real.sum(1).clamp(min=1)).mean()

    def cider_loss(self, batch, image_tokens):
        """REINFORCE on sampled captions; returns (loss, mean CIDEr-D of the samples)."""
        n, m = self.num_samples, self.model
        ids = generation.sample(m, image_tokens=image_tokens.detach(), num_samples=n,
                                max_len=self.max_len)  # (B*n, L)
        mask = (ids != generation.PAD_ID).long()
        feats, _ = m.caption_forward(image_tokens.repeat_interleave(n, 0), ids, mask)
        labels = caption_labels(ids)
        real = labels != -100
        logp = torch.log_softmax(m.mlm_score(feats[real]).float(), -1)  # (N, V)
        token_logp = torch.zeros(labels.shape, device=logp.device)  # (B*n, L)
        token_logp[real] = logp.gather(1, labels[real][:, None])[:, 0]
        mean_logp = token_logp.sum(1) / real.sum(1).clamp(min=1)  # (B*n,)
        captions = generation.decode(ids, self.tokenizer)
        refs = [r for r in batch["references"] for _ in range(n)]
        rewards = torch.tensor([self.cider(c, r) for c, r in zip(captions, refs)],
                               device=mean_logp.device)
        # summed over the samples, averaged over the images (the original's rl_loss)
        loss = (mean_logp * (100.0 - 100.0 * rewards)).sum() / len(batch["references"])
        return loss, rewards.mean()


# ----------------------------------------------------------------------------- build_task

class TaskParts(NamedTuple):
    objective: nn.Module  # objective(batch, load_images=None) -> dict(loss, metrics...)
    train_dataset: torch.utils.data.Dataset
    eval_dataset: torch.utils.data.Dataset
    collate: Callable  # list of items -> training batch
    evaluate: Callable  # evaluate(model, *, device, out_dir, batch_size, limit, progress)


def check_heads(name, model):
    missing = [h for h in TASK_HEADS[name] if h not in model.config.heads]
    if missing:
        raise ValueError(f"task {name!r} needs the model heads {TASK_HEADS[name]}, this model "
                         f"lacks {missing}: build it with FiberConfig(heads=TASK_HEADS[{name!r}])")


def build_task(name, model, *, tokenizer=None, train_data="synthetic", eval_data="synthetic",
               image_root=None, eval_image_root=None, image_size=None, max_text_len=None,
               seed=0, train_augment=None, eval_count=None, image_names=None, world=None,
               **options):
    """Objective, datasets, collator and evaluation of one downstream task (see the module
    docstring). `options` go to the task's objective; "answers" (an AnswerVocab or a saved
    answers.json) fixes the VQA vocabulary instead of building it from train_data."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}: choose from {TASKS}")
    check_heads(name, model)
    ctx = dict(tokenizer=tokenizer or load_tokenizer(), world=world or SyntheticWorld(seed=0),
               image_size=image_size or model.config.image_size, seed=seed,
               max_len=max_text_len or model.config.max_text_len, train_data=train_data,
               eval_data=eval_data, image_root=image_root, augment=train_augment,
               eval_image_root=eval_image_root or image_root, eval_count=eval_count,
               image_names=image_names)
    builders = dict(vqa=vqa_parts, nlvr2=nlvr2_parts, irtr=irtr_parts, caption=caption_parts)
    return builders[name](model, ctx, **options)


def _eval_split(ctx):
    return "val" if ctx["eval_data"] == "synthetic" else None


def vqa_parts(model, ctx, answers=None, **options):
    vocab = answers if isinstance(answers, AnswerVocab) else (
        AnswerVocab.load(answers) if answers else vqa_vocab_for(ctx["train_data"]))
    if len(vocab) != model.config.vqa_answers:
        raise ValueError(f"the answer vocabulary has {len(vocab)} answers but the model's VQA "
                         f"head {model.config.vqa_answers}: build the model with "
                         f"vqa_answers={len(vocab)}")
    common = dict(vocab=vocab, image_size=ctx["image_size"], seed=ctx["seed"], world=ctx["world"],
                  image_names=ctx["image_names"])
    train = build_vqa(ctx["train_data"], "train", train=True, image_root=ctx["image_root"],
                      augment=ctx["augment"], **common)
    held_out = build_vqa(ctx["eval_data"], _eval_split(ctx), train=False,
                         image_root=ctx["eval_image_root"], **common)
    collate = TaskCollator("vqa", ctx["tokenizer"], ctx["max_len"])
    evaluate = partial(E.evaluate_vqa, dataset=held_out, vocab=vocab, collate=collate)
    return TaskParts(VQAObjective(model, vocab, **options), train, held_out, collate, evaluate)


def nlvr2_parts(model, ctx, **options):
    common = dict(image_size=ctx["image_size"], seed=ctx["seed"], world=ctx["world"])
    train = build_nlvr2(ctx["train_data"], "train", train=True, image_root=ctx["image_root"],
                        augment=ctx["augment"], **common)
    held_out = build_nlvr2(ctx["eval_data"], _eval_split(ctx), train=False,
                           image_root=ctx["eval_image_root"], count=ctx["eval_count"], **common)
    collate = TaskCollator("nlvr2", ctx["tokenizer"], ctx["max_len"])
    evaluate = partial(E.evaluate_nlvr2, dataset=held_out, collate=collate)
    return TaskParts(NLVR2Objective(model, **options), train, held_out, collate, evaluate)


def _corpora(ctx):
    train = build_corpus(ctx["train_data"], "train", image_root=ctx["image_root"],
                         world=ctx["world"])
    held_out = build_corpus(ctx["eval_data"], _eval_split(ctx) or "test",
                            image_root=ctx["eval_image_root"], world=ctx["world"],
                            count=ctx["eval_count"])
    pairs = build_caption_pairs(train, ctx["train_data"], image_size=ctx["image_size"],
                                train=True, seed=ctx["seed"], augment=ctx["augment"],
                                world=ctx["world"])
    images = build_corpus_images(held_out, ctx["eval_data"], image_size=ctx["image_size"],
                                 world=ctx["world"])
    return train, pairs, images


def irtr_parts(model, ctx, k=128, **options):
    _, pairs, held_out = _corpora(ctx)
    objective = RetrievalObjective(model, load_images=pairs.load_images, **options)
    collate = TaskCollator("irtr", ctx["tokenizer"], ctx["max_len"])
    evaluate = partial(E.evaluate_retrieval, images=held_out, tokenizer=ctx["tokenizer"],
                       max_len=ctx["max_len"], k=k)
    return TaskParts(objective, pairs, held_out, collate, evaluate)


def caption_parts(model, ctx, beam_size=5, **options):
    corpus, pairs, held_out = _corpora(ctx)
    if options.get("mode") == "cider":
        options.setdefault("cider", CiderReward(list(corpus.references().values())))
    objective = CaptionObjective(model, tokenizer=ctx["tokenizer"], **options)
    collate = TaskCollator("caption", ctx["tokenizer"], ctx["max_len"],
                           references=references_by_index(corpus))
    evaluate = partial(E.evaluate_caption, images=held_out, tokenizer=ctx["tokenizer"],
                       beam_size=beam_size, max_len=ctx["max_len"])
    return TaskParts(objective, pairs, held_out, collate, evaluate)


def save_task_files(objective, out_dir):
    """Write what a checkpoint of this task needs besides its weights (the VQA answers)."""
    vocab = getattr(objective, "vocab", None)
    return vocab.save(Path(out_dir) / ANSWERS_FILE) if vocab is not None else None
