"""Train DiffGAP with bidirectional split training.

    python train.py --pair audio-video                 # built-in synthetic embeddings
    python train.py --pair audio-text --data pairs.npz
    python train.py --pair audio-text --data clap:audio=audio.npy,text=text.npy
    python train.py --pair audio-video --resume        # continue runs/audio-video/ckpt.pt
    torchrun --standalone --nproc_per_node 2 train.py --pair audio-video   # data parallel, same result

It trains 30 epochs (the paper's), or more on a small set so that a run has at least
--min-steps steps, and says so. It writes runs/<pair>/ckpt.pt atomically at every epoch end,
every --save-every-min minutes, at the end and on Ctrl-C or SIGTERM, then prints retrieval on
the validation split, marking the score `sample.py --score auto` will use. A run killed at any
moment (kill -9 included) and continued with --resume ends bit-identical to one never stopped:
every step's batch, timesteps, noise and dropout derive from (--seed, step).
"""
from __future__ import annotations

import argparse
import math
import os
import signal
import time
from dataclasses import asdict

import torch
from tqdm import tqdm

import diffgap as dg
import diffgap_eval as ev
import embed_cache
from diffgap_eval import ArgParser, number

# The settings that define a run, with their defaults: the run's own (kept in the checkpoint's
# "run" entry) and the model's (its config). A resumed run keeps the checkpoint's values and
# refuses a different one given on the command line: it would not be the same run any more.
RUN_DEFAULTS = dict(data="synthetic", batch_size=64, lr=1e-3, seed=0, direction="both")
MODEL_OPTIONS = ("objective", "schedule", "p_uncond", "ema_decay", "switch_every", "direction_embedding", "shrink")


def parse_args(argv=None):
    p = ArgParser(prog="train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pair", choices=ev.PAIRS, default="audio-video")
    p.add_argument("--data", help="data spec (README: Your own embeddings); default synthetic")
    p.add_argument("--epochs", type=number(int, 1), help="passes over the pairs (default: 30, the paper's, or what "
                   "--min-steps needs; on --resume the checkpoint's)")
    p.add_argument("--min-steps", type=number(int, 1), default=ev.MIN_STEPS,
                   help=f"without --epochs, train at least this many steps (default {ev.MIN_STEPS})")
    p.add_argument("--batch-size", type=number(int, 1), help="default 64 (the paper's)")
    p.add_argument("--lr", type=number(float, 0, lo_open=True), help="Adam's, default 1e-3 (paper: 2e-4 over ~94k steps)")
    p.add_argument("--switch-every", type=number(int, 1), help="m: steps per direction phase, default 500 (paper: 5000)")
    p.add_argument("--direction", choices=ev.DIRECTION_CHOICES, help="default both")
    p.add_argument("--objective", choices=("eps", "x0", "v"), help="default v")
    p.add_argument("--schedule", choices=("cosine", "linear"), help="default cosine")
    p.add_argument("--p-uncond", type=number(float, 0, 1, hi_open=True),
                   help="condition dropout, for classifier-free guidance; default 0.1 (0: the paper's, no guidance)")
    p.add_argument("--rank-guidance", type=number(float), default=ev.RANK_GUIDANCE, help="of the samples that rank")
    p.add_argument("--gallery-guidance", type=number(float), default=ev.GALLERY_GUIDANCE, help="of two-way's gallery side")
    p.add_argument("--ema-decay", type=number(float, 0, 1, hi_open=True), help="in [0, 1), default 0.999; 0 turns EMA off")
    p.add_argument("--no-direction-embedding", dest="direction_embedding", action="store_const", const=False)
    p.add_argument("--no-shrink", dest="shrink", action="store_const", const=False, help="the paper's translation")
    p.add_argument("--num-samples", type=number(int, 1), default=16, help="K samples averaged in the final evaluation")
    p.add_argument("--no-eval", action="store_true", help="skip the validation table at the end (not the fit of lam)")
    p.add_argument("--out", default="runs", help="checkpoints go to OUT/<pair>/ckpt.pt")
    p.add_argument("--resume", nargs="?", const="auto", help="continue OUT/<pair>/ckpt.pt (or this file) with its settings")
    p.add_argument("--save-every-min", type=number(float, 0, lo_open=True), default=10.0, help="besides epoch ends")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--kernels", choices=["auto", "triton", "torch"], default="auto",
                   help="auto: Triton kernels on CUDA, torch otherwise; triton on a CPU needs TRITON_INTERPRET=1")
    p.add_argument("--seed", type=number(int, 0), help="default 0; decides the initial weights, batch order and noise")
    p.add_argument("--loss-log", metavar="FILE", help="'step loss' per step (torchrun: rank 0's slice; --resume appends)")
    return p.parse_args(argv)


