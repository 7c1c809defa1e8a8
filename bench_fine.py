"""CPU cost of the base detector at the released test size (800 x 1333): one inference and one
training step, each in a fresh process so that peak memory is its own.

    python bench_fine.py                        # both, with random weights (cost only)
    python bench_fine.py --mode infer --threads 2

Not a test: it prints wall time, CPU time (all threads) and the process's peak resident memory.
The training step uses gradient checkpointing, as the released configs do
(USE_CHECKPOINT True); without it the activations of one 800 x 1333 image do not fit in a
machine of 24 GB.
"""
import argparse
import resource
import subprocess
import sys
import time

import torch

from data import load_tokenizer
from prompts import build_prompt, encode_with_spans
from detector import FiberDetector, FiberDetectorConfig

COCO_NAMES = ("person bicycle car motorcycle airplane bus train truck boat traffic_light "
              "fire_hydrant stop_sign parking_meter bench bird cat dog horse sheep cow elephant "
              "bear zebra giraffe backpack umbrella handbag tie suitcase frisbee skis snowboard "
              "sports_ball kite baseball_bat baseball_glove skateboard surfboard tennis_racket "
              "bottle wine_glass cup fork knife spoon bowl banana apple sandwich orange broccoli "
              "carrot hot_dog pizza donut cake chair couch potted_plant bed dining_table toilet tv "
              "laptop mouse remote keyboard cell_phone microwave oven toaster sink refrigerator "
              "book clock vase scissors teddy_bear hair_drier toothbrush").split()


def inputs(config, height=800, width=1333):
    """A normalised image padded to /32, the 80-class COCO prompt, a few boxes."""
    tok = load_tokenizer()
    names = [n.replace("_", " ") for n in COCO_NAMES]
    prompt, spans = build_prompt(names)
    ids, mask, tokens = encode_with_spans(tok, prompt, {i + 1: [s] for i, s in enumerate(spans)},
                                          config.max_query_len)
    H, W = -(-height // 32) * 32, -(-width // 32) * 32
    images = torch.zeros(1, 3, H, W)
    images[:, :, :height, :width] = torch.randn(1, 3, height, width)
    boxes = torch.tensor([[100.0, 120, 400, 500], [700, 200, 1100, 700], [50, 600, 300, 780]])
    pm = torch.zeros(3, config.max_query_len)
    for row, label in enumerate((1, 18, 63)):
        pm[row, tokens[label]] = 1
    return images, [(height, width)], ids[None], mask[None], tokens, [{"boxes": boxes,
                                                                       "positive_map": pm}]


def measure(mode):
    config = FiberDetectorConfig.base("v2")
    if mode == "train":
        config.swin.grad_checkpointing = config.text.grad_checkpointing = True
        config.head.checkpoint_tower = True
    torch.manual_seed(0)
    model = FiberDetector(config)
    images, sizes, ids, mask, tokens, targets = inputs(config)
    wall, cpu = time.perf_counter(), time.process_time()
    if mode == "infer":
        model.eval()
        dets = model.predict(images, sizes, ids, mask, tokens)
        detail = f"{len(dets[0]['scores'])} boxes"
    else:
        model.train()
        groups = model.parameter_groups(1e-5, weight_decay=1e-4)
        for g in groups:
            g.pop("names")
        optimizer = torch.optim.AdamW(groups, lr=1e-5)
        losses = model.loss(images, sizes, ids, mask, targets)
        losses["loss"].backward()
        optimizer.step()
        detail = f"loss {losses['loss'].item():.3f}"
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    print(f"{mode:5s} | 800x1333 | {torch.get_num_threads()} threads | wall {wall:7.1f} s | "
          f"CPU {cpu:7.1f} s | peak RSS {peak:5.1f} GiB | {detail}", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description="CPU time and peak memory of the base detector.")
    p.add_argument("--mode", choices=("both", "infer", "train"), default="both",
                   help="what to measure; 'both' runs each in its own process")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="torch CPU threads")
    args = p.parse_args(argv)
    torch.set_flush_denormal(True)
    if args.mode != "both":
        torch.set_num_threads(args.threads)
        measure(args.mode)
        return 0
    for mode in ("infer", "train"):
        subprocess.run([sys.executable, __file__, "--mode", mode, "--threads",
                        str(args.threads)], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
