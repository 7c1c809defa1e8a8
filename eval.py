"""Evaluation of coarse FIBER on its downstream tasks, and an inference demo.

    python eval.py vqa --checkpoint runs/vqa/last.pt                     # synthetic val split
    python eval.py vqa --checkpoint fiber_vqa --answers answers.json --image-root coco/val2014 \\
        --data v2_OpenEnded_mscoco_val2014_questions.json+v2_mscoco_val2014_annotations.json
    python eval.py nlvr2 --checkpoint fiber_nlvr2 --data nlvr2/dev.json --image-root nlvr2/dev
    python eval.py irtr --checkpoint fiber_coco_irtr_itm --data dataset_coco.json:test \\
        --image-root coco --k 128
    python eval.py caption --checkpoint fiber_coco_caption --data dataset_coco.json:test \\
        --image-root coco --beam-size 5
    python eval.py demo --checkpoint runs/vqa/last.pt --image cat.jpg --text "what is this?"
    torchrun --nproc_per_node 8 eval.py irtr ...   # items are sharded, results gathered

Each evaluation prints the benchmark's own metric and writes its standard result file into
--out: vqa_submit.json [{question_id, answer}] (the VQA server's format), captions.json
[{image_id, caption}] (COCO caption results), nlvr2_predictions.json, retrieval.json.

Retrieval ranks all pairs by ITC similarity, then re-scores each image's top-k texts and each
text's top-k images with the ITM head and puts them, in ITM order, above the rest. The
original's code (compute_itm_recall) scores every pair with ITM instead: --k 0 does that,
at a cost of images x texts fused passes.

The metrics are re-exported here: `from eval import vqa_score, bleu, cider_d, ...`.
"""
import argparse
import json
import logging
import sys
from contextlib import contextmanager
from operator import itemgetter
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import generation
import training as T
from data import load_tokenizer
from data_tasks import ANSWERS_FILE, AnswerVocab
from images import ImageTransform, load_image
from metrics import (bleu, cider_d, coco_box_ap, grounding_recall, rec_accuracy,  # noqa: F401
                     retrieval_recall, vqa_score)
from model import Fiber, FiberConfig
from task_datasets import (TaskCollator, build_corpus, build_corpus_images, build_nlvr2,
                           build_vqa, trim, vqa_vocab_for)

log = logging.getLogger("fiber.eval")


# ----------------------------------------------------------------------------- sharding

def rank_world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def my_share(n, limit=None):
    """This rank's item indices: every world_size-th of the first `limit` (or all) items."""
    rank, world = rank_world()
    return list(range(rank, min(n, limit or n), world))


def gather(records):
    """Every rank's list of records, concatenated (each rank gets the whole list)."""
    rank, world = rank_world()
    if world == 1:
        return list(records)
    parts = [None] * world
    dist.all_gather_object(parts, list(records))
    return [r for part in parts for r in part]


def batches(dataset, indices, collate, batch_size, device, desc, progress=True):
    """Batches of dataset[indices] on `device`, with a progress bar on rank 0."""
    subset = torch.utils.data.Subset(dataset, indices)
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, collate_fn=collate)
    bar = tqdm(loader, desc=desc, disable=not progress or rank_world()[0] != 0, leave=False)
    for batch in bar:
        yield {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def model_device(model, device):
    return torch.device(device) if device is not None else next(model.parameters()).device


def write_result(out_dir, name, records):
    """Rank 0 writes records as JSON into out_dir/name; returns the path (or None)."""
    if out_dir is None or rank_world()[0] != 0:
        return None
    path = Path(out_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=1))
    return path


def note_skipped(skipped, what):
    if skipped:
        log.warning(f"{skipped} {what} were skipped: their images could not be read (the "
                    f"warnings above name the files); the score covers the rest")


