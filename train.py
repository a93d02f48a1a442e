"""Train the Co-Settle projection on video with a frozen image ViT.

    python train.py --weights dino_vitb16.pth --videos kinetics/            # the official recipe
    torchrun --nproc_per_node=4 train.py --weights ... --videos ...          # 4 GPUs x 128 = the paper's 512
    python train.py                                                          # embedded demo (synthetic, random ViT)
    python train.py --bench [--weights W.pth] [--batch-size 8]              # training clips/s and TFLOP/s
    python train.py --bench-data [--videos DIR] [--workers N]               # loader clips/s

Defaults: yafeng19/Co-Settle scripts/train.sh's flags (--epochs 5 --warmup_epochs 1 --batch_size 128 a process
--blr 1e-4 --weight_decay 0.05; lr = blr * global batch / 256); main_pretrain.py fixes AdamW (0.9, 0.95), schedule.
"""
import argparse
import contextlib
import json
import math
import os
import signal
import sys
import tempfile
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from cosettle import (CLIP_GAP, FAMILIES, IMAGENET_STATS, LAMBDA_REG, PEA_RATIO, SIZE, TEMP, BadInput, CoSettle,
                      at_least, build_vit, fingerprint, fuse, is_official, load_encoder, objective, positive,
                      read_checkpoint, refuse_unused, timeit)
from data import (FramePairs, atomic, check_out_dir, collate_crops, find_videos, make_davis, model_input,
                  write_synthetic_videos)
from eval_davis import compare

LOG_EVERY = 10           # steps between progress lines / log.jsonl records
SAVE_EVERY_S = 15 * 60   # besides each epoch end and SIGTERM/SIGINT: a checkpoint at least this often
# Before the user's flags. --blr 0.1, 1000x the official 1e-4: the demo's 80 steps at 1e-4 would barely move the
# projection from its initialisation. --overwrite: a second `python train.py` replaces the first demo.
DEMO_ARGS = ["--epochs", "10", "--batch-size", "8", "--blr", "0.1", "--out", "out/demo", "--overwrite"]
OFFICIAL_BLR, SHORT_RUN = 1e-4, 1000  # fewer steps than this at the official rate barely move the projection
# Dense peak TFLOP/s (bf16, fp32), NVIDIA's datasheets, for --bench; the first key in the device's name wins
PEAK_TFLOPS = {"H100 PCIe": (756, 51), "H200": (989, 67), "H100": (989, 67), "A100": (312, 19.5)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", help="image-pretrained ViT checkpoint (.pth); omit for a random ViT-S/16 demo")
    p.add_argument("--videos", help="folder of frame folders (searched recursively) or a .txt list of them")
    p.add_argument("--family", choices=FAMILIES, help="force the checkpoint family instead of detecting it")
    p.add_argument("--native-stats", action="store_true",
                   help="normalise with the family's own mean/std (CLIP, BLIP) instead of ImageNet's (official)")
    p.add_argument("--out", default="out", help="checkpoint cosettle.pth and log.jsonl go here")
    p.add_argument("--epochs", type=positive(), default=5)
    p.add_argument("--batch-size", type=positive(), default=128, help="clips per process")
    p.add_argument("--blr", type=positive(float), default=OFFICIAL_BLR, help="lr = blr * global batch / 256")
    p.add_argument("--warmup-epochs", type=at_least(0, float), default=1)
    p.add_argument("--temp", type=positive(float), default=TEMP, help="softmax temperature tau of the cycle loss")
    p.add_argument("--lambda-reg", type=at_least(0, float), default=LAMBDA_REG, help="separability regulariser weight")
    p.add_argument("--pea-ratio", type=at_least(0, float), default=PEA_RATIO, help="PEA upsampling ratio alpha")
    p.add_argument("--clip-gap", type=float, default=CLIP_GAP, help="frame gap as a fraction of the clip length")
    p.add_argument("--workers", type=at_least(0), default=min(8, os.cpu_count() or 1), help="loader workers a process")
    p.add_argument("--seed", type=at_least(0, int, below=2 ** 32), default=0)  # numpy and torch seeds are 32/64-bit
    p.add_argument("--resume", action="store_true", help="continue from OUT/cosettle.pth")
    p.add_argument("--overwrite", action="store_true", help="replace the checkpoint and log of a run already in OUT")
    p.add_argument("--no-compile", action="store_true", help="no torch.compile: eager loss and (on CUDA) encoder")
    p.add_argument("--bench", action="store_true", help="measure training clips/s and exit")
    p.add_argument("--bench-data", action="store_true", help="measure the loader's clips/s and exit")
    args = p.parse_args(argv)
    if args.bench_data:
        refuse_unused(p, args, "--bench-data", {"bench_data", "videos", "workers"})
    if args.bench:
        refuse_unused(p, args, "--bench", {"bench", "weights", "family", "batch_size", "no_compile", "temp",
                                           "lambda_reg", "pea_ratio"})
    if not 0 < args.clip_gap < 1:
        p.error(f"--clip-gap {args.clip_gap}: must be between 0 and 1")
    return args


def lr_at(step, total_steps, warmup_steps, lr):
    """Per-iteration linear warm-up from 0, then half-cosine to 0 (the official schedule)."""
    if step < warmup_steps:
        return lr * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return lr * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(projection, lr):
    """AdamW (0.9, 0.95); weight decay 0.05 on the linear weight only, 0 on its bias and the LayerNorm."""
    decay = [p for n, p in projection.named_parameters() if n == "linear.weight"]
    rest = [p for n, p in projection.named_parameters() if n != "linear.weight"]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95))


