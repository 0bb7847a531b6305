"""The synthetic default must look like a real contrastive space (Liang et al. 2022) and leave headroom."""
import pytest
import torch

import diffgap_eval as ev
import embed_cache
from embed_cache import synthetic_dataset


@pytest.fixture(scope="module", params=["audio-video", "audio-text"])
def data(request):
    return synthetic_dataset(request.param, n_train=2000)


def test_deterministic():
    x = synthetic_dataset("audio-video", n_train=50, n_val=5, n_test=5)
    y = synthetic_dataset("audio-video", n_train=50, n_val=5, n_test=5)
    z = synthetic_dataset("audio-video", seed=1, n_train=50, n_val=5, n_test=5)
    assert torch.equal(x.splits["test"].b, y.splits["test"].b)
    assert not torch.allclose(x.splits["test"].b, z.splits["test"].b)


def test_layout(data):
    test = data.splits["test"]
    k = 5 if data.pair == "audio-text" else 1
    assert test.a.shape == (1000, 512) and test.b.shape == (1000 * k, 512)
    assert torch.equal(test.b_to_a, torch.arange(1000).repeat_interleave(k))
    assert torch.allclose(test.a.norm(dim=1), torch.ones(1000), atol=1e-5)


def test_geometry_matches_real_contrastive_spaces(data):
    test = data.splits["test"]
    a, b = test.a, test.b
    pair_cos = (a[test.b_to_a] * b).sum(1).mean().item()
    cross = a @ b.T
    owner = test.b_to_a[None, :] == torch.arange(len(a))[:, None]
    non_pair = cross[~owner].mean().item()
    within = [(x @ x.T).sum().sub(len(x)).item() / (len(x) * (len(x) - 1)) for x in (a, b)]
    gap = (a.mean(0) - b.mean(0)).norm().item()
    assert 0.25 <= pair_cos <= 0.45
    assert 0.0 < non_pair < pair_cos - 0.08
    assert 0.6 <= gap <= 1.0
    assert all(0.3 <= w <= 0.8 for w in within)


def test_contrastive_baseline_is_far_from_perfect_with_headroom(data):
    test = data.splits["test"]
    for d in (0, 1):
        q, g, rel = test.retrieval(d)
        r1 = ev.retrieval_metrics(ev.cosine_scores(q, g), rel)["R@1"]
        ceiling = ev.retrieval_metrics(data.oracle(q, g, d), rel)["R@1"]
        assert 0.05 <= r1 <= 0.40
        assert ceiling > r1 + 0.3


def test_the_default_data_is_what_it_was_before_the_presets():
    # golden values from the generator before presets and variants were added
    for pair, a0, b_last in (("audio-video", [-0.0507191, -0.0391998, 0.0603960], [-0.0749916, 0.0052571, 0.0663178]),
                             ("audio-text", [-0.0008040, 0.0210630, -0.0719628], [0.0251414, 0.0645819, 0.0671346])):
        test = synthetic_dataset(pair, n_train=50, n_val=5, n_test=5).splits["test"]
        assert torch.allclose(test.a[0, :3], torch.tensor(a0), atol=1e-6)
        assert torch.allclose(test.b[-1, :3], torch.tensor(b_last), atol=1e-6)
        spec = embed_cache.load("synthetic:n_train=50,n_val=5,n_test=5", pair).splits["test"]   # the commands' way
        assert torch.equal(spec.a, test.a) and torch.equal(spec.b, test.b)


def test_multimodal_audio_has_variants_that_video_does_not_show():
    # one class, no within-class spread: the video embeddings form one blob, the audio four
    # (3 directions of between-variant spread stand out of the covariance spectrum)
    from embed_cache.synthetic import SyntheticSpace, make_config
    space = SyntheticSpace("audio-video", make_config(preset="multimodal", classes=1, class_share=1.0))
    split = space.sample_split(2000)
    spectrum = lambda x: torch.linalg.eigvalsh(torch.cov(x.T.double())).flip(0)
    audio, video = spectrum(split.a), spectrum(split.b)
    assert audio[2] > 1.5 * audio[3] and video[0] < 1.3 * video[3]


def test_presets_fill_only_what_is_not_given():
    from embed_cache.synthetic import make_config
    assert make_config(preset="aligned").n_train == 800 and make_config(preset="aligned", n_train=500).n_train == 500
    with pytest.raises(ValueError, match="unknown preset 'x'"):
        make_config(preset="x")