def settle_run_options(args, ckpt) -> None:
    """Fill the run's settings from the defaults (fresh run) or the checkpoint (resumed run)."""
    config = asdict(dg.DiffGAPConfig()) if ckpt is None else ckpt["config"]
    kept = {**RUN_DEFAULTS, **(ckpt["run"] if ckpt else {}), **{k: config[k] for k in MODEL_OPTIONS}}
    for name in list(RUN_DEFAULTS) + list(MODEL_OPTIONS):
        given = getattr(args, name)
        if ckpt is not None and given is not None and given != kept[name]:
            option = ("--no-" if name in ("direction_embedding", "shrink") else "--") + name.replace("_", "-")
            raise ValueError(f"{option} {given} differs from the checkpoint's {kept[name]}: a resumed run keeps its settings")
        setattr(args, name, kept[name] if given is None else given)
    args.epochs_given = args.epochs is not None
    if args.epochs is None and ckpt is not None:
        args.epochs = ckpt["run"].get("epochs", 30)


def training_length(args, per_epoch: int) -> tuple[int, str]:
    """(epochs, why): --epochs if given, else 30 epochs or enough for --min-steps steps."""
    if args.epochs is not None:
        short = args.epochs * per_epoch < args.min_steps
        source = f"--epochs {args.epochs}" if args.epochs_given else "the checkpoint's epochs"
        return args.epochs, (source + (f"; fewer than {args.min_steps} steps: the learned scores may "
                             f"lose to contrastive (sample.py --score auto then keeps contrastive)" if short else ""))
    if 30 * per_epoch >= args.min_steps:
        return 30, "30 epochs, the paper's"
    epochs = math.ceil(args.min_steps / per_epoch)
    return epochs, f"30 epochs would be {30 * per_epoch} steps, under --min-steps {args.min_steps}"


def some_parameters_idle(config: dg.DiffGAPConfig) -> bool:
    """Whether some steps leave parameters out of the loss, which DistributedDataParallel must be
    told (find_unused_parameters costs a graph walk per step): with unequal dims each direction
    has its own adapters; with p_uncond = 0 the null condition is never used."""
    return config.dim_a != config.dim_b or config.p_uncond == 0