def autocast_dtype(device):
    """bf16 on CUDA, and on CPUs with AMX tiles, where oneDNN's bf16 matmuls beat fp32. Measured on a 2-core
    AVX512-BF16 CPU without AMX, bf16 autocast made the ViT 1.5x *slower*, so there it stays fp32."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if not os.path.exists("/proc/cpuinfo"):
        return None
    with open("/proc/cpuinfo") as f:
        return torch.bfloat16 if "amx_bf16" in f.read() else None


def build_model(encoder, args, device):
    """CoSettle on the device, in train mode -> (model, how it runs): unless --no-compile, the loss fused for this
    batch shape and, on CUDA, where the frozen forward is most of the step, the encoder compiled for it too."""
    loss_fn = objective
    if not args.no_compile:
        try:
            shape = (args.batch_size, 3 * (SIZE // encoder.patch_size) ** 2, encoder.embed_dim)
            loss_fn = fuse(objective, shape, device, args.temp, args.lambda_reg)
        except Exception as e:  # no C++ compiler, unsupported platform, ...: say it, run both eager
            print(f"warning: torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:100]}); "
                  f"using the eager loss (pass --no-compile to skip the attempt)", file=sys.stderr)
    torch.manual_seed(args.seed)  # the projection's initial weights
    model = CoSettle(encoder, args.temp, args.lambda_reg, args.pea_ratio, loss_fn).to(device).train()
    compiled_encoder = device.type == "cuda" and loss_fn is not objective
    if compiled_encoder:
        model.encoder.compile(dynamic=False)
    return model, (f"{'fused' if loss_fn is not objective else 'eager'} loss, "
                   f"{'compiled' if compiled_encoder else 'eager'} encoder")


def setup_distributed():
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; without them this is one process. NCCL on GPUs, gloo on CPU."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def encoder_from_args(args, rank):
    """The frozen encoder and its record in a checkpoint (path, size, weights' fingerprint: --resume checks it)."""
    if args.weights:
        encoder = load_encoder(args.weights, args.family, verbose=rank == 0)
        path, size = os.path.abspath(args.weights), os.path.getsize(args.weights)
        if encoder.official and rank == 0:
            print(f"{args.weights}: training a new projection on the frozen {encoder.family} encoder of this official "
                  f"'+ Ours' checkpoint; its adapter is not used")
    else:
        encoder, path, size = build_vit("vit_small", 16, seed=args.seed), f"random vit_small/16 seed {args.seed}", 0
    return encoder, dict(path=path, size=size, fingerprint=fingerprint(encoder))


@contextlib.contextmanager
def stop_signals():
    """SIGTERM (preemption) or Ctrl-C while training: finish the step, save, return; old handlers restored after."""
    stop, old = [], {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    for sig in old:
        signal.signal(sig, lambda signum, frame: stop.append(signum))
    try:
        yield stop
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def vit_flops(encoder, size):
    """Forward FLOPs of a size x size image: 2 x matmul params x tokens + attention's 2 NxNxD products a block."""
    a = encoder.arch
    tokens = (size // a["patch_size"]) ** 2 + int(a["cls_token"]) + a["registers"]
    D = a["embed_dim"]
    return a["depth"] * (2 * tokens * (4 * D * D + 2 * D * a["mlp_dim"]) + 4 * tokens ** 2 * D)


@torch.no_grad()
def cycle_accuracy(model, videos, device, dtype, seed, batch_size=8):
    """Mean cycle accuracy (Eq. 2's) of the current projection on fixed pairs of `videos`: same frames, crops and
    PEA offsets every call, so 'before' and 'after' are measured on identical inputs."""
    data = FramePairs(videos, SIZE, CLIP_GAP, seed=seed + 1)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, collate_fn=collate_crops)
    g = torch.Generator().manual_seed(seed + 1)
    accs = []
    for x1, x2 in loader:
        x1, x2 = model_input(x1, device), model_input(x2, device)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            accs.append(model(x1, x2, generator=g)["accuracy"].item())
    return sum(accs) / len(accs)


def train(args):
    rank, world, device = setup_distributed()
    videos = preflight(args, rank, world)  # the data and --out are checked before the model is loaded
    encoder, encoder_info = encoder_from_args(args, rank)
    model, how = build_model(encoder, args, device)
    projection = model.projection
    if world > 1:  # only the 0.59M trainable parameters are synchronised; the encoder never sees DDP
        projection = DistributedDataParallel(projection, device_ids=[device.index] if device.type == "cuda" else None)
    dtype = autocast_dtype(device)

    data = FramePairs(videos, size=SIZE, clip_gap=args.clip_gap, seed=args.seed)
    # ImageNet's mean/std for every family, as the official training and metric code use, unless --native-stats
    norm = encoder.native_stats if args.native_stats else IMAGENET_STATS
    mean, std = [torch.tensor(s, device=device) for s in norm]
    global_batch = args.batch_size * world
    steps_per_epoch = len(data) // global_batch
    if steps_per_epoch == 0:
        raise BadInput(f"{args.videos}: {len(data)} videos cannot fill one global batch of {global_batch}")
    total_steps = args.epochs * steps_per_epoch
    warmup_steps = int(args.warmup_epochs * steps_per_epoch)
    base_lr = args.blr * global_batch / 256
    optimizer = make_optimizer(model.projection, base_lr)
    flops_per_clip = 3 * vit_flops(encoder, data.size)

    ckpt_path = os.path.join(args.out, "cosettle.pth")
    step = resume(ckpt_path, args, world, len(videos), encoder_info, model.projection, optimizer) if args.resume else 0

    def diverged(what):
        kept = "keeps the last good state" if os.path.exists(ckpt_path) else "was not written (none was saved yet)"
        return FloatingPointError(f"{what}; stopped, {ckpt_path} {kept}")

    def checkpoint():
        if not all(p.isfinite().all() for p in model.projection.parameters()):
            raise diverged(f"the projection's weights are not finite after step {step}")
        if rank == 0:
            state = dict(projection=model.projection.state_dict(), optimizer=optimizer.state_dict(), step=step,
                         epoch=step // steps_per_epoch, args=vars(args), world=world, videos=len(videos),
                         encoder=encoder_info)
            atomic(ckpt_path, lambda tmp: torch.save(state, tmp))

    if rank == 0:
        print(f"{len(videos)} videos, {world} process(es) x {args.batch_size} clips, {steps_per_epoch} steps/epoch, "
              f"lr {base_lr:.2e}, {device}{', bf16 autocast' if dtype else ''}, {how}, starting at step {step}")
        if total_steps < SHORT_RUN and args.blr <= OFFICIAL_BLR:
            print(f"hint: {total_steps} steps at --blr {args.blr:g} leave the projection near its initialisation "
                  f"(the official rate is for ~2,300 steps of 512 Kinetics clips); on a small set try --blr 0.1")
    with stop_signals() as stop, contextlib.ExitStack() as files:
        log = None  # opened after the first step: a run that fails before it leaves no empty log.jsonl behind
        t_start, step_start, last_save, signum = time.time(), step, time.time(), 0
        while step < total_steps and not signum:
            epoch, skip = divmod(step, steps_per_epoch)
            for x1, x2 in epoch_loader(data, epoch, skip, steps_per_epoch, args, rank, world, device):
                lr = lr_at(step, total_steps, warmup_steps, base_lr)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                # one PEA offset per step, the same on every rank, from a generator seeded by (seed, step): the seed
                # scaled by a prime larger than any run's step count, so no two (seed, step) pairs share a seed
                g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
                x1, x2 = model_input(x1, device, mean, std), model_input(x2, device, mean, std)
                with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                    out = model(x1, x2, g, projection)
                # Stop (NaN, or a signal seen by any rank) is decided here, from the value all ranks share, so
                # every rank stops after the same step and none is left waiting in a collective.
                flags = torch.stack([~out["loss"].detach().isfinite(),
                                     torch.tensor(stop[0] if stop else 0, device=device)]).float()
                if world > 1:
                    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
                signum = int(flags[1])
                if flags[0]:
                    loss = out["loss"].item()
                    what = f"loss is {loss}" if not math.isfinite(loss) else "the loss is not finite on another rank"
                    raise diverged(f"{what} at step {step + 1}")
                optimizer.zero_grad(set_to_none=True)
                out["loss"].backward()
                optimizer.step()
                step += 1
                if rank == 0 and log is None:
                    os.makedirs(args.out, exist_ok=True)
                    log = files.enter_context(open(os.path.join(args.out, "log.jsonl"), "a" if args.resume else "w"))
                if step % LOG_EVERY == 0 or step == total_steps:
                    stats = mean_over_ranks(out, world)  # every rank takes part; rank 0 writes
                    if rank == 0:
                        rate = (step - step_start) * global_batch / (time.time() - t_start)
                        report(log, stats, step, total_steps, epoch, lr, rate, global_batch, flops_per_clip)
                if signum or step % steps_per_epoch == 0 or time.time() - last_save > SAVE_EVERY_S:
                    checkpoint()
                    last_save = time.time()
                if signum:
                    break
    if rank == 0:
        print(("interrupted: " if signum else "done: ") + f"step {step}/{total_steps}, checkpoint {ckpt_path}")
    if world > 1:
        dist.barrier()  # rank 0 may still be saving; tearing gloo down under it aborts the other ranks
        dist.destroy_process_group()
    if signum:  # 128 + signal number (130, 143), as shells expect: `train.py && eval_davis.py` stops here
        sys.exit(128 + signum)
    return model, step


def preflight(args, rank, world):
    """--out usable and free (unless --resume/--overwrite), and the video list: checked on rank 0 only and the result
    (or error) sent to the others: find_videos walks the tree once, not once a process (Kinetics: ~240k folders)."""
    box = [None]  # the video list or the error, rank 0's sent to every rank
    if rank == 0:
        try:
            check_out_dir(args.out)
            ckpt_path = os.path.join(args.out, "cosettle.pth")
            if os.path.exists(ckpt_path) and not (args.resume or args.overwrite):
                raise BadInput(f"{ckpt_path}: a run is already saved there; pass --resume to continue it, another "
                               f"--out, or --overwrite to replace it")
            box[0] = find_videos(args.videos)
        except Exception as e:  # BadInput, or an OSError from the file system: every rank raises it
            box[0] = e
    if world > 1:
        dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], Exception):
        raise box[0]
    return box[0]


