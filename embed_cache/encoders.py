"""Encoders for embed_cache.extract: audio clips (and captions) -> unit-norm embeddings.

    logmel      weight-free log-mel statistics through a fixed random projection; audio only,
                for tests and pipelines without weights (not a semantic embedding)
    hf-clap     Hugging Face transformers' ClapModel + ClapProcessor, from a hub id
                (laion/clap-htsat-unfused, laion/clap-htsat-fused, laion/larger_clap_general,
                ...) or a local folder written by save_pretrained
    laion-clap  LAION-CLAP (pip install laion_clap): CLAP_Module and a checkpoint .pt
                (630k-audioset-best.pt, music_audioset_epoch_15_esc_90.14.pt, ...)

Every encoder has `name` (recorded in the cache, so a resumed run refuses another model),
`sample_rate` (Hz) and `clip_seconds` (its window), `embed_audio(clips)` and, except logmel,
`embed_text(captions)`. `clips` is a list of mono float32 waveforms at `sample_rate`, each at
most `clip_seconds` long: extract.py cuts a longer file to its first window, because both
CLAP implementations otherwise pick a random crop ("rand_trunc") or random chunks ("fusion")
on every call, and a cache must not depend on the run. Shorter clips are padded by the
encoder's own rule (CLAP: "repeatpad", the clip repeated whole, then zeros).

The CLAP packages are optional and imported only when chosen. Hub downloads follow each
library's own rules (HF_HOME, HF_HUB_OFFLINE=1, ...); nothing here changes the environment.
Every failure to set an encoder up is a DataError with one line: the package is missing, it
is installed but its import fails (with the reason), or the model cannot be found.
"""
from __future__ import annotations

import contextlib
import importlib
import math
import os
import sys

import numpy as np
import torch

from .base import DataError


