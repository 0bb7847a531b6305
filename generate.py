"""Sound from captions: a diffusers audio pipeline (MusicLDM or AudioLDM) conditioned on DiffGAP's translation of
each caption's CLAP text embedding into a CLAP audio embedding, the condition those generators were trained on.

    python generate.py --pipeline ucsd-reach/musicldm --ckpt runs/audio-text/ckpt.pt --captions prompts.txt --out wavs
    python generate.py ... --condition both          # and the generator alone (its own text embedding), same seeds
    python generate.py ... --captions musiccaps.csv --reference-audio clips/ --condition both   # + the comparison

Writes OUT/<condition>/NNNNN.wav (float, the pipeline's sample rate) and OUT/<condition>/manifest.json (caption,
id, seed of each file; the settings). With --reference-audio, one caption per clip (its first) and a table of what
the CLAP of the pipeline (or --clap) measures: CLAP score, Frechet distance in CLAP space, paired cosine.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os

import torch
import torch.nn.functional as F
from tqdm import tqdm

import diffgap_eval as ev
from diffgap_eval import ArgParser, number
from embed_cache.arrays import check_embeddings, read_array
from embed_cache.base import DataError, atomic_write, read_text, reason
from embed_cache.extract import (HFClapEncoder, import_optional, make_plan, model_name, read_audio, read_captions,
                                 resample)

KINDS = {"MusicLDMPipeline": "musicldm", "AudioLDMPipeline": "audioldm"}
MIN_FD_CLIPS = 8   # a Frechet distance from fewer clips is mostly its own bias
NOT_COMPUTED = ("not computed: IS and KL (they need PANNs, an AudioSet classifier) and FAD (VGGish or PANNs "
                "features): those networks are not dependencies of this project")


def parse_args(argv=None):
    p = ArgParser(prog="generate.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", required=True,
                   help="diffusers pipeline: hub id (ucsd-reach/musicldm, cvssp/audioldm-s-full-v2) or folder")
    p.add_argument("--ckpt", default=os.path.join("runs", "audio-text", "ckpt.pt"),
                   help="DiffGAP checkpoint of train.py --pair audio-text on this CLAP's embeddings (default: %(default)s)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--captions", help="captions: .txt (one per line), or the .csv / .json layouts embed_cache.extract reads")
    src.add_argument("--cond", help="FILE.npy of CLAP text embeddings (N, D) to generate for")
    p.add_argument("--id-col", help="captions .csv / .json: the column naming each clip (as embed_cache.extract)")
    p.add_argument("--out", required=True, help="folder: OUT/<condition>/ gets the WAV files and manifest.json")
    p.add_argument("--condition", choices=["diffgap", "text", "both"], default="diffgap",
                   help="diffgap: DiffGAP's audio embedding; text: the caption's own (the generator alone); both")
    p.add_argument("--reference-audio", metavar="DIR", help="the captions' clips, held out from DiffGAP's training: "
                   "generate for each clip's first caption and compare with them")
    p.add_argument("--clap", help="transformers CLAP (hub id or folder) that measures the comparison (default: the "
                   "pipeline's own; AudioLDM pipelines hold only its text tower)")
    p.add_argument("--fd-clips", type=number(int, MIN_FD_CLIPS), default=500,
                   help=f"N of the Frechet distance: the first N clips (it falls as N grows; at least {MIN_FD_CLIPS}; "
                        f"default %(default)s)")
    p.add_argument("--gen-steps", type=number(int, 1), help="the generator's steps (default: the pipeline's own)")
    p.add_argument("--gen-guidance", type=number(float, 0), help="the generator's guidance scale (default: the pipeline's)")
    p.add_argument("--seconds", type=number(float, 0, lo_open=True), help="audio length (default: the pipeline's)")
    p.add_argument("--batch-size", type=number(int, 1), default=4, help="captions per pipeline call (default 4)")
    ev.add_sampling_options(p)
    return p.parse_args(argv)


def import_pipelines():
    """diffusers, its logging and progress bars quiet (this command draws its own)."""
    diffusers = import_optional("diffusers", "generate.py")
    transformers = import_optional("transformers", "generate.py")
    for lib in (diffusers, transformers):
        lib.utils.logging.set_verbosity_error()
        lib.utils.logging.disable_progress_bar()
    return diffusers


def load_pipeline(diffusers, name: str, device):
    try:
        pipe = diffusers.DiffusionPipeline.from_pretrained(name)
    except Exception as e:   # no such folder or hub id, offline, another library's files: all one line
        path = os.path.exists(name) or name.startswith((".", "/", "~")) or name.count("/") > 1   # hub ids: ORG/NAME
        raise DataError(f"--pipeline {name}: " + (("no such folder" if not os.path.exists(name) else
                        f"not a diffusers pipeline folder ({reason(e)})") if path else f"no such folder, and not a hub "
                        f"pipeline in the Hugging Face cache ({reason(e)}); a hub id needs a network once: hf download "
                        f"{name}")) from None
    if type(pipe).__name__ not in KINDS:
        raise DataError(f"--pipeline {name}: a {type(pipe).__name__}; generate.py drives {' and '.join(KINDS)}")
    if pipe.unet.config.class_embed_type != "simple_projection":   # a UNet without it ignores class labels silently
        raise DataError(f"--pipeline {name}: its UNet takes no CLAP class label (class_embed_type "
                        f"{pipe.unet.config.class_embed_type}), so no condition would reach it")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device), KINDS[type(pipe).__name__]


def check_match(model, ckpt: dict, path: str, pipe, kind: str, name: str) -> str:
    """One line if the checkpoint cannot condition this pipeline, else a note on the encoders."""
    unet = pipe.unet.config
    widths = (unet.projection_class_embeddings_input_dim, pipe.text_encoder.config.projection_dim)
    if (model.config.dim_a, model.config.dim_b) != widths:
        raise DataError(f"{path}: audio/text dims {model.config.dim_a}/{model.config.dim_b}, but {name} conditions on "
                        f"{widths[0]}-d CLAP audio embeddings from {widths[1]}-d text embeddings")
    if ckpt["run"].get("pair", "audio-text") != "audio-text":
        raise DataError(f"{path}: trained on {ckpt['run']['pair']}; generation needs an audio-text checkpoint")
    recorded, own = ckpt["run"].get("encoder"), f"musicldm:{model_name(name)}"   # as extraction records it
    if kind == "audioldm":
        if (recorded or "").startswith("musicldm:"):
            raise DataError(f"{path}: trained on embeddings of {recorded}, MusicLDM's CLAP; AudioLDM was trained with "
                            f"its own CLAP (embed with --encoder laion-clap and its checkpoint)")
        return (f"AudioLDM ships only CLAP's text tower, so whether {path}'s encoder "
                f"({recorded or 'not recorded'}) is the CLAP AudioLDM was trained with cannot be checked")
    if recorded is None:
        return f"{path} does not record its encoder: it must be {name}'s own CLAP (embed_cache.extract --encoder musicldm)"
    if recorded != own:
        raise DataError(f"{path}: trained on embeddings of {recorded}, not of {own}, the space {name} is conditioned "
                        f"in; embed with python -m embed_cache.extract --encoder musicldm --model {name}")
    return f"{path} was trained on {own}: the generator's own CLAP"


def read_prompts(args) -> tuple[list[tuple[str, str]], dict]:
    """([(id, caption)], {id: audio file}): every caption, or with --reference-audio the first caption of each
    clip and the clips' files."""
    if args.reference_audio:
        plan = make_plan(args.reference_audio, args.captions, args.id_col)
        return [(i, text) for i, n, text in plan.captions if n == 0], dict(plan.files)
    if not args.captions.endswith((".csv", ".json")):
        if not os.path.isfile(args.captions):
            raise DataError(f"{args.captions}: no such file")
        lines = [" ".join(line.split()) for line in read_text(args.captions).splitlines()]
        prompts = [(str(n + 1), text) for n, text in enumerate(lines) if text]   # id: the line number
        if not prompts:
            raise DataError(f"{args.captions}: no captions (one per line)")
        return prompts, {}
    return [(i, text) for i, _, text in read_captions(args.captions, args.id_col)], {}