def resume(ckpt_path, args, world, n_videos, encoder_info, projection, optimizer):
    """Load OUT/cosettle.pth into the projection and optimiser -> its step. Refuses another encoder, global batch, seed
    or number of videos (the step would mean another epoch, order or model); the schedule's flags may change."""
    if not os.path.exists(ckpt_path):
        raise BadInput(f"{ckpt_path}: --resume given but there is no checkpoint")
    ckpt = read_checkpoint(ckpt_path)
    if is_official(ckpt):
        raise BadInput(f"{ckpt_path}: an official Co-Settle '+ Ours' checkpoint (yafeng19/Co-Settle main_pretrain.py), "
                       f"not train.py's: it holds no optimiser state of ours to resume (evaluate it with eval_davis.py "
                       f"--weights, or pass it as --weights to train a new projection on its frozen encoder)")
    if not isinstance(ckpt, dict) or "projection" not in ckpt:
        raise BadInput(f"{ckpt_path}: not a train.py checkpoint (no 'projection' entry), nothing to resume")
    if ckpt["encoder"]["fingerprint"] != encoder_info["fingerprint"]:
        raise BadInput(f"{ckpt_path}: trained on encoder {ckpt['encoder']['path']}, not {encoder_info['path']}")
    was = ckpt["args"]["batch_size"] * ckpt["world"], ckpt["args"]["seed"], ckpt["videos"]
    if was != (args.batch_size * world, args.seed, n_videos):
        raise BadInput(f"{ckpt_path}: was trained with global batch {was[0]}, seed {was[1]} on {was[2]} videos; "
                       f"resume with the same (now {args.batch_size * world}, {args.seed}, {n_videos})")
    projection.load_state_dict(ckpt["projection"])
    optimizer.load_state_dict(ckpt["optimizer"])
    return ckpt["step"]


