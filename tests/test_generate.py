"""generate.py: captions -> DiffGAP -> a diffusers audio pipeline -> WAV files, and the comparison.

Tiny random MusicLDM and AudioLDM pipelines are built here from configs (512-d CLAP embeddings, the byte-level
tokenizer of test_extract_hf) and saved with save_pretrained; a tiny DiffGAP is trained on the tiny MusicLDM
CLAP's own embeddings of generated tones. Nothing comes from the hub.
"""
import json
import math
import os
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F

import diffgap as dg
import diffgap_eval as ev
import generate
import train
from embed_cache.extract import load_cache, main as extract_main
from test_extract_hf import reference_audio, reference_text, tiny_clap, write_dataset

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
GEN = ["--gen-steps", "2", "--seconds", "0.25", "--steps", "2", "--num-samples", "2", "--device", "cpu"]


def tiny_pipeline(folder, kind="musicldm", width=512, class_embed_type="simple_projection"):
    """A random MusicLDMPipeline (its CLAP a full ClapModel) or AudioLDMPipeline (the text tower only) saved to folder."""
    clap = transformers.ClapModel.from_pretrained(tiny_clap(folder / "_clap", width=width))
    processor = transformers.ClapProcessor.from_pretrained(folder / "_clap")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2, norm_num_groups=4, cross_attention_dim=16,
        class_embed_type=class_embed_type, projection_class_embeddings_input_dim=width, class_embeddings_concat=True)
    vae = diffusers.AutoencoderKL(block_out_channels=(8, 16), in_channels=1, out_channels=1, norm_num_groups=4,
                                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                  latent_channels=4)
    vocoder = transformers.SpeechT5HifiGan(transformers.SpeechT5HifiGanConfig(
        model_in_dim=16, sampling_rate=16000, upsample_initial_channel=16, upsample_rates=[4, 4], upsample_kernel_sizes=[8, 8],
        resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1, 3]], normalize_before=False))
    scheduler = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                                        set_alpha_to_one=False)
    parts = dict(vae=vae, unet=unet, scheduler=scheduler, vocoder=vocoder, tokenizer=processor.tokenizer)
    if kind == "musicldm":
        pipe = diffusers.MusicLDMPipeline(text_encoder=clap, feature_extractor=processor.feature_extractor, **parts)
    else:
        text = transformers.ClapTextModelWithProjection(clap.config.text_config)
        text.load_state_dict({k: v for k, v in clap.state_dict().items() if k.startswith("text_")})   # the same text tower
        pipe = diffusers.AudioLDMPipeline(text_encoder=text, **parts)
    pipe.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(folder, MusicLDM folder, AudioLDM folder, checkpoint): 20 clips with 5 captions each in the folder."""
    root = tmp_path_factory.mktemp("generate")
    write_dataset(root)
    music, audioldm = tiny_pipeline(root / "musicldm"), tiny_pipeline(root / "audioldm", "audioldm")
    assert extract_main(["--encoder", "musicldm", "--model", music, "--audio-dir", str(root / "clips"), "--captions",
                         str(root / "captions.csv"), "--out", str(root / "audio.npz"), "--device", "cpu"]) == 0
    spec = f"clap:audio={root / 'audio.npz'},text={root / 'audio.captions.npz'},text_key=emb,val=0.3,test=0.3"
    assert train.main(["--pair", "audio-text", "--data", spec, "--min-steps", "12", "--batch-size", "16", "--no-eval",
                       "--out", str(root / "runs"), "--device", "cpu"]) == 0
    (root / "prompts.txt").write_text("a low hum\n\na high whistle, twice\nmiddle tone\n")
    return root, music, audioldm, str(root / "runs" / "audio-text" / "ckpt.pt")


def run(argv, capsys):
    """(exit status, stdout, stderr) of generate.py as the command runs it."""
    capsys.readouterr()   # what ran before
    with pytest.raises(SystemExit) as e:
        ev.run_cli(lambda: generate.main([str(a) for a in argv]))
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def hooked(monkeypatch):
    """The class labels every UNet call of the pipelines generate.py loads receives."""
    seen, load = [], generate.load_pipeline

    def load_and_hook(*args):
        pipe, kind = load(*args)
        pipe.unet.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["class_labels"].clone()), with_kwargs=True)
        return pipe, kind
    monkeypatch.setattr(generate, "load_pipeline", load_and_hook)
    return seen


def test_extraction_embeds_with_the_pipelines_clap_and_the_checkpoint_records_it(setup):
    root, music, _, ckpt = setup
    name = f"musicldm:{music}"
    audio, text = load_cache(str(root / "audio.npz"), name), load_cache(str(root / "audio.captions.npz"), name, text=True)
    paths = [str(root / "clips" / f"{i}.{'flac' if int(i[4:]) % 5 == 0 else 'wav'}") for i in audio["ids"]]
    clap = str(root / "musicldm" / "_clap")   # the ClapModel the pipeline was built with, read by transformers alone
    assert np.allclose(np.stack(audio["emb"]), reference_audio(clap, paths), atol=1e-5)
    assert np.allclose(np.stack(text["emb"]), reference_text(clap, text["captions"]), atol=1e-5)
    assert torch.load(ckpt, weights_only=True)["run"]["encoder"] == name


def with_encoder(ckpt, encoder, path):
    """A copy of the checkpoint that says it was trained on embeddings of `encoder`."""
    state = torch.load(ckpt, weights_only=True)
    state["run"]["encoder"] = encoder
    torch.save(state, path)
    return path


def test_a_pipeline_folder_is_known_by_its_real_path(setup, tmp_path, capsys, monkeypatch):
    root, music, _, ckpt = setup
    monkeypatch.chdir(root)   # extraction and generation each name the folder relatively, from elsewhere
    assert generate.HFClapEncoder.load("musicldm", "cpu", pipeline=True).name == f"musicldm:{os.path.realpath(music)}"
    monkeypatch.chdir(root / "clips")
    code, out, err = run(["--pipeline", "../musicldm", "--ckpt", ckpt, "--captions", root / "prompts.txt", "--out",
                          tmp_path, *GEN], capsys)
    assert code == 0 and "the generator's own CLAP" in out, err
    assert json.loads((tmp_path / "diffgap" / "manifest.json").read_text())["pipeline"] == os.path.realpath(music)


@pytest.mark.parametrize("kind", ["musicldm", "audioldm"])
def test_one_float_wav_per_caption_at_the_pipelines_rate_and_the_unet_gets_the_unit_norm_condition(
        setup, kind, tmp_path, capsys, monkeypatch):
    root, music, audioldm, ckpt = setup
    pipe = music if kind == "musicldm" else audioldm
    if kind == "audioldm":   # its text tower is the tiny MusicLDM CLAP's; say it was trained on AudioLDM's own CLAP
        ckpt = with_encoder(ckpt, "laion-clap:audioldm.pt:HTSAT-tiny", tmp_path / "laion.pt")
    seen = hooked(monkeypatch)
    code, out, err = run(["--pipeline", pipe, "--ckpt", ckpt, "--captions", root / "prompts.txt", "--out", tmp_path,
                          "--condition", "both", "--gen-guidance", "2", "--batch-size", "2", *GEN], capsys)
    assert code == 0, err
    assert out.startswith(f"{ckpt} was trained on musicldm:{music}: the generator's own CLAP" if kind == "musicldm" else
                          f"AudioLDM ships only CLAP's text tower, so whether {ckpt}'s encoder (laion-clap:"), out
    captions = ["a low hum", "a high whistle, twice", "middle tone"]
    for condition in ("text", "diffgap"):
        manifest = json.loads((tmp_path / condition / "manifest.json").read_text())
        assert [c["caption"] for c in manifest["clips"]] == captions and [c["seed"] for c in manifest["clips"]] == [0, 1, 2]
        assert [c["id"] for c in manifest["clips"]] == ["1", "3", "4"]   # line numbers; line 2 is blank
        assert manifest["generator"] == dict(num_inference_steps=2, guidance_scale=2.0, audio_length_in_s=0.25)
        for c in manifest["clips"]:
            info = sf.info(tmp_path / condition / c["file"])
            assert (info.samplerate, info.subtype, info.frames) == (16000, "FLOAT", 4000)
    # what the UNet was given: [unconditional; conditional] per batch of 2 + 1 captions, 2 steps each
    p = diffusers.DiffusionPipeline.from_pretrained(pipe)
    enc = generate.HFClapEncoder(p.text_encoder, p.tokenizer, None, "")
    text, empty = (torch.from_numpy(enc.embed_text(c)) for c in (captions, [""]))
    model, _ = ev.load_checkpoint(ckpt)
    hat = F.normalize(model.eval().translate(text, 0, 2, steps=2, generator=torch.Generator().manual_seed(0), lam=1.0), dim=-1)
    labels = [torch.cat([x[len(x) // 2:] for x in seen[i:i + 4:2]]) for i in (0, 4)]   # conditional halves, step 1
    assert len(seen) == 8 and all(torch.allclose(x[:len(x) // 2], empty.expand(len(x) // 2, -1), atol=1e-5) for x in seen)
    assert torch.allclose(labels[0], text, atol=1e-5)                    # --condition text: the caption's own
    assert torch.allclose(labels[1], hat, atol=1e-5)                     # --condition diffgap: DiffGAP's
    assert torch.allclose(labels[1].norm(dim=1), torch.ones(3)) and not torch.allclose(labels[1], text, atol=1e-2)


def test_the_same_seed_gives_the_same_wav(setup, tmp_path, capsys):
    """The same seed, the same WAV, whatever the batch; caption r's generator seed is --seed + r, so a caption
    alone with that seed gives its WAV (the generator alone: DiffGAP draws one stream for all captions)."""
    root, music, _, ckpt = setup
    (tmp_path / "one.txt").write_text("a high whistle, twice\n")
    waves = {}
    for out, captions, seed, batch in (("a", "prompts.txt", 3, 4), ("b", "prompts.txt", 3, 1), ("c", "one.txt", 4, 1)):
        assert run(["--pipeline", music, "--ckpt", ckpt, "--captions", (tmp_path if out == "c" else root) / captions,
                    "--out", tmp_path / out, "--seed", seed, "--batch-size", batch, "--condition", "both", *GEN],
                   capsys)[0] == 0
        waves[out] = {c: [sf.read(f)[0] for f in sorted((tmp_path / out / c).glob("*.wav"))] for c in ("text", "diffgap")}
    same = lambda x, y: np.abs(x - y).max() <= 1e-5 * np.abs(y).max()   # the tiny pipelines' output is ~1e-5
    for c in ("text", "diffgap"):
        assert all(same(x, y) for x, y in zip(waves["a"][c], waves["b"][c]))
    assert same(waves["c"]["text"][0], waves["a"]["text"][1]) and not same(waves["a"]["text"][0], waves["a"]["text"][1])
    assert not same(waves["a"]["text"][1], waves["a"]["diffgap"][1])


def test_condition_embeddings_from_a_file(setup, tmp_path, capsys):
    root, music, _, ckpt = setup
    np.save(tmp_path / "text.npy", 3 * np.random.default_rng(0).normal(size=(2, 512)).astype(np.float32))
    code, out, err = run(["--pipeline", music, "--ckpt", ckpt, "--cond", tmp_path / "text.npy", "--out", tmp_path / "o",
                          "--condition", "text", *GEN], capsys)
    assert code == 0, err
    assert [c["id"] for c in json.loads((tmp_path / "o" / "text" / "manifest.json").read_text())["clips"]] == ["0", "1"]


@pytest.mark.parametrize("case", ["width", "encoder", "elsewhere", "audioldm-musicldm", "no-class-label", "package",
                                  "latin-1", "utf-16", "no-file", "no-pipeline", "hub-id", "fd-clips", "audioldm-no-clap", "out-file", "done"])
def test_bad_input_is_one_line_exit_2_and_nothing_written(setup, case, tmp_path, capsys, monkeypatch):
    root, music, audioldm, ckpt = setup
    captions, pipe, extra = root / "prompts.txt", music, []
    if case == "width":   # a checkpoint of 64-d embeddings
        ckpt = tmp_path / "narrow.pt"
        ev.save_checkpoint(str(ckpt), dg.DiffGAP(dg.DiffGAPConfig(dim_a=64, dim_b=64)), run={"pair": "audio-text"})
    if case in ("encoder", "elsewhere"):   # another CLAP; MusicLDM's CLAP, but of another pipeline
        ckpt = with_encoder(ckpt, "hf-clap:laion/clap-htsat-unfused" if case == "encoder" else f"musicldm:{audioldm}",
                            tmp_path / "other.pt")
    if case == "audioldm-musicldm":   # AudioLDM conditioned in MusicLDM's CLAP space
        pipe = audioldm
    if case == "package":
        monkeypatch.setitem(sys.modules, "diffusers", None)   # import diffusers raises ModuleNotFoundError
    if case in ("latin-1", "utf-16"):
        captions = tmp_path / "bad.txt"
        captions.write_bytes("un caf\u00e9\n".encode(case))
    if case == "no-file":
        captions = tmp_path / "missing.txt"
    if case == "no-pipeline":
        pipe = tmp_path / "nothing"
    if case == "hub-id":   # a bare name: a folder here, or a hub id, looked up offline
        pipe = "nosuchpipeline"
        monkeypatch.setattr(pytest.importorskip("huggingface_hub").constants, "HF_HUB_OFFLINE", True)
    if case == "no-class-label":   # a UNet that would ignore the condition
        pipe = tiny_pipeline(tmp_path / "plain", class_embed_type=None)
    if case in ("fd-clips", "audioldm-no-clap"):
        captions, extra = root / "captions.csv", ["--reference-audio", root / "clips"]
        extra += ["--fd-clips", "21" if case == "fd-clips" else "8"]
        pipe = audioldm if case == "audioldm-no-clap" else music
        if case == "audioldm-no-clap":
            ckpt = with_encoder(ckpt, "laion-clap:audioldm.pt:HTSAT-tiny", tmp_path / "laion.pt")
    if case == "out-file":   # --out below a file
        (tmp_path / "afile").write_text("")
        extra = ["--out", tmp_path / "afile" / "sub"]
    if case == "done":
        (tmp_path / "out" / "diffgap").mkdir(parents=True)
        (tmp_path / "out" / "diffgap" / "manifest.json").write_text("{}")
    code, out, err = run(["--pipeline", pipe, "--ckpt", ckpt, "--captions", captions, "--out", tmp_path / "out",
                          *extra, *GEN], capsys)
    want = {
        "width": "audio/text dims 64/64, but",
        "encoder": "trained on embeddings of hf-clap:laion/clap-htsat-unfused, not of musicldm:",
        "elsewhere": f"trained on embeddings of musicldm:{audioldm}, not of musicldm:{music}",
        "audioldm-musicldm": f"trained on embeddings of musicldm:{music}, MusicLDM's CLAP; AudioLDM was trained",
        "no-class-label": "its UNet takes no CLAP class label (class_embed_type None)",
        "package": "generate.py needs the diffusers package: pip install diffusers",
        "latin-1": "bad.txt: not UTF-8 text (byte 6",
        "utf-16": "bad.txt: the text is UTF-16",
        "no-file": "missing.txt: no such file",
        "no-pipeline": "nothing: no such folder",
        "fd-clips": "20 clips with captions",
        "audioldm-no-clap": "--clap MODEL",
        "done": "already holds a generation",
        "out-file": "afile is a file, not a folder",
        "hub-id": "nosuchpipeline: no such folder, and not a hub pipeline in the Hugging Face cache",
    }[case]
    assert code == 2 and want in err and len(err.strip().splitlines()) == 1, err
    written = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "out").rglob("*"))
    assert written == (["out/diffgap", "out/diffgap/manifest.json"] if case == "done" else []), written


def test_the_comparison_prints_both_rows_on_the_same_clips(setup, tmp_path, capsys):
    root, music, _, ckpt = setup
    code, out, err = run(["--pipeline", music, "--ckpt", ckpt, "--captions", root / "captions.csv", "--reference-audio",
                          root / "clips", "--condition", "both", "--fd-clips", "8", "--out", tmp_path, *GEN], capsys)
    assert code == 0, err
    table = (tmp_path / "comparison.txt").read_text()
    assert table.strip() in out and f"comparison on 20 clips of {root / 'clips'}" in table and "FD (N=8)" in table
    for name in ("text", "diffgap"):
        row = next(line for line in table.splitlines() if line.startswith(name)).split()
        assert len(row) == 4 and -1 <= float(row[1]) <= 1 and float(row[2]) >= 0 and -1 <= float(row[3]) <= 1
        assert len(json.loads((tmp_path / name / "manifest.json").read_text())["clips"]) == 20   # one caption a clip
    assert "not computed: IS and KL" in table and "FAD" in table


def test_the_metrics_on_known_answers():
    """CLAP score, FD and paired cosine of embeddings chosen to give them, through the table."""
    e = torch.eye(3)
    d = (e[0] + e[1]) / math.sqrt(2)
    assert generate.clap_score(e[:2], torch.stack([e[0], d])) == pytest.approx((1 + 1 / math.sqrt(2)) / 2)
    ref, text = e[[0, 1, 2, 0, 1]], torch.stack([e[0], e[1], d, e[2], e[1]])
    gen = F.normalize(torch.tensor([[1.0, 1, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0], [0, 0, 1]]), dim=1)
    table = generate.comparison({"diffgap": gen}, ref, text, 4, "title")
    row = next(line for line in table.splitlines() if line.startswith("diffgap")).split()
    assert float(row[1]) == pytest.approx((1 / math.sqrt(2) + 1 + 0 + 0 + 0) / 5, abs=1e-4)     # gen . text
    assert float(row[3]) == pytest.approx((1 / math.sqrt(2) + 1 + 1 + 1 + 0) / 5, abs=1e-4)     # gen . ref
    fd4 = ev.frechet_distance(gen[:4], ref[:4])   # the first N = 4 clips only
    assert float(row[2]) == pytest.approx(fd4, abs=1e-4) and abs(fd4 - ev.frechet_distance(gen, ref)) > 1e-2
    # FD itself: a shifted copy of the same clips is the squared shift (equal covariances)
    x = torch.randn(50, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert ev.frechet_distance(x + torch.tensor([0.3, 0.0, 0.4], dtype=torch.float64), x) == pytest.approx(0.25, abs=1e-6)
    ref_row = next(line for line in table.splitlines() if line.startswith("reference")).split()
    assert float(ref_row[1]) == pytest.approx((1 + 1 + 0 + 0 + 1) / 5, abs=1e-4) and ref_row[2:] == ["-", "-"]
