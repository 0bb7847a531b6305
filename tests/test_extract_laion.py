"""LAION-CLAP (laion_clap) through embed_cache.extract: every way setting it up fails is one true
line with exit 2 and nothing written; the wrapper feeds CLAP_Module what its own examples do.

laion_clap is not a test dependency (it pins numpy < 2 and needs torchvision): fake modules on
sys.path stand in for it, and the real package is exercised wherever it imports.
"""
import importlib.util
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import soundfile as sf

from embed_cache.extract import extract, extract_captions, load_cache, main, make_plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FAKE = '''
import os, sys
import numpy as np
if os.environ.get("FAKE_LAION_IMPORT_ERROR"):
    raise RuntimeError(os.environ["FAKE_LAION_IMPORT_ERROR"])
if os.environ.get("FAKE_LAION_MISSING_DEPENDENCY"):
    import torchlibrosa_is_not_installed

class CLAP_Module:
    """Stands in for laion_clap.CLAP_Module: audio rows say how long each clip was and its RMS."""
    def __init__(self, enable_fusion=False, device=None, amodel="HTSAT-tiny", tmodel="roberta"):
        if os.environ.get("FAKE_LAION_NO_ROBERTA"):   # what transformers raises for roberta-base offline
            raise OSError("We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find "
                          "them in the cached files.\\nCheck your internet connection")
        self.args = (enable_fusion, amodel)
        print("Load our best checkpoint in the paper.")      # laion_clap prints to stdout

    def load_ckpt(self, ckpt=None, model_id=-1, verbose=True):
        self.ckpt = ckpt

    def get_audio_embedding_from_data(self, x, use_tensor=False):
        assert isinstance(x, list) and not use_tensor
        return np.stack([[len(w) / 480000, float(np.sqrt(np.mean(np.square(w)))), 1.0] for w in x]).astype(np.float32)

    def get_text_embedding(self, x, tokenizer=None, use_tensor=False):
        return np.stack([[len(t), t.count(" ") + 1.0, 1.0] for t in x]).astype(np.float32)
'''


@pytest.fixture
def fake_laion(tmp_path, monkeypatch):
    """A fake laion_clap package first on sys.path (in this process and in subprocesses)."""
    pkg = tmp_path / "fake" / "laion_clap"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(FAKE)
    monkeypatch.syspath_prepend(str(tmp_path / "fake"))
    monkeypatch.delitem(sys.modules, "laion_clap", raising=False)
    yield str(tmp_path / "fake")
    sys.modules.pop("laion_clap", None)


def clips_and_captions(folder):
    os.makedirs(folder / "clips", exist_ok=True)
    for k, (sr, seconds, channels) in enumerate([(48000, 12.5, 1), (16000, 3.0, 2), (44100, 10.0, 1)]):
        x = 0.25 * np.ones((int(sr * seconds), channels), np.float32)
        sf.write(folder / "clips" / f"c{k}.wav", x, sr)
    (folder / "captions.csv").write_text("file_name,caption_1,caption_2\n"
                                         "c0.wav,a dog,a dog barks twice\nc1.wav,rain,\nc2.wav,wind blows,x\n")


def extract_cli(folder, *extra, env=None):
    """The command in a subprocess (a fresh interpreter, as a user runs it)."""
    return subprocess.run([sys.executable, "-m", "embed_cache.extract", *command(folder, *extra)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})


def command(folder, *extra):
    return ["--encoder", "laion-clap", "--audio-dir", str(folder / "clips"), "--captions", str(folder / "captions.csv"),
            "--out", str(folder / "audio.npz"), *extra]


def no_caches(folder):
    return not [f for f in os.listdir(folder) if f.endswith(".npz")]


def test_missing_package_is_one_line(tmp_path, monkeypatch, capsys):
    clips_and_captions(tmp_path)
    monkeypatch.setitem(sys.modules, "laion_clap", None)        # not installed, wherever this runs
    assert main(["--encoder", "laion-clap", "--audio-dir", str(tmp_path / "clips"), "--out", str(tmp_path / "a.npz")]) == 2
    assert capsys.readouterr().err == ("error: --encoder laion-clap needs the laion_clap package: pip install laion_clap "
                                       "(--encoder logmel needs nothing)\n")
    assert no_caches(tmp_path)