def mean_over_ranks(out, world):
    """The step's numbers as floats, averaged over the ranks: the whole global batch's value for the means over
    each rank's equal share (a 2-process log equals the 1-process one); sim_identity, a ratio, is the ranks' average."""
    values = torch.stack([v.detach().float() for v in out.values()])
    if world > 1:
        dist.all_reduce(values)
        values /= world
    return dict(zip(out, values.tolist()))


def report(log, stats, step, total_steps, epoch, lr, rate, global_batch, flops_per_clip):
    """One JSON record in log.jsonl and one progress line (with the frozen encoder's achieved TFLOP/s, all ranks)."""
    rec = dict(step=step, epoch=epoch, lr=lr, clips_per_s=round(rate, 2),
               tflops=round(rate * flops_per_clip / 1e12, 3), **{k: round(v, 5) for k, v in stats.items()})
    print(json.dumps(rec), file=log, flush=True)
    eta = (total_steps - step) * global_batch / rate
    print(f"step {step}/{total_steps} ep {epoch} | loss {rec['loss']:.4f} (cyc {rec['cycle']:.4f} "
          f"reg {rec['reg']:.4f}) | cycle acc {rec['accuracy']:.3f} | lr {lr:.2e} | {rate:.1f} clips/s "
          f"{rec['tflops']:.2f} TFLOP/s | eta {eta / 60:.1f} min", flush=True)


