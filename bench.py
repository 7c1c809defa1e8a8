"""Benchmark: time and memory of a FIBER-B pre-training step and of a fused forward.

    python bench.py                        # pre-training step, batch 2 at 384 px, fp32
    python bench.py --mode forward --image-size 576 --amp bf16
    python bench.py --mode step --fixtures ../shared/fixtures   # also check the losses

Shapes are the original's: ITC + ITM with hard negatives (3B fused pairs) + MLM, text length
40. It prints the matmul rate of this machine measured in the same run, the time per step,
samples/s, the achieved GFLOP/s of the model, peak memory (process RSS on CPU,
max_memory_allocated on GPU) and the losses. With --fixtures pointing at the golden fixtures
of the original code, the weights are the fixture recipe and the inputs the golden ones, so
the printed ITC and MLM losses can be compared with the original's.
"""
import argparse
import contextlib
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from heads import PretrainObjective, naive_pretrain_losses
from model import Fiber, FiberConfig
from training import adamw, compact_cpu_heap


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("step", "forward"), default="step",
                   help="a full pre-training step (forward + backward + AdamW) or one fused "
                        "forward in eval mode (default: step)")
    p.add_argument("--image-size", type=int, default=384, help="square input size (384)")
    p.add_argument("--batch-size", type=int, default=2, help="image-caption pairs (2)")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none",
                   help="autocast dtype (none = fp32)")
    p.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute each block in the backward pass (less memory)")
    p.add_argument("--steps", type=int, default=3,
                   help="timed repetitions after a warm-up; the median is reported (3)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--fixtures", type=Path, default=None,
                   help="folder of the original's golden fixtures: use its weights and inputs")
    p.add_argument("--compact-heap", action="store_true",
                   help="CPU, glibc: give freed buffers of 4 MiB or more back to the OS at once "
                        "(lower peak memory, slower; see training.compact_cpu_heap)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model first")
    p.add_argument("--naive", action="store_true",
                   help="step: compute the losses the original's way (full forward of both "
                        "backbones for ITC, MLM and each ITM pair), the baseline of the "
                        "shared-lower-backbone lever")
    return p.parse_args(argv)