def write_clips(pipe, embeds: torch.Tensor, negative: torch.Tensor, prompts: list, folder: str, info: dict,
                args, judge=None):
    """One float WAV per row of embeds (N, D) and the folder's manifest; returns judge's CLAP audio embeddings
    of them (N, D'), embedded batch by batch, or None without a judge."""
    import soundfile as sf
    sr, measured, clips = pipe.vocoder.config.sampling_rate, [], []
    bar = tqdm(total=len(prompts), desc=f"generating ({info['condition']})", unit="clip")
    for start in range(0, len(prompts), args.batch_size):
        rows = range(start, min(start + args.batch_size, len(prompts)))
        gens = [torch.Generator(device=embeds.device).manual_seed(args.seed + r) for r in rows]   # one seed a caption
        out = pipe(prompt_embeds=embeds[rows.start:rows.stop], negative_prompt_embeds=negative.expand(len(rows), -1),
                   generator=gens, **info["generator"]).audios   # (B, samples)
        for r, wave in zip(rows, out):
            file = f"{r:05d}.wav"
            atomic_write(os.path.join(folder, file), lambda f: sf.write(f, wave, sr, subtype="FLOAT", format="WAV"))
            clips.append(dict(file=file, id=prompts[r][0], caption=prompts[r][1], seed=args.seed + r))
        if judge is not None:
            measured.append(embed_clips(judge, list(out), sr))
        bar.update(len(rows))
    bar.close()
    manifest = dict(info, sample_rate=sr, seconds=len(out[0]) / sr, clips=clips)
    atomic_write(os.path.join(folder, "manifest.json"), lambda f: f.write(json.dumps(manifest, indent=1).encode()))
    return torch.cat(measured) if judge is not None else None