def epoch_loader(data, epoch, skip, steps_per_epoch, args, rank, world, device):
    """This rank's batches of `epoch`, from batch `skip` on (a resumed run re-enters mid-epoch). The order is
    DistributedSampler's (seeded by seed and epoch), so 2 ranks x b clips see what 1 rank x 2b clips sees."""
    data.set_epoch(epoch)
    sampler = torch.utils.data.DistributedSampler(data, world, rank, shuffle=True, seed=args.seed, drop_last=True)
    sampler.set_epoch(epoch)
    order = list(sampler)[skip * args.batch_size: steps_per_epoch * args.batch_size]
    return torch.utils.data.DataLoader(data, batch_size=args.batch_size, sampler=order, drop_last=True,
                                       collate_fn=collate_crops, num_workers=args.workers,
                                       pin_memory=device.type == "cuda")


def demo(args):
    """No --weights and no --videos: synthetic videos, a seeded random ViT-S/16, a short run, before vs after."""
    print(f"No --weights and no --videos: embedded demo (--blr {args.blr:g}, not the official 1e-4: its few steps "
          f"would barely move the projection) on synthetic videos under {args.out} and a RANDOM ViT-S/16 (seed "
          f"{args.seed}, not pretrained): cycle accuracy and J&F before and after show the mechanics only.")
    check_out_dir(args.out)
    args.videos = os.path.join(args.out, "synthetic_videos")
    write_synthetic_videos(args.videos, n_videos=64, n_frames=16, seed=args.seed)
    videos = find_videos(args.videos)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = autocast_dtype(device)
    torch.manual_seed(args.seed)  # the projection train() will start from
    model = CoSettle(build_vit("vit_small", 16, seed=args.seed), args.temp, args.lambda_reg, args.pea_ratio).to(device)
    before = cycle_accuracy(model.eval(), videos, device, dtype, args.seed)
    trained, _ = train(args)
    # `after` on `model` too, its encoder the same seeded ViT: eager, as `before` was (train() compiles its loss,
    # and on CUDA its encoder, for the training shapes; compare's frame sizes would each compile again)
    model.projection.load_state_dict(trained.projection.state_dict())
    after = cycle_accuracy(model.eval(), videos, device, dtype, args.seed)
    davis = make_davis(os.path.join(args.out, "synthetic_davis"), n_seqs=3, n_frames=12, seed=args.seed)
    jf = compare(model.encoder, model.projection, davis, os.path.join(args.out, "davis_results"), "paper",
                 size=(192, 256), verbose=False)  # the paper protocol, at the synthetic frames' scale
    print(f"cycle accuracy on fixed synthetic pairs: before {before:.3f} -> after {after:.3f}")
    print(f"J&F on 3 synthetic DAVIS sequences ({davis}): frozen {jf['baseline']['davis']['J&F-Mean']:.3f} -> "
          f"+ Co-Settle {jf['cosettle']['davis']['J&F-Mean']:.3f}")