def matmul_rate(device, dtype, n=2048, repeats=5):
    """GFLOP/s of a plain n x n matmul: the ceiling the model's rate is compared against."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def peak_memory_gb(device):
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def inputs(args, config):
    """Golden inputs of the original when fixtures are given, else random ones."""
    B, S, L = args.batch_size, args.image_size, config.max_text_len
    if args.fixtures:
        golden = torch.load(args.fixtures / "golden_pretrain384.pt", weights_only=True)["inputs"]
        images = golden["image"]
        if S != images.shape[-1]:
            images = torch.nn.functional.interpolate(images, size=(S, S), mode="bicubic")
        return dict(images=images[:B], text_ids=golden["text_ids"][:B],
                    text_mask=golden["text_masks"][:B], mlm_ids=golden["text_ids_mlm"][:B],
                    mlm_labels=golden["text_labels_mlm"][:B], index=torch.arange(B))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 50000, (B, L), generator=g)
    ids[:, 0], ids[:, -1] = 0, 2
    labels = torch.full((B, L), -100)
    labels[:, 3:9:2] = ids[:, 3:9:2]
    mlm_ids = ids.clone()
    mlm_ids[:, 3:9:2] = 50264
    return dict(images=torch.randn(B, 3, S, S, generator=g), text_ids=ids,
                text_mask=torch.ones(B, L, dtype=torch.long), mlm_ids=mlm_ids,
                mlm_labels=labels, index=torch.arange(B))


def build(args):
    config = FiberConfig.base(args.image_size)
    config.swin.grad_checkpointing = config.text.grad_checkpointing = args.grad_checkpointing
    model = Fiber(config)
    if args.fixtures:
        sys.path.insert(0, str(args.fixtures))
        from make_weights import recipe_state_dict
        model.load_original_state_dict(
            recipe_state_dict(str(args.fixtures / "keys_pretrain384.json")), "fixture recipe")
    return model.to(args.device)


def autocast(args):
    if args.amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if args.amp == "bf16" else torch.float16
    return torch.autocast(device_type=torch.device(args.device).type, dtype=dtype)


def run_step(objective, optimizer, batch, args):
    def load_images(indices):  # queue entries are this same batch, re-read by index
        return batch["images"][torch.as_tensor(indices, device=batch["images"].device)]

    with autocast(args):
        out = objective(batch, load_images, generator=torch.Generator().manual_seed(0))
    out["loss"].backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return out


def run_naive_step(model, optimizer, batch, args):
    """The same losses, computed as the original does; negatives drawn from ITC as it does."""
    with autocast(args):
        with torch.no_grad():
            image_feat = model.encode_image(batch["images"])
            text_feat = model.encode_text(batch["text_ids"], batch["text_mask"])
            sim = image_feat @ text_feat.t() / model.temp
            g = torch.Generator().manual_seed(0)
            w_i2t = torch.softmax(sim.float(), 1).fill_diagonal_(0) + 1e-9
            w_t2i = torch.softmax(sim.t().float(), 1).fill_diagonal_(0) + 1e-9
            neg_img = torch.multinomial(w_t2i, 1, generator=g)[:, 0]
            neg_txt = torch.multinomial(w_i2t, 1, generator=g)[:, 0]
        loss, (itc, itm, mlm) = naive_pretrain_losses(model, batch, neg_img, neg_txt)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return dict(loss=loss.detach(), itc_loss=itc.detach(), itm_loss=itm.detach(),
                mlm_loss=mlm.detach())


def main(argv=None):
    args = parse_args(argv)
    if args.compact_heap and not compact_cpu_heap():
        print("--compact-heap: no glibc mallopt() here; running without")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    mm_dtype = {"none": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    print(f"device {device}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"matmul 2048^3: {matmul_rate(device, torch.float32):.0f} GFLOP/s fp32"
          + (f", {matmul_rate(device, mm_dtype):.0f} GFLOP/s {args.amp}"
             if args.amp != "none" else ""))

    model = build(args)
    batch = {k: v.to(device) for k, v in inputs(args, model.config).items()}
    B = args.batch_size
    if args.compile:
        model = torch.compile(model)

    if args.mode == "forward":
        model.eval()

        def work():
            with torch.no_grad(), autocast(args):
                return model(batch["images"], batch["text_ids"], batch["text_mask"])
        samples = B
    else:
        objective = PretrainObjective(model).to(device).train()
        if args.fixtures:  # the goldens are eval-mode numbers: no dropout, no drop path
            model.eval()
        optimizer = adamw(model.parameter_groups(lr=1e-5), betas=(0.9, 0.98))

        def work():
            if args.naive:
                return run_naive_step(model, optimizer, batch, args)
            return run_step(objective, optimizer, batch, args)
        samples = B

    first = work()  # warm-up; its losses are the ones reported (the goldens are first-step)
    times = []
    for _ in range(args.steps):
        sync(device)
        start = time.perf_counter()
        work()
        sync(device)
        times.append(time.perf_counter() - start)
    # the median: a shared machine's stalls hit single repetitions, not the typical one
    seconds = statistics.median(times)
    peak_gb = peak_memory_gb(device)

    # FLOPs of one more repetition, counted after the memory reading: the counter's hooks keep
    # tensors alive longer and would inflate the peak
    with FlopCounterMode(display=False) as counter:
        work()
    flops = counter.get_total_flops()

    print(f"{args.mode} batch {B} at {args.image_size} px, amp {args.amp}"
          f"{', grad checkpointing' if args.grad_checkpointing else ''}"
          f"{', naive (original) loss path' if args.naive and args.mode == 'step' else ''}: "
          f"{seconds:.2f} s, {samples / seconds:.2f} samples/s, "
          f"{flops / seconds / 1e9:.0f} GFLOP/s achieved ({flops / 1e9:.0f} GFLOP), "
          f"peak memory {peak_gb:.2f} GB")
    print(f"{args.steps} repetitions: {', '.join(f'{t:.2f}' for t in times)} s (median above)")
    if args.mode == "step":
        print("first-step losses: " + ", ".join(f"{k} {float(first[k]):.4f}"
                                     for k in ("itc_loss", "itm_loss", "mlm_loss")))
        if args.fixtures:
            golden = torch.load(args.fixtures / "golden_pretrain384.pt", weights_only=True)
            o = golden["outputs"]
            print(f"original: itc_loss {float(o['itc_loss_inbatch_only']):.4f} (in-batch), "
                  f"mlm_loss {float(o['mlm_loss']):.4f}; ITM uses random hard negatives")


if __name__ == "__main__":
    main()