def _reason(e: BaseException) -> str:
    """'Type: first line of the message', short enough for a one-line error."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__


def import_optional(module: str, who: str, pip_name: str | None = None):
    """Import an optional package, or raise a DataError that says which of two things is wrong.

    Not installed: "<who> needs the <pip_name> package: pip install <pip_name>". Installed but
    its import raises (a dependency built for another torch, a missing dependency of its own):
    that exception's type and first line, and what to do about it.
    """
    pip_name = pip_name or module
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name == module:   # the package itself, not one of its imports
            raise DataError(f"{who} needs the {pip_name} package: pip install {pip_name} "
                            f"(--encoder logmel needs nothing)") from None
        reason = _reason(e)
    except Exception as e:  # an installed package that fails while importing: any error type
        reason = _reason(e)
    if "torchvision" in reason:
        hint = (f"the installed torchvision was not built for this torch ({torch.__version__}): install the "
                f"torchvision release made for it, from the same (CPU or CUDA) build, or uninstall torchvision")
    else:
        hint = f"fix or reinstall what it names (python -c 'import {module}' shows the traceback)"
    raise DataError(f"{who}: {module} is installed but cannot be imported ({reason}); {hint}")


def pick_device(device: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cuda' without a GPU is a DataError."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise DataError("--device cuda: no CUDA device is available (use --device cpu)")
    return torch.device(device)


def unit_rows(x) -> np.ndarray:
    """(B, D) float32 numpy with L2-normalised rows, from a tensor or an array."""
    x = torch.as_tensor(x).detach().float().cpu()
    return torch.nn.functional.normalize(x, dim=1).numpy()


# ----------------------------------------------------------------------------------------
# logmel: no weights
# ----------------------------------------------------------------------------------------

def fit_length(x: np.ndarray, n: int) -> np.ndarray:
    """Crop to the first n samples, or repeat the clip until it fills n."""
    if len(x) >= n:
        return x[:n]
    if len(x) == 0:
        return np.zeros(n, dtype=np.float32)
    return np.tile(x, math.ceil(n / len(x)))[:n]


def mel_filterbank(n_mels: int, n_fft: int, sr: int) -> torch.Tensor:
    """(n_mels, n_fft // 2 + 1) triangular filters evenly spaced on the HTK mel scale."""
    mel = lambda f: 2595 * np.log10(1 + f / 700)
    hz = lambda m: 700 * (10 ** (m / 2595) - 1)
    edges = hz(np.linspace(mel(0), mel(sr / 2), n_mels + 2))
    freqs = np.linspace(0, sr / 2, n_fft // 2 + 1)
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    fb = np.maximum(0, np.minimum((freqs - lo) / (mid - lo), (hi - freqs) / (hi - mid)))
    return torch.from_numpy(fb).float()


class LogMelEncoder:
    """Mean and std over time of 64 log-mel bands, through a fixed random projection to `dim`.

    16 kHz, 5 s windows; a shorter clip is repeated to fill the window. Audio only.
    """
    name, sample_rate, clip_seconds, has_text = "logmel", 16000, 5.0, False

    def __init__(self, dim: int = 512, n_fft: int = 512, hop: int = 256, n_mels: int = 64):
        self.n_fft, self.hop = n_fft, hop
        self.fb = mel_filterbank(n_mels, n_fft, self.sample_rate)
        g = torch.Generator().manual_seed(0)   # the same projection on every machine and run
        self.proj = torch.randn(2 * n_mels, dim, generator=g) / math.sqrt(2 * n_mels)

    def embed_audio(self, clips: list[np.ndarray]) -> np.ndarray:
        """clips: mono float32 waveforms at 16 kHz -> (B, dim) unit rows."""
        n = int(self.sample_rate * self.clip_seconds)
        return self.embed(np.stack([fit_length(np.asarray(c, np.float32), n) for c in clips]))

    def embed(self, audio: np.ndarray) -> np.ndarray:
        """(B, T) float32 at 16 kHz, all of one length -> (B, dim) unit rows."""
        x = torch.from_numpy(audio)
        spec = torch.stft(x, self.n_fft, self.hop, window=torch.hann_window(self.n_fft), return_complex=True)
        logmel = torch.log(self.fb @ spec.abs().pow(2) + 1e-6)                        # (B, mels, frames)
        stats = torch.cat([logmel.mean(-1), logmel.std(-1)], dim=1)                   # (B, 2 mels)
        stats = stats - stats.mean(1, keepdim=True)
        return torch.nn.functional.normalize(stats @ self.proj, dim=1).numpy()


# ----------------------------------------------------------------------------------------
# Hugging Face transformers CLAP
# ----------------------------------------------------------------------------------------

def _features(out) -> torch.Tensor:
    """get_audio_features / get_text_features: a tensor (transformers 4.x) or an output whose
    pooler_output holds the projected embedding (5.x)."""
    return out if torch.is_tensor(out) else out.pooler_output


class HFClapEncoder:
    """transformers' ClapModel and ClapProcessor: both modalities from one model.

    model: a hub id (downloaded and cached by huggingface_hub as usual; with HF_HUB_OFFLINE=1
    only the cache is read) or a local folder holding config.json, the weights, the feature
    extractor's preprocessor_config.json and the tokenizer (what save_pretrained writes).
    Audio: the feature extractor's own sampling_rate (48 kHz for LAION's checkpoints), window
    (max_length_s, 10 s) and padding ("repeatpad"). For "fusion" checkpoints is_longer is passed
    as it truly is (False: clips are cut to the window first); the feature extractor would mark a
    random clip of each batch as longer, a training-time trick that makes results depend on the
    batch. Captions: the model's RoBERTa tokenizer, padded per batch, cut at the model's
    maximum length.
    """
    has_text = True

    def __init__(self, model: str, device: str = "auto"):
        transformers = import_optional("transformers", "--encoder hf-clap")
        self.device = pick_device(device)
        try:
            self.processor = transformers.ClapProcessor.from_pretrained(model)
            self.model = transformers.ClapModel.from_pretrained(model).to(self.device).eval()
        except (OSError, ValueError) as e:
            raise DataError(hf_model_error(model, e)) from None
        fe = self.processor.feature_extractor
        self.sample_rate = int(fe.sampling_rate)
        self.clip_seconds = fe.nb_max_samples / fe.sampling_rate
        self.fusion = fe.truncation == "fusion"
        cfg = self.model.config.text_config
        longest = cfg.max_position_embeddings - (cfg.pad_token_id or 0) - 1   # RoBERTa positions start after pad
        self.max_tokens = min(longest, self.processor.tokenizer.model_max_length)
        self.name = f"hf-clap:{model}"

    @torch.no_grad()
    def embed_audio(self, clips: list[np.ndarray]) -> np.ndarray:
        """clips: mono float32 waveforms at self.sample_rate, each at most one window -> (B, D) unit rows."""
        inputs = self.processor.feature_extractor([np.asarray(c, np.float32) for c in clips],
                                                  sampling_rate=self.sample_rate, return_tensors="pt")
        if self.fusion:
            inputs["is_longer"] = torch.zeros_like(inputs["is_longer"])
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        return unit_rows(_features(self.model.get_audio_features(**inputs)))

    @torch.no_grad()
    def embed_text(self, captions: list[str]) -> np.ndarray:
        """captions -> (B, D) unit rows."""
        tokens = self.processor.tokenizer(captions, padding=True, truncation=True, max_length=self.max_tokens,
                                          return_tensors="pt")
        tokens = {k: v.to(self.device) for k, v in tokens.items()}
        return unit_rows(_features(self.model.get_text_features(**tokens)))


def hf_model_error(model: str, e: BaseException) -> str:
    """One line for a model that from_pretrained cannot load, saying what to do."""
    if os.path.isdir(model):
        return (f"--model {model}: a folder, but not a CLAP model and processor saved with save_pretrained "
                f"({_reason(e)})")
    if model.startswith((".", "/", "~")) or model.count("/") > 1:   # a path; hub ids are NAME or ORG/NAME
        return f"--model {model}: no such folder, and not a hub model id like laion/clap-htsat-unfused"
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    where = ("it is not in the Hugging Face cache and HF_HUB_OFFLINE is set" if offline else
             "it is not in the Hugging Face cache and the hub did not provide it (no network, or no such model)")
    return (f"--model {model}: cannot load it: {where}; download it once with a network (hf download {model}) "
            f"or give the folder it was saved to ({_reason(e)})")


# ----------------------------------------------------------------------------------------
# LAION-CLAP (laion_clap)
# ----------------------------------------------------------------------------------------

class LaionClapEncoder:
    """LAION-CLAP's CLAP_Module: 48 kHz, 10 s windows, the encoder AudioLDM conditions on.

    checkpoint: a local .pt; None lets laion_clap download its default (630k-audioset-best.pt,
    or the fusion one) into its package folder. amodel: the audio tower the checkpoint was
    trained with (HTSAT-tiny for LAION's 630k checkpoints, HTSAT-base for the music ones).
    CLAP_Module() always loads the `roberta-base` tokenizer and text model through transformers,
    from the Hugging Face cache or hub (even for audio only): offline, it must be cached.
    laion_clap quantises audio to 16 bits and repeat-pads it itself; its own prints go to stderr.
    """
    has_text, sample_rate, clip_seconds = True, 48000, 10.0

    def __init__(self, checkpoint: str | None, amodel: str = "HTSAT-tiny", fusion: bool = False,
                 device: str = "auto"):
        if checkpoint is not None and not os.path.isfile(checkpoint):
            raise DataError(f"--checkpoint {checkpoint}: no such file (a LAION-CLAP .pt; leave it out to let "
                            f"laion_clap download its default)")
        self.device = pick_device(device)
        with contextlib.redirect_stdout(sys.stderr):   # laion_clap prints progress to stdout
            laion_clap = import_optional("laion_clap", "--encoder laion-clap")
            try:
                self.model = laion_clap.CLAP_Module(enable_fusion=fusion, amodel=amodel, device=self.device)
            except OSError as e:   # transformers' from_pretrained('roberta-base')
                raise DataError(f"--encoder laion-clap: laion_clap loads its text model 'roberta-base' from the "
                                f"Hugging Face hub and cannot ({_reason(e)}); run once with a network so that it is "
                                f"cached, then HF_HUB_OFFLINE=1 works offline") from None
            except Exception as e:  # a bad amodel name, a broken install: one line, not a traceback
                raise DataError(f"--encoder laion-clap: CLAP_Module(amodel={amodel!r}, enable_fusion={fusion}) "
                                f"failed ({_reason(e)})") from None
            try:
                self.model.load_ckpt(checkpoint, verbose=False)
            except Exception as e:  # a download that fails, a checkpoint of another architecture
                what = checkpoint or "its default checkpoint (downloaded on first use)"
                raise DataError(f"--encoder laion-clap: cannot load {what} ({_reason(e)}); give --checkpoint PATH "
                                f"of a LAION-CLAP .pt matching --model {amodel}{' and --fusion' if fusion else ''}") from None
        ckpt = os.path.basename(checkpoint) if checkpoint else "default"
        self.name = f"laion-clap:{ckpt}:{amodel}{':fusion' if fusion else ''}"

    def embed_audio(self, clips: list[np.ndarray]) -> np.ndarray:
        """clips: mono float32 waveforms at 48 kHz, at most 10 s -> (B, 512) unit rows."""
        with torch.no_grad():
            return unit_rows(self.model.get_audio_embedding_from_data(x=[np.asarray(c, np.float32) for c in clips],
                                                                      use_tensor=False))

    def embed_text(self, captions: list[str]) -> np.ndarray:
        """captions -> (B, 512) unit rows (laion_clap's RoBERTa tokenizer, 77 tokens)."""
        with torch.no_grad():
            return unit_rows(self.model.get_text_embedding(list(captions), use_tensor=False))


def make_encoder(name: str, model: str | None = None, checkpoint: str | None = None, fusion: bool = False,
                 device: str = "auto"):
    """The encoder called `name` (ENCODER_NAMES), set up; DataError with one line if it cannot be."""
    if name == "logmel":
        return LogMelEncoder()
    if name == "hf-clap":
        return HFClapEncoder(model or "laion/clap-htsat-unfused", device)
    if name in ("laion-clap", "clap"):   # "clap": this command's earlier name for laion-clap
        return LaionClapEncoder(checkpoint, model or "HTSAT-tiny", fusion, device)
    raise DataError(f"--encoder {name}: unknown (use one of {', '.join(ENCODER_NAMES)})")


ENCODER_NAMES = ("logmel", "hf-clap", "laion-clap", "clap")