def clap_score(audio: torch.Tensor, text: torch.Tensor) -> float:
    """Mean cosine of row i of audio (N, D) and row i of text (N, D): the CLAP score (the rows are unit-norm)."""
    return ev.paired_cosine(audio, text, torch.arange(len(text)))


def embed_clips(enc, clips: list, sr: int) -> torch.Tensor:
    """(N, D) CLAP audio embeddings of mono clips at sr, each cut to the encoder's first window as extraction does."""
    window = int(enc.sample_rate * enc.clip_seconds)
    return torch.from_numpy(enc.embed_audio([resample(c, sr, enc.sample_rate)[:window] for c in clips]))


def comparison(gen: dict, ref: torch.Tensor, text: torch.Tensor, n_fd: int, title: str) -> str:
    """The table of each condition's generated clips' embeddings gen[name] (N, D) against the reference clips'
    ref (N, D) and the captions' text (N, D): CLAP score, Frechet distance on the first n_fd, paired cosine."""
    lines = [title, f"{'condition':<12}{'CLAP score':>12}{f'FD (N={n_fd})':>14}{'paired cos':>12}"]
    for name, g in gen.items():
        lines.append(f"{name:<12}{clap_score(g, text):12.4f}{ev.frechet_distance(g[:n_fd], ref[:n_fd]):14.4f}"
                     f"{clap_score(g, ref):12.4f}")
    return "\n".join(lines + [
        f"{'reference':<12}{clap_score(ref, text):12.4f}{'-':>14}{'-':>12}",
        "CLAP score: mean cosine of a clip's CLAP audio embedding and its caption's text embedding;",
        "FD: Frechet distance in CLAP space of the first N generated clips to those N reference clips; it falls as N",
        "grows, so compare at equal N only; paired cos: mean cosine of a generated clip and its reference clip.",
        "CLAP score and paired cos average all clips; the clips must be held out from DiffGAP's training.",
        NOT_COMPUTED])


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cond and args.reference_audio:
        raise DataError("--reference-audio needs --captions (the clips' captions), not --cond")
    conditions = ("text", "diffgap") if args.condition == "both" else (args.condition,)
    device = ev.pick_device(args.device)
    diffusers = import_pipelines()   # a missing package is one line before any file is read
    prompts, files = read_prompts(args) if args.captions else (None, {})
    cond = None if args.captions else check_embeddings(read_array(args.cond), args.cond)   # unit rows
    if args.reference_audio and len(prompts) < args.fd_clips:
        raise DataError(f"{args.captions}: {len(prompts)} clips with captions in {args.reference_audio}, fewer than "
                        f"--fd-clips {args.fd_clips}; FD depends on N, so pass the N every compared run uses")
    model = path = None
    if "diffgap" in conditions:
        path = os.path.abspath(args.ckpt)   # the manifest's record of it
        model, ckpt = ev.load_checkpoint(path)
        ev.set_kernels(args.kernels, device)
    parent = os.path.abspath(args.out)   # the first of it and its parents that exists must be a folder
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise DataError(f"--out {args.out}: {parent} is a file, not a folder")
    for folder in conditions:
        if os.path.exists(os.path.join(args.out, folder, "manifest.json")):
            raise DataError(f"{os.path.join(args.out, folder)}: already holds a generation (manifest.json); choose another --out")
    pipe, kind = load_pipeline(diffusers, args.pipeline, device)
    note = check_match(model, ckpt, path, pipe, kind, args.pipeline) if model else ""
    where = model_name(args.pipeline)
    enc = HFClapEncoder(pipe.text_encoder, pipe.tokenizer, getattr(pipe, "feature_extractor", None), f"{kind}:{where}")
    judge = None   # the CLAP that measures the comparison
    if args.reference_audio:
        if args.clap is None and enc.fe is None:
            raise DataError(f"--pipeline {args.pipeline}: AudioLDM holds only CLAP's text tower; the comparison needs an "
                            f"audio tower: --clap MODEL (a transformers ClapModel, e.g. laion/clap-htsat-unfused)")
        judge = HFClapEncoder.load(args.clap, args.device) if args.clap else enc
        window, n = int(judge.sample_rate * judge.clip_seconds), args.batch_size   # read before anything is generated
        ref = torch.cat([embed_clips(judge, [read_audio(files[i], judge.sample_rate, window) for i, _ in prompts[s:s + n]],
                                     judge.sample_rate) for s in tqdm(range(0, len(prompts), n), desc="reference clips")])
    text = torch.from_numpy(enc.embed_text([t for _, t in prompts])) if prompts else cond    # (N, D_B) unit rows
    if text.shape[1] != pipe.text_encoder.config.projection_dim:
        raise DataError(f"{args.cond}: {text.shape[1]}-d rows, but {args.pipeline}'s CLAP text embeddings are "
                        f"{pipe.text_encoder.config.projection_dim}-d")
    prompts = prompts or [(str(n), "") for n in range(len(text))]   # id: the row
    if note:
        print(note)
    call = inspect.signature(type(pipe).__call__).parameters   # the pipeline's own defaults, to record them
    gen_kw = dict(num_inference_steps=args.gen_steps or call["num_inference_steps"].default,
                  guidance_scale=call["guidance_scale"].default if args.gen_guidance is None else args.gen_guidance,
                  **({} if args.seconds is None else {"audio_length_in_s": args.seconds}))
    negative = torch.from_numpy(enc.embed_text([""])).to(device)    # (1, D): guidance's unconditional side
    info = dict(pipeline=where, kind=kind, generator=gen_kw, captions=os.path.abspath(args.captions or args.cond))
    gen = {}   # the generated clips' CLAP audio embeddings, for the comparison
    for name in conditions:
        embeds = text.to(device)
        # B->A, the K-sample mean, unit-norm: the paper's translation (lam 1, as sample.py --cond), whose samples are
        # distributed like audio embeddings; the lam train.py fits serves retrieval and would pull them toward the text
        if name == "diffgap":
            model.to(device).eval()
            g = torch.Generator(device=device).manual_seed(args.seed)
            embeds = F.normalize(model.translate(embeds, 0, args.num_samples, steps=args.steps, sampler=args.sampler,
                                                 eta=args.eta, guidance=args.guidance, generator=g, lam=1.0), dim=-1)
            info["diffgap"] = dict(checkpoint=path, lam=1.0, steps=args.steps, sampler=args.sampler, eta=args.eta,
                                   guidance=args.guidance, num_samples=args.num_samples, seed=args.seed)
        folder = os.path.join(args.out, name)
        gen[name] = write_clips(pipe, embeds, negative, prompts, folder, dict(info, condition=name), args, judge)
        print(f"wrote {folder}: {len(prompts)} WAV files at {pipe.vocoder.config.sampling_rate} Hz and manifest.json")
    if args.reference_audio:
        table = comparison(gen, ref, torch.from_numpy(judge.embed_text([t for _, t in prompts])), args.fd_clips,
                           f"comparison on {len(prompts)} clips of {args.reference_audio} (the first caption of each), "
                           f"measured with {judge.name}:")
        atomic_write(os.path.join(args.out, "comparison.txt"), lambda f: f.write(table.encode() + b"\n"))
        print(table)
    return 0


if __name__ == "__main__":
    ev.run_cli(main)