def test_installed_but_failing_import_says_why(tmp_path, fake_laion, monkeypatch, capsys):
    clips_and_captions(tmp_path)
    env = {"PYTHONPATH": os.pathsep.join([fake_laion, ROOT]), "FAKE_LAION_IMPORT_ERROR": "operator torchvision::nms does not exist"}
    r = extract_cli(tmp_path, env=env)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("error: --encoder laion-clap: laion_clap is installed but cannot be imported (RuntimeError: "
                               "operator torchvision::nms does not exist); "), r.stderr   # the reason names torchvision
    assert "needs the laion_clap package" not in r.stderr and no_caches(tmp_path)
    monkeypatch.setenv("FAKE_LAION_IMPORT_ERROR", "numpy.dtype size changed")
    assert main(command(tmp_path)) == 2
    assert capsys.readouterr().err == ("error: --encoder laion-clap: laion_clap is installed but cannot be imported "
                                       "(RuntimeError: numpy.dtype size changed); fix or reinstall what it names "
                                       "(python -c 'import laion_clap' shows the traceback)\n")
    monkeypatch.delenv("FAKE_LAION_IMPORT_ERROR")
    monkeypatch.setenv("FAKE_LAION_MISSING_DEPENDENCY", "1")      # its own dependency missing: not "pip install laion_clap"
    assert main(command(tmp_path)) == 2
    assert capsys.readouterr().err.startswith("error: --encoder laion-clap: laion_clap is installed but cannot be imported "
                                              "(ModuleNotFoundError: No module named 'torchlibrosa_is_not_installed'); ")
    assert no_caches(tmp_path)


def test_roberta_base_not_cached_offline_is_one_line(tmp_path, fake_laion, monkeypatch, capsys):
    clips_and_captions(tmp_path)
    monkeypatch.setenv("FAKE_LAION_NO_ROBERTA", "1")
    assert main(command(tmp_path)) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: --encoder laion-clap: "), err
    assert "(OSError: We couldn't connect" in err and "'roberta-base'" in err, err
    assert main(command(tmp_path, "--checkpoint", str(tmp_path / "nope.pt"))) == 2
    assert capsys.readouterr().err.startswith(f"error: --checkpoint {tmp_path / 'nope.pt'}: no such file")
    assert no_caches(tmp_path)


def test_wrapper_feeds_clap_module_the_first_10_s_at_48_khz_and_captions(tmp_path, fake_laion, capsys):
    from embed_cache.extract import LaionClapEncoder
    clips_and_captions(tmp_path)
    environ = dict(os.environ)
    enc = LaionClapEncoder(None, device="cpu")
    assert dict(os.environ) == environ                                  # HF_HUB_OFFLINE is the user's to set
    assert "Load our best" not in capsys.readouterr().out               # its prints go to stderr
    assert enc.name == "laion-clap:default:HTSAT-tiny" and enc.model.ckpt is None and enc.model.args == (False, "HTSAT-tiny")
    plan = make_plan(str(tmp_path / "clips"), str(tmp_path / "captions.csv"))
    extract(str(tmp_path / "clips"), str(tmp_path / "a.npz"), enc, files=plan.files)
    extract_captions(plan.captions, str(tmp_path / "t.npz"), enc)
    audio, text = load_cache(str(tmp_path / "a.npz"), enc.name), load_cache(str(tmp_path / "t.npz"), enc.name, text=True)
    lengths = {i: e[0] / e[2] for i, e in zip(audio["ids"], audio["emb"])}   # len / 480000, as the fake embeds it
    # 12.5 s cut to the 10 s window; 3 s stereo at 16 kHz -> 3 s mono at 48 kHz, padded by laion_clap itself
    assert lengths == pytest.approx({"c0": 1.0, "c1": 0.3, "c2": 1.0}, abs=1e-6)
    assert text["captions"] == ["a dog", "a dog barks twice", "rain", "wind blows", "x"]
    assert np.allclose(np.linalg.norm(np.stack(text["emb"]), axis=1), 1, atol=1e-6)


def test_real_laion_clap_where_it_imports(tmp_path):
    if importlib.util.find_spec("laion_clap") is None:
        pytest.skip("laion_clap is not installed")
    probe = subprocess.run([sys.executable, "-c", "import laion_clap"], capture_output=True, text=True, timeout=300)
    clips_and_captions(tmp_path)
    if probe.returncode != 0:   # its import fails here: the command says why, in one line
        why = (probe.stderr.strip().splitlines() or ["?"])[-1]
        r = extract_cli(tmp_path, env={"PYTHONPATH": ROOT})
        assert r.returncode == 2 and "laion_clap is installed but cannot be imported" in r.stderr and why[:40] in r.stderr
        pytest.skip(f"laion_clap cannot be imported here: {why}")
    # offline with an empty cache: CLAP_Module cannot load roberta-base, and says so in one line
    r = extract_cli(tmp_path, env={"PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "error: --encoder laion-clap: " in r.stderr and "'roberta-base'" in r.stderr and no_caches(tmp_path)