def bench(args):
    """Training clips/s of our step on random clips, and the frozen encoder's TFLOP/s against the device's datasheet
    peak where PEAK_TFLOPS knows it. (`python test_cosettle.py --bench-step` times the official step against it.)"""
    rank, world, device = setup_distributed()
    encoder, _ = encoder_from_args(args, rank)
    B = args.batch_size
    x1, x2 = torch.randn(B, 3, SIZE, SIZE, device=device), torch.randn(B, 3, SIZE, SIZE, device=device)
    dtype = autocast_dtype(device)
    model, how = build_model(encoder, args, device)  # as train() runs it
    optimizer = make_optimizer(model.projection, 1e-4)

    def step():
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = model(x1, x2)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU {torch.get_num_threads()} threads"
    t = timeit(step, warmup=2, iters=5, device=device.type)[0]
    tflops = 3 * vit_flops(encoder, SIZE) * B / t / 1e12  # per clip: 3 images, forward only (f is frozen)
    precision = "bf16" if dtype == torch.bfloat16 else "fp32"
    peak = next((p[dtype != torch.bfloat16] for key, p in PEAK_TFLOPS.items() if key in name), None)  # CPU: none
    share = (f", {100 * tflops / peak:.0f}% of the {precision} dense peak {peak:g} TFLOP/s (datasheet)" if peak
             else f" (no {precision} peak known here)")
    print(f"training step, ViT patch {encoder.patch_size} width {encoder.embed_dim}, batch {B} clips at {SIZE}px, "
          f"{name}, {precision}, {how}: {B / t:.1f} clips/s, {tflops:.2f} TFLOP/s in the encoder{share}")
    return B / t


def bench_data(args):
    """The loader's clips/s over --videos, or 64 synthetic videos of 340x256 JPEGs (Kinetics frames as usually
    extracted): one process, then --workers DataLoader workers (start-up included), then the on-device resample."""
    with tempfile.TemporaryDirectory() as tmp:
        if not args.videos:
            print(f"writing 64 synthetic videos of 16 JPEG frames at 340x256 under {tmp}")
        videos = find_videos(args.videos) if args.videos else write_synthetic_videos(tmp, 64, 16, 256, 340)
        data = FramePairs(videos, SIZE, CLIP_GAP)
        order = [k % len(data) for k in range(512)]
        print(f"loader: {len(order)} clips of {len(videos)} videos, two {SIZE}-px crops a clip")
        rate = len(order) / timeit(lambda: [data[k] for k in order], warmup=1, iters=1)[0]
        print(f"  1 process, no DataLoader   {rate:7.1f} clips/s  ({1e3 / rate:.2f} ms a clip)")
        loader = torch.utils.data.DataLoader(data, batch_size=128, sampler=order, num_workers=args.workers,
                                             collate_fn=collate_crops, pin_memory=torch.cuda.is_available())
        wall, _, batches = timeit(lambda: list(loader), warmup=0, iters=1)
        print(f"  {args.workers} DataLoader workers     {len(order) / wall:7.1f} clips/s")
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        wall = timeit(lambda: [model_input(x, device) for x in batches[0]], warmup=1, iters=3, device=device.type)[0]
        print(f"  resample + normalise on {device}: {128 / wall:7.1f} clips/s  ({1e3 * wall / 128:.2f} ms a clip)")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if not (args.bench or args.bench_data) and args.weights is None and args.videos is None:
        args = parse_args(DEMO_ARGS + argv)
    try:
        if args.bench_data:
            bench_data(args)
        elif args.bench:
            bench(args)
        elif args.weights is None and args.videos is None:
            demo(args)
        elif args.weights is None or args.videos is None:
            raise BadInput("give both --weights and --videos (or neither, for the synthetic demo)")
        else:
            train(args)
    except (BadInput, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:  # an error every rank agreed on (bad data, NaN) ends here too: leave no gloo thread to abort the exit
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