def init_distributed(device: torch.device) -> tuple[int, int, torch.device]:
    """(rank, world_size, device) under torchrun (gloo on the CPU, nccl on CUDA), else (0, 1, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return torch.distributed.get_rank(), world, device


def main(argv=None) -> int:
    args = parse_args(argv)
    rank, world, device = init_distributed(ev.pick_device(args.device))
    try:
        return run_training(args, rank, world, device)
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()


def run_training(args, rank: int, world: int, device: torch.device) -> int:
    say = print if rank == 0 else (lambda *a, **k: None)   # rank 0 alone prints, saves and evaluates
    ev.set_kernels(args.kernels, device)
    ckpt_path = os.path.join(args.out, args.pair, "ckpt.pt")
    ckpt = None
    if args.resume:
        resume_path = ckpt_path if args.resume == "auto" else args.resume
        model, ckpt = ev.load_checkpoint(resume_path, needs=("optimizer", "step", "pair", "data", "batch_size", "lr"))
        if ckpt["run"]["pair"] != args.pair:
            raise ValueError(f"{resume_path}: checkpoint is for --pair {ckpt['run']['pair']}, not {args.pair}")
    settle_run_options(args, ckpt)
    torch.manual_seed(args.seed)   # the initial weights; training draws from (seed, step) itself
    data = embed_cache.load(args.data, args.pair)
    train = data.splits["train"]
    a, b = train.pairs()
    per_epoch = dg.steps_per_epoch(len(a), args.batch_size)
    if ckpt is None:
        model = dg.DiffGAP(dg.DiffGAPConfig(*data.dims, **{k: getattr(args, k) for k in MODEL_OPTIONS}))
        model.fit_stats(train.a, train.b)
    else:
        ev.check_dims(data, model)
    model.to(device)
    ddp = None
    if world > 1:  # averages the gradients of the ranks' slices (EMA and buffers are not trained)
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False,
            find_unused_parameters=some_parameters_idle(model.config))
    optimizer = dg.make_optimizer(model, args.lr)
    start_step = 0
    if ckpt is not None:
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError, TypeError) as e:   # another model's state, or a damaged one
            raise ValueError(f"{resume_path}: its optimizer state does not fit the model ({ev.reason(e)})") from None
        start_step = ckpt["step"]
    args.epochs, why = training_length(args, per_epoch)
    total = args.epochs * per_epoch
    say(data.summary())
    say(f"training {total} steps: {args.epochs} epochs x {per_epoch} batches of {args.batch_size} ({why}) on {device}"
        + (f" x {world} processes" if world > 1 else "") + (f", resuming at step {start_step}" if ckpt else ""))
    say(f"model: {model.num_params():,} parameters ({model.num_params() * 4 / 1e6:.2f} MB fp32), "
        f"objective {model.config.objective}, {model.config.schedule} schedule, T={model.config.timesteps}, "
        f"switch every {model.config.switch_every} steps")
    saved = {"step": None}   # the last step written to ckpt_path by this run

    def diverged(why: str) -> ValueError:
        kept = (f"{ckpt_path} is left as saved at step {saved['step']}" if saved["step"] is not None else
                f"{ckpt_path} is unchanged" if ckpt is not None else "no checkpoint was written")
        return ValueError(f"training diverged at {why}; {kept}. Try a lower --lr (this run: {args.lr:g})")

    def save(step: int) -> None:
        if rank == 0:
            bad = ev.non_finite(model.state_dict()) or ev.non_finite(
                {f"optimizer {i} {k}": v for i, st in optimizer.state.items() for k, v in st.items()})
            if bad:   # never overwrite the last good checkpoint with a diverged model
                raise diverged(f"step {step}: {bad}")
            saved["step"] = step
            run = {"pair": args.pair, "data": data.spec, "epochs": args.epochs, "encoder": data.encoder,
                   **{k: getattr(args, k) for k in RUN_DEFAULTS if k != "data"}}
            ev.save_checkpoint(ckpt_path, model, optimizer=optimizer.state_dict(), step=step, run=run)

    def should_stop() -> bool:
        """Whether any rank was asked to stop; under torchrun all ranks must stop at the same step."""
        if world == 1:
            return bool(stop)
        flag = torch.tensor([len(stop)], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    # Ctrl-C and SIGTERM (what schedulers send) ask the loop to stop after the step in flight,
    # so the checkpoint never holds a half-applied update; a second Ctrl-C stops at once.
    stop = []
    def request_stop(signum, frame):
        if stop and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.append(signum)
    handlers = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    step, last_save, stopped = start_step, time.monotonic(), False
    bar = tqdm(total=total, initial=start_step, unit="it", mininterval=0.5, disable=rank != 0)
    loss_log = None
    if args.loss_log and rank == 0:   # resumed: keep the whole lines up to the checkpoint's step, which comes next
        def kept(line: str) -> bool:
            step = line.split()
            return line.endswith("\n") and len(step) == 2 and step[0].isdigit() and int(step[0]) <= start_step
        lines = embed_cache.base.read_text(args.loss_log).splitlines(True) if ckpt and os.path.isfile(args.loss_log) else []
        ev.atomic_write(args.loss_log, lambda f: f.write("".join(filter(kept, lines)).encode()))
        loss_log = open(args.loss_log, "a")
    try:
        for stats in dg.train_steps(model, a, b, optimizer, max(0, total - start_step), args.batch_size,
                                    start_step=start_step, direction=ev.direction_arg(args.direction),
                                    seed=args.seed, share=(rank, world), net=ddp):
            step = stats["step"]
            bar.update(1)
            if loss_log:
                loss_log.write(f"{step} {stats['loss'].item():.8g}\n")
                loss_log.flush()
            if step % 20 == 0:
                bar.set_postfix(loss=f"{stats['loss']:.4f}", direction=ev.DIRECTIONS[stats["direction"]], refresh=False)
            if step % per_epoch == 0 or time.monotonic() - last_save >= 60 * args.save_every_min:
                save(step)
                last_save = time.monotonic()
            if should_stop():
                stopped = True
                break
    except FloatingPointError as e:   # dg.train_steps: a non-finite loss, found before its update
        raise diverged(str(e).split(";")[0]) from None
    finally:
        bar.close()
        if loss_log:
            loss_log.close()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    save(step)
    if stopped:
        say(f"interrupted at step {step}; saved {ckpt_path} (continue with --resume)")
        return 128 + (stop[0] if stop else signal.SIGTERM)
    say(f"saved {ckpt_path} at step {step}")
    if world > 1:
        torch.distributed.barrier()   # the checkpoint is complete before any rank leaves
    fit = model.config.shrink and model.config.dim_a == model.config.dim_b
    if rank != 0 or (args.no_eval and not fit):
        return 0
    model.eval()
    val, guidance = data.splits["val"], ev.rank_guidance(model, args.rank_guidance)
    gallery_guidance = ev.rank_guidance(model, args.gallery_guidance)
    translations = (ev.fit_shrinkage if fit else ev.translate_split)(
        model, val, args.num_samples, guidance=guidance, gallery_guidance=gallery_guidance, name="validation", say=print)
    if fit:
        save(step)
        say(f"translation shrinkage fitted on validation and saved: lam {model.lam[0]:g} B->A, {model.lam[1]:g} A->B")
    if args.no_eval:
        return 0
    results, chosen = {}, {}
    for d in (0, 1):
        every = ev.split_scores(val, d, translations)
        chosen[d] = ev.choose_score(every)
        results[d] = {k: v for k, v in every.items() if k in ("contrastive", "diffgap", "two-way", chosen[d])}
    say(ev.retrieval_table(results, f"validation retrieval (%), 5 DDIM steps, K={args.num_samples} samples averaged, "
                                    f"{ev.guidance_words(guidance, gallery_guidance)}; * the score sample.py --score auto "
                                    f"will use:", chosen))
    return 0


if __name__ == "__main__":
    ev.run_cli(main)