@contextmanager
def evaluation_mode(model):
    """model.eval() and no_grad inside; the previous train/eval mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


# ----------------------------------------------------------------------------- VQA, NLVR2

def evaluate_vqa(model, *, dataset, vocab, collate, device=None, out_dir=None, batch_size=32,
                 limit=None, progress=True):
    """VQA accuracy (the official min(#humans/3, 1) averaged over 10 leave-one-out subsets)
    of the top answer; writes vqa_submit.json. Questions without answers (test) are only
    predicted. Returns {"vqa_score": percent, "questions": n, "skipped": n}."""
    dev = model_device(model, device)
    records, skipped = [], 0
    with evaluation_mode(model):
        for b in batches(dataset, my_share(len(dataset), limit), collate, batch_size, dev, "vqa",
                         progress):
            skipped += b["num_skipped"]
            if "images" not in b:
                continue
            top = model.vqa_logits(b["images"], b["text_ids"], b["text_mask"]).argmax(-1)
            records += [(q, vocab[int(a)], h) for q, a, h in
                        zip(b["question_ids"], top.tolist(), b["answers"])]
    records, skipped = gather(records), sum(gather([skipped]))
    note_skipped(skipped, "questions")
    write_result(out_dir, "vqa_submit.json", [{"question_id": q, "answer": a}
                                              for q, a, _ in records])
    scored = [vqa_score(a, h) for _, a, h in records if h]
    out = {"questions": len(records), "skipped": skipped}
    if scored:
        out["vqa_score"] = 100.0 * sum(scored) / len(scored)
    return out


def evaluate_nlvr2(model, *, dataset, collate, device=None, out_dir=None, batch_size=32,
                   limit=None, progress=True):
    """NLVR2 accuracy in percent; writes nlvr2_predictions.json [{identifier, prediction}]."""
    dev = model_device(model, device)
    records, skipped = [], 0
    with evaluation_mode(model):
        for b in batches(dataset, my_share(len(dataset), limit), collate, batch_size, dev,
                         "nlvr2", progress):
            skipped += b["num_skipped"]
            if "images" not in b:
                continue
            pred = model.nlvr2_logits(b["images"], b["images_right"], b["text_ids"],
                                      b["text_mask"]).argmax(-1)
            records += list(zip(b["identifiers"], pred.tolist(), b["labels"].tolist()))
    records, skipped = gather(records), sum(gather([skipped]))
    note_skipped(skipped, "examples")
    write_result(out_dir, "nlvr2_predictions.json",
                 [{"identifier": i, "prediction": str(bool(p))} for i, p, _ in records])
    accuracy = 100.0 * sum(p == y for _, p, y in records) / max(len(records), 1)
    return {"accuracy": accuracy, "examples": len(records), "skipped": skipped}


# ----------------------------------------------------------------------------- retrieval

def itc_features(model, images, tokenizer, max_len, batch_size, dev, limit, progress):
    """Normalised ITC features of the corpus's images (Ni, D) and texts (Nt, D), gathered."""
    corpus = images.corpus
    n_images = min(len(images), limit or len(images))
    collate = TaskCollator("images", tokenizer)
    image_rows = []
    for b in batches(images, my_share(n_images), collate, batch_size, dev, "image features",
                     progress):
        image_rows += list(zip(b["index"].tolist(), model.encode_image(b["images"]).cpu()))
    texts = [j for j, i in enumerate(corpus.text_image) if i < n_images]
    text_rows = []
    mine = texts[rank_world()[0]::rank_world()[1]]
    for start in tqdm(range(0, len(mine), batch_size), desc="text features", leave=False,
                      disable=not progress or rank_world()[0] != 0):
        chunk = mine[start:start + batch_size]
        ids, mask = tokenizer.encode([corpus.texts[j] for j in chunk], max_len)
        feats = model.encode_text(ids.to(dev), mask.to(dev)).cpu()
        text_rows += list(zip(chunk, feats))
    by_index = itemgetter(0)
    image_rows = sorted(gather(image_rows), key=by_index)
    text_rows = sorted(gather(text_rows), key=by_index)
    owners = torch.tensor([corpus.text_image[j] for j, _ in text_rows])
    return (torch.stack([f for _, f in image_rows]), torch.stack([f for _, f in text_rows]),
            [j for j, _ in text_rows], owners)


def candidate_texts(sim, k):
    """image i -> the texts to re-rank with it: its top-k texts, and every text that has i
    among its top-k images. k <= 0 or k >= the set size: all pairs."""
    Ni, Nt = sim.shape
    if k <= 0 or (k >= Nt and k >= Ni):
        return [list(range(Nt)) for _ in range(Ni)]
    wanted = [set(row) for row in sim.topk(min(k, Nt), dim=1).indices.tolist()]
    for j, top_images in enumerate(sim.topk(min(k, Ni), dim=0).indices.t().tolist()):
        for i in top_images:
            wanted[i].add(j)
    return [sorted(w) for w in wanted]


def itm_scores(model, images, text_ids, text_mask, candidates, batch_size, dev, progress):
    """ITM match logits of each (image, candidate text) pair: [(i, j, score)], gathered.
    The lower image backbone runs once per image; texts are fused in chunks."""
    rows = []
    mine = my_share(len(candidates))
    for i in tqdm(mine, desc="ITM re-ranking", leave=False,
                  disable=not progress or rank_world()[0] != 0):
        image_state = model.backbone.image_lower(images[i]["image"][None].to(dev))
        for start in range(0, len(candidates[i]), batch_size):
            js = candidates[i][start:start + batch_size]
            ids, mask = trim(text_ids[js], text_mask[js])
            text_state = model.backbone.text_lower(ids.to(dev), mask.to(dev))
            pair_images = image_state.select(torch.zeros(len(js), dtype=torch.long, device=dev))
            cls = model.fused(pair_images, text_state)["cls_feats"]
            rows += [(i, j, s) for j, s in zip(js, model.itm_score.rank_score(cls).tolist())]
    return gather(rows)


def reranked(sim, scores, k, dim):
    """ITC similarities with each row's (dim=1) or column's (dim=0) top-k entries replaced by
    their ITM score, lifted above every ITC value so that they rank first, in ITM order."""
    out = sim.clone()
    top = sim.topk(min(k, sim.shape[dim]), dim=dim).indices if k > 0 else None
    rows, cols, values = (torch.tensor(column) for column in zip(*scores))
    itm = torch.full_like(sim, float("nan"))
    itm[rows, cols] = values.to(sim.dtype) + (sim.max() - values.min() + 1.0)
    chosen = torch.ones_like(sim, dtype=torch.bool)
    if top is not None:
        chosen = torch.zeros_like(chosen).scatter_(dim, top, True)
    return torch.where(chosen & ~itm.isnan(), itm, out)


def evaluate_retrieval(model, *, images, tokenizer, max_len=50, k=128, device=None,
                       out_dir=None, batch_size=32, limit=None, progress=True):
    """Recall@1/5/10 both ways: by ITC alone ("itc_*"), and with ITM re-ranking of the top-k
    candidates ("i2t_r1", ... "t2i_r10"; only when the model has the ITM head), in percent.
    `images`: task_datasets.build_corpus_images (the corpus's images, .corpus attached)."""
    dev = model_device(model, device)
    with evaluation_mode(model):
        img, txt, text_index, owners = itc_features(model, images, tokenizer, max_len,
                                                    batch_size, dev, limit, progress)
        sim = img @ txt.t()  # (Ni, Nt)
        out = {f"itc_{key}": 100 * v for key, v in retrieval_recall(sim, owners).items()}
        if "itm" in model.config.heads:
            corpus = images.corpus
            ids, mask = tokenizer.encode([corpus.texts[j] for j in text_index], max_len)
            scores = itm_scores(model, images, ids, mask, candidate_texts(sim, k), batch_size,
                                dev, progress)
            i2t = retrieval_recall(reranked(sim, scores, k, dim=1), owners)
            t2i = retrieval_recall(reranked(sim, scores, k, dim=0), owners)
            out.update({key: 100 * v for key, v in i2t.items() if key.startswith("i2t")})
            out.update({key: 100 * v for key, v in t2i.items() if key.startswith("t2i")})
    out.update(images=len(img), texts=len(txt))
    write_result(out_dir, "retrieval.json", out)
    return out


# ----------------------------------------------------------------------------- captioning

def evaluate_caption(model, *, images, tokenizer, beam_size=5, max_len=50, device=None,
                     out_dir=None, batch_size=32, limit=None, progress=True):
    """Generate one caption per image (beam search), score CIDEr-D and BLEU-1..4 against the
    corpus's references (COCO evaluation tokenisation), in percent; writes captions.json."""
    dev = model_device(model, device)
    corpus, records = images.corpus, []
    collate = TaskCollator("images", tokenizer)
    with evaluation_mode(model):
        for b in batches(images, my_share(len(images), limit), collate, batch_size, dev,
                         "captioning", progress):
            captions = generation.generate_captions(model, b["images"], tokenizer,
                                                    beam_size=beam_size, max_len=max_len)
            records += [(corpus.image_ids[i], c) for i, c in zip(b["index"].tolist(), captions)]
    records = gather(records)
    write_result(out_dir, "captions.json", [{"image_id": i, "caption": c} for i, c in records])
    candidates = dict(records)
    references = {i: refs for i, refs in corpus.references().items() if i in candidates}
    cider, _ = cider_d(candidates, references)
    scores = bleu(candidates, references)
    out = {"cider": 100 * cider, "images": len(records)}
    out.update({f"bleu{n + 1}": 100 * s for n, s in enumerate(scores)})
    return out


# ----------------------------------------------------------------------------- loading

def load_model(checkpoint, image_size=None):
    """Our training checkpoint (a .pt with 'model' and 'config'), or anything
    Fiber.from_pretrained reads (a release name, an original .ckpt, an export)."""
    path = Path(checkpoint)
    if path.is_file() and path.suffix == ".pt":
        state = T.load_checkpoint(path)
        if isinstance(state, dict) and "model" in state and "config" in state:
            config = FiberConfig(**state["config"])
            if image_size and image_size != config.image_size:
                raise ValueError(f"{path} was trained at {config.image_size} px; evaluate it "
                                 f"at that size or export it and load with --image-size")
            model = Fiber(config)
            model.load_state_dict(state["model"])
            return model
    return Fiber.from_pretrained(checkpoint, image_size=image_size)


def load_answers(checkpoint, answers, data, model):
    """--answers, else answers.json beside the checkpoint, else the synthetic world's."""
    if answers is None and Path(checkpoint).is_file():
        beside = Path(checkpoint).parent / ANSWERS_FILE
        answers = beside if beside.is_file() else None
    if answers is not None:
        vocab = AnswerVocab.load(answers)
    elif data == "synthetic":
        vocab = vqa_vocab_for("synthetic")
    else:
        raise SystemExit(f"no {ANSWERS_FILE} beside {checkpoint}: pass --answers (the answer "
                         f"vocabulary the VQA head was trained with)")
    if len(vocab) != model.config.vqa_answers:
        raise SystemExit(f"the answer vocabulary has {len(vocab)} answers, the model's VQA "
                         f"head {model.config.vqa_answers}: wrong --answers file?")
    return vocab


# ----------------------------------------------------------------------------- command line

def run_task(args, model, tokenizer):
    size, dev = model.config.image_size, T.setup_distributed().device
    model.to(dev)
    max_len = args.max_len or model.config.max_text_len
    split = args.split if args.data == "synthetic" else None
    common = dict(device=dev, out_dir=args.out, batch_size=args.batch_size, limit=args.limit)
    if args.task == "vqa":
        vocab = load_answers(args.checkpoint, args.answers, args.data, model)
        dataset = build_vqa(args.data, split, vocab=vocab, image_size=size, train=False,
                            image_root=args.image_root, image_names=args.image_names)
        return evaluate_vqa(model, dataset=dataset, vocab=vocab, **common,
                            collate=TaskCollator("vqa", tokenizer, max_len))
    if args.task == "nlvr2":
        dataset = build_nlvr2(args.data, split, image_size=size, train=False,
                              image_root=args.image_root)
        return evaluate_nlvr2(model, dataset=dataset, **common,
                              collate=TaskCollator("nlvr2", tokenizer, max_len))
    corpus = build_corpus(args.data, split, image_root=args.image_root)
    images = build_corpus_images(corpus, args.data, image_size=size)
    if args.task == "irtr":
        return evaluate_retrieval(model, images=images, tokenizer=tokenizer, max_len=max_len,
                                  k=args.k, **common)
    return evaluate_caption(model, images=images, tokenizer=tokenizer, max_len=max_len,
                            beam_size=args.beam_size, **common)


@torch.no_grad()
def demo(args, model, tokenizer, out=print):
    """Print what each of the checkpoint's heads says about one image (and text)."""
    model.eval()
    transform = ImageTransform(size=model.config.image_size)
    image = transform(load_image(args.image))[0][None]  # (1, 3, S, S)
    ids, mask = tokenizer.encode([args.text or ""], args.max_len or model.config.max_text_len)
    heads = model.config.heads
    out(f"{args.image} | text: {args.text!r} | heads: {', '.join(heads)}")
    if args.text and "itm" in heads:
        p = model.itm_score(model(image, ids, mask)["cls_feats"]).softmax(-1)[0, 1]
        out(f"ITM: the text matches the image with probability {p:.3f}")
    if args.text and "itc" in heads:
        cos = (model.encode_image(image) * model.encode_text(ids, mask)).sum().item()
        out(f"ITC: cosine similarity {cos:.3f}")
    if args.text and "vqa" in heads:
        vocab = load_answers(args.checkpoint, args.answers, "synthetic", model)
        probs = model.vqa_logits(image, ids, mask).sigmoid()[0]
        top = probs.topk(min(5, len(vocab)))
        out("VQA: " + ", ".join(f"{vocab[int(i)]} ({p:.2f})" for p, i in zip(*top)))
    if args.text and "nlvr2" in heads and args.image2:
        second = transform(load_image(args.image2))[0][None]
        p = model.nlvr2_logits(image, second, ids, mask).softmax(-1)[0, 1]
        out(f"NLVR2: the statement is true of ({args.image}, {args.image2}) with "
            f"probability {p:.3f}")
    if "caption" in heads:
        caption = generation.generate_captions(model, image, tokenizer,
                                               beam_size=args.beam_size,
                                               max_len=args.max_len or model.config.max_text_len)
        out(f"caption: {caption[0]}")


def build_parser():
    p = argparse.ArgumentParser(description="Evaluate coarse FIBER on VQA v2, NLVR2, image-"
                                "text retrieval or captioning, or run the demo on one image. "
                                "The fine-grained (box) commands ground, coco, refexp, flickr "
                                "and synthetic-fine run eval_fine.py: `python eval.py ground "
                                "--help`.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = p.add_argument
    add("task", choices=["vqa", "nlvr2", "irtr", "caption", "demo"], help="what to run")
    add("--checkpoint", required=True, help="our .pt, a release name or an original .ckpt")
    add("--data", default="synthetic", help="'synthetic', or vqa: Q.json+A.json (Q.json+ for "
        "a test split); nlvr2: a JSONL file; irtr/caption: karpathy.json:split or COCO json")
    add("--split", default="val", help="synthetic data: the scene split to evaluate on")
    add("--image-root", help="folder the image paths of --data are relative to")
    add("--image-names", help="vqa: COCO-style JSON giving each image_id its file_name")
    add("--answers", help=f"vqa: the answer vocabulary (default: {ANSWERS_FILE} beside it)")
    add("--image-size", type=int, help="evaluate at this resolution (release checkpoints)")
    add("--max-len", type=int, help="text length in tokens (default: the model's)")
    add("--batch-size", type=int, default=32, help="items per forward pass")
    add("--limit", type=int, help="evaluate only the first N items (a quick look)")
    add("--k", type=int, default=128, help="irtr: candidates re-ranked by ITM (0: all pairs)")
    add("--beam-size", type=int, default=5, help="caption: beam width (1: greedy)")
    add("--out", default="results", help="folder for the result files")
    add("--image", help="demo: the image file")
    add("--image2", help="demo: a second image (NLVR2 checkpoints)")
    add("--text", help="demo: a question, a caption or a statement")
    return p


FINE_COMMANDS = ("ground", "coco", "refexp", "flickr", "synthetic-fine")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in FINE_COMMANDS:
        # the fine-grained evaluations (boxes) live in eval_fine.py; one entry point for both
        import eval_fine
        command = "synthetic" if argv[0] == "synthetic-fine" else argv[0]
        return eval_fine.main([command] + argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model = load_model(args.checkpoint, args.image_size)
    tokenizer = load_tokenizer()
    if args.task == "demo":
        if not args.image:
            raise SystemExit("demo needs --image (and --text for ITM/VQA/NLVR2)")
        demo(args, model, tokenizer)
        return 0
    try:
        metrics = run_task(args, model, tokenizer)
        is_main = rank_world()[0] == 0
    finally:
        T.cleanup_distributed()
    if is_main:
        print(f"{args.task} on {args.data}: " + " | ".join(
            f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))
        print(f"results written to {Path(args.out).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
