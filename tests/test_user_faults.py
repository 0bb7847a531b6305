"""Faults that users of diffusion and retrieval code report elsewhere, each with its small input
and the right value: non-finite embeddings, one ordering per query, a diverging run, a
half-precision model, the median-rank convention and a score chosen on noise."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import diffgap as dg
import diffgap_eval as ev
from diffgap_eval import MEDR_LEGEND, retrieval_table
from train import some_parameters_idle

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- non-finite embeddings are refused, naming the row and its side ---------------------------
def six_pairs(side: str, row: int = 5):
    q = torch.eye(6, 8)
    g = q.clone()
    (g if side == "gallery" else q)[row] = float("nan")
    return q, g


@pytest.mark.parametrize("side", ["query", "gallery"])
def test_a_non_finite_row_is_named_by_every_metric_entry_point(side):
    q, g = six_pairs(side)
    assert ev.retrieval_metrics(ev.cosine_scores(torch.eye(6, 8), torch.eye(6, 8)), torch.arange(6))["R@1"] == 1.0
    calls = {   # name: (call, the words naming the bad row's side for a bad query / gallery row)
        "cosine_scores": (lambda: ev.cosine_scores(q, g), "query", "gallery"),
        "streamed, labels": (lambda: ev.retrieval_metrics_from_embeddings(q, g, torch.arange(6)), "query", "gallery"),
        "streamed, mask": (lambda: ev.retrieval_metrics_from_embeddings(q, g, torch.eye(6, dtype=torch.bool), chunk=4),
                           "query", "gallery"),
        "score_retrieval": (lambda: ev.score_retrieval(q, g, torch.arange(6), torch.eye(6, 8), torch.eye(6, 8)),
                            "query", "gallery"),
        "paired_cosine": (lambda: ev.paired_cosine(q, g, torch.arange(6)), "generated", "gallery"),
        "frechet_distance": (lambda: ev.frechet_distance(q, g), "first set", "second set"),
    }
    for name, (call, query_word, gallery_word) in calls.items():
        word = query_word if side == "query" else gallery_word
        with pytest.raises(ValueError, match=rf"^{word} row 5 is not finite"):
            call()


def test_non_finite_scores_and_translations_are_refused():
    scores = torch.rand(3, 4)
    scores[1, 2] = float("inf")
    with pytest.raises(ValueError, match=r"scores row 1 is not finite"):
        ev.retrieval_metrics(scores, torch.tensor([0, 1, 2]))
    q = torch.eye(4)
    bad = q.clone()
    bad[2, 0] = float("nan")
    with pytest.raises(ValueError, match=r"query translation row 2"):
        ev.score_retrieval(q, q, torch.arange(4), bad, q)
    with pytest.raises(ValueError, match=r"gallery translation row 2"):
        ev.score_retrieval(q, q, torch.arange(4), q, bad)


# -- every metric of a query comes from one ordering ------------------------------------------
def test_a_tie_gives_the_same_metrics_as_labels_and_as_a_mask():
    v = torch.tensor([[0.6, 0.8]])
    g = torch.cat([3 * v, v])       # the same direction: a tie, item 0 first by the lower-index rule
    for relevant in (torch.tensor([1]), torch.tensor([[False, True]])):
        for m in (ev.retrieval_metrics(ev.cosine_scores(v, g), relevant),
                  ev.retrieval_metrics_from_embeddings(v, g, relevant)):
            assert (m["R@1"], m["R@5"], m["median_rank"], m["mAP@10"]) == (0.0, 1.0, 2.0, 0.5)
    # a direction whose two normalised copies differ in the last bit: whichever comes first, both
    # relevance forms and every metric agree (R@1 = 1 exactly when AP@10 = 1)
    v = torch.tensor([[-0.5663174986839294, 0.3731146454811096, -0.8919953107833862, -1.5091077089309692]])
    g = torch.cat([3 * v, v])
    by_label = ev.retrieval_metrics_from_embeddings(v, g, torch.tensor([1]))
    assert by_label == ev.retrieval_metrics_from_embeddings(v, g, torch.tensor([[False, True]]))
    assert by_label["mAP@10"] == (1.0 if by_label["R@1"] == 1.0 else 0.5)


def near_tie_gallery(n=400, d=32, seed=0):
    """Gallery rows that are rescaled copies of a few directions: exact and rounding-level ties."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(5, d, generator=g)
    cluster = torch.randint(0, 5, (n,), generator=g)
    gallery = dirs[cluster] * torch.rand(n, 1, generator=g).add(0.1) * 7
    of_query = torch.randint(0, 5, (30,), generator=g)
    queries = dirs[of_query] + 1e-7 * torch.randn(30, d, generator=g)
    # each query's correct item: one of the first 12 items of its own direction, so ranks fall in the top 10
    labels = torch.stack([(cluster == c).nonzero()[int(torch.randint(0, 12, (1,), generator=g)), 0] for c in of_query])
    return queries, gallery, labels


@pytest.mark.parametrize("chunk", [8192, 64, 7])
def test_near_ties_rank_alike_by_label_mask_and_chunk(chunk):
    q, g, labels = near_tie_gallery()
    mask = F.one_hot(labels, len(g)).bool()
    by_label, ranks = ev.retrieval_metrics_from_embeddings(q, g, labels, chunk=chunk, return_ranks=True)
    by_mask = ev.retrieval_metrics_from_embeddings(q, g, mask, chunk=chunk)
    assert by_label == by_mask
    # the one ordering: the rank of each label is 1 + the items ahead of it, ties to the lower index
    s = ev.cosine_scores(q, g) if chunk >= len(g) else None
    if s is not None:
        assert by_label == ev.retrieval_metrics(s, labels)
        ahead = (s > s.gather(1, labels[:, None])) | ((s == s.gather(1, labels[:, None])) &
                                                      (torch.arange(len(g)) < labels[:, None]))
        assert torch.equal(ranks, ahead.sum(1) + 1)
    assert by_label["mAP@10"] == pytest.approx(torch.where(ranks <= 10, 1.0 / ranks, 0.0).mean().item())
    assert 0 < by_label["mAP@10"] < 1   # the case exercises ties inside the top 10


def test_tied_correct_items_in_different_chunks_count_the_first():
    q = torch.tensor([[1.0, 0.0]])
    g = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])   # two identical correct rows, chunks of 2
    rel = torch.tensor([[False, False, False, True]])
    m = ev.retrieval_metrics_from_embeddings(q, g, rel, chunk=2)
    assert m["R@1"] == 0.0 and m["median_rank"] == 2.0    # item 1 ties with item 3 and comes first
    rel = torch.tensor([[False, True, False, True]])
    m = ev.retrieval_metrics_from_embeddings(q, g, rel, chunk=2)
    assert m["R@1"] == 1.0 and m["mAP@10"] == 1.0 and m == ev.retrieval_metrics(ev.cosine_scores(q, g), rel)


# -- the median rank's convention ---------------------------------------------------------------
def test_median_rank_is_the_median_of_one_based_ranks_and_the_table_says_so():
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.9, 0.1, 0.0], [0.9, 0.5, 0.0], [0.9, 0.5, 0.3]])
    m = ev.retrieval_metrics(scores, torch.tensor([0, 0, 1, 2]))          # ranks 1, 1, 2, 3
    assert m["median_rank"] == 1.5
    assert ev.retrieval_metrics_from_embeddings(torch.eye(4), torch.eye(4), torch.arange(4))["median_rank"] == 1.0
    table = retrieval_table({0: {"contrastive": m}}, "t")
    assert table.splitlines()[2].split()[-1] == "1.5" and table.endswith(MEDR_LEGEND)
    assert "floor(median of 0-based ranks) + 1" in MEDR_LEGEND


# -- a half-precision model keeps a full-precision schedule -------------------------------------
TINY = dict(dim_a=16, dim_b=12, hidden=32, inner=16, time_dim=16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_sample_with_every_step_count(dtype):
    torch.manual_seed(0)
    full = dg.DiffGAP(dg.DiffGAPConfig(**TINY)).eval()
    half = dg.DiffGAP(dg.DiffGAPConfig(**TINY))
    half.load_state_dict(full.state_dict())
    half = half.to(dtype).eval()
    assert half.alpha_bar.dtype == torch.float32 and float(half.alpha_bar[0]) < 1.0   # not rounded to 1
    assert half.net.fc_dtype() if hasattr(half.net, "fc_dtype") else next(half.net.parameters()).dtype == dtype
    cond = F.normalize(torch.randn(6, 12), dim=-1)
    for kw in (dict(steps=1000), dict(steps=1000, sampler="ddpm"), dict(steps=5, guidance=4.0), dict(steps=1)):
        x = half.sample(cond.to(dtype), 0, generator=torch.Generator().manual_seed(0), **kw)
        assert x.dtype == dtype and x.shape == (6, 16) and torch.isfinite(x).all(), kw
        assert torch.allclose(x.float().norm(dim=1), torch.ones(6), atol=2e-2)
    ref = full.sample(cond, 0, steps=5, generator=torch.Generator().manual_seed(0))
    x = half.sample(cond.to(dtype), 0, steps=5, generator=torch.Generator().manual_seed(0))
    assert (x.float() - ref).abs().max() < (0.02 if dtype == torch.float16 else 0.1)
    loss = half.loss(F.normalize(torch.randn(4, 16), dim=-1).to(dtype), cond[:4].to(dtype), 0,
                     torch.tensor([0, 1, 500, 999]), torch.randn(4, 16, dtype=dtype))
    assert torch.isfinite(loss)


# -- a diverging run stops at once and keeps the last good checkpoint ---------------------------
def test_a_non_finite_loss_stops_training_before_its_update():
    torch.manual_seed(0)
    model = dg.DiffGAP(dg.DiffGAPConfig(**TINY, switch_every=1000))
    a, b = F.normalize(torch.randn(64, 16), dim=-1), F.normalize(torch.randn(64, 12), dim=-1)
    opt = dg.make_optimizer(model, 1e-3)
    steps = dg.train_steps(model, a, b, opt, 10, batch_size=16)
    next(steps)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.net.x_in[0].weight[0, 0] = float("nan")                 # the next loss is NaN
    with pytest.raises(FloatingPointError, match=r"step 2: the loss is nan"):
        next(steps)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in after if k != "net.x_in.0.weight")


def test_a_diverging_run_reports_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--data",
           "synthetic:dim=32,rank=8,classes=20,n_train=640,n_val=64,n_test=64", "--epochs", "3", "--lr", "1e4",
           "--num-samples", "2", "--out", str(tmp_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    err = res.stderr.strip().splitlines()[-1]
    assert res.returncode == 2 and err.startswith("error: training diverged at step ") and "--lr" in err, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    ckpt = tmp_path / "audio-video" / "ckpt.pt"
    saved = torch.load(ckpt, weights_only=True)
    assert f"left as saved at step {saved['step']}" in err
    assert ev.non_finite(saved["model"]) == ""                      # the checkpoint on disk is a good one
    model, _ = ev.load_checkpoint(str(ckpt))
    assert os.listdir(tmp_path / "audio-video") == ["ckpt.pt"]        # nothing computed from a diverged model
    # a checkpoint that holds non-finite weights is refused in one line, by every command
    saved["model"]["net.null_cond"][0] = float("nan")
    torch.save(saved, ckpt)
    with pytest.raises(ValueError, match=r"ckpt.pt: 1 of [\d,]+ values are not finite \(first: net.null_cond\)"):
        ev.load_checkpoint(str(ckpt))
    res = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--ckpt", str(ckpt)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "not finite" in res.stderr


# -- data parallel: every option that leaves parameters idle -----------------------------------
@pytest.mark.parametrize("p_uncond", [0.0, 0.1])
@pytest.mark.parametrize("dims", [(16, 16), (16, 12)])
@pytest.mark.parametrize("direction_embedding", [True, False])
def test_the_idle_parameter_rule_matches_real_gradients(p_uncond, dims, direction_embedding):
    cfg = dg.DiffGAPConfig(dim_a=dims[0], dim_b=dims[1], hidden=32, inner=16, time_dim=16, p_uncond=p_uncond,
                           direction_embedding=direction_embedding)
    model = dg.DiffGAP(cfg)
    idle = False
    for direction in (0, 1):
        model.net.zero_grad(set_to_none=True)
        target, cond = (torch.randn(8, dims[direction]), torch.randn(8, dims[1 - direction]))
        drop = torch.rand(8) < p_uncond if p_uncond > 0 else None          # as train_steps draws it
        model.loss(target, cond, direction, torch.randint(0, 1000, (8,)), torch.randn(8, dims[direction]),
                   drop).backward()
        idle |= any(p.grad is None for p in model.net.parameters())
    assert some_parameters_idle(cfg) == idle


def test_torchrun_without_condition_dropout_equals_one_process(tmp_path):
    args = ["--data", "synthetic:dim=32,rank=8,classes=20,n_train=256,n_val=20,n_test=20", "--epochs", "2",
            "--switch-every", "4", "--no-eval", "--p-uncond", "0"]
    launchers = {"one": [sys.executable], "two": [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                  "--nproc_per_node", "2"]}
    models = {}
    for name, launcher in launchers.items():
        res = subprocess.run(launcher + [os.path.join(ROOT, "train.py"), *args, "--out", str(tmp_path / name)],
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        models[name] = torch.load(tmp_path / name / "audio-video" / "ckpt.pt", weights_only=True)
    assert models["one"]["step"] == models["two"]["step"] == 8
    one, two = models["one"]["model"], models["two"]["model"]
    assert max((one[k].double() - two[k].double()).abs().max().item() for k in one) < 1e-4


# -- a learned score replaces contrastive only beyond noise --------------------------------------
def noisy_split(n=100, d=16, seed=0):
    """Validation rows where every learned score is contrastive's ranking plus noise."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, d, generator=g)
    gallery = q + 1.2 * torch.randn(n, d, generator=g)
    noise = lambda x: x + 0.5 * torch.randn(x.shape, generator=g)
    return q, gallery, torch.arange(n), noise(q), noise(gallery)


def test_a_score_chosen_on_noise_keeps_contrastive():
    q, gallery, rel, g_hat_q, q_hat_g = noisy_split()
    results = ev.score_retrieval(q, gallery, rel, g_hat_q, q_hat_g)
    noise_winner = max(results, key=lambda name: results[name]["R@1"])
    assert noise_winner != "contrastive" and results[noise_winner]["gain"] > 0      # the old rule's pick
    assert ev.choose_score(results) == "contrastive"
    assert "no learned score's validation gain is beyond noise" in ev.choice_reason(results, "contrastive")
    # a real gain is kept: the translations carry the answer
    results = ev.score_retrieval(q, gallery, rel, gallery + 0.3 * torch.randn(gallery.shape), q_hat_g)
    chosen = ev.choose_score(results)
    assert chosen != "contrastive" and results[chosen]["gain lo adjusted"] > 0
    assert "beyond noise" in ev.choice_reason(results, chosen)


# -- a checkpoint is user input: every entry a command reads is checked, naming the file --------
SPEC = "synthetic:dim=16,rank=4,classes=8,n_train=64,n_val=16,n_test=16"
MISSING = object()


def write_checkpoint(path, old_layout=False, **change):
    """A checkpoint as train.py writes it (tiny model, SPEC's dims), with entries changed or removed:
    "config.X" and "run.X" name entries inside those dicts. old_layout: as the earlier train.py
    wrote it (run settings at the top level, config["center"], "compile")."""
    torch.manual_seed(0)
    model = dg.DiffGAP(dg.DiffGAPConfig(dim_a=16, dim_b=16, hidden=16, inner=8, depth=1, time_dim=8))
    run = dict(pair="audio-video", data=SPEC, epochs=1, batch_size=16, lr=1e-3, seed=0, direction="both")
    ev.save_checkpoint(str(path), model, optimizer=dg.make_optimizer(model).state_dict(), step=4, run=run)
    ckpt = torch.load(path, weights_only=True)
    if old_layout:
        ckpt.update(ckpt.pop("run"), compile=False)
        ckpt["config"]["center"] = True
    for key, value in change.items():
        part, _, name = key.rpartition(".")
        where = ckpt[part] if part else ckpt
        if value is MISSING:
            del where[name]
        else:
            where[name] = value
    torch.save(ckpt, path)


def one_error_line(capsys, main, argv) -> str:
    with pytest.raises(SystemExit) as stop:
        ev.run_cli(lambda: main(argv))
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    return err


BAD_ENTRIES = [   # (entry, value), and the words the line must hold after the file's name
    ("step", MISSING, "no 'step' entry"), ("step", "x", "entry 'step' is 'x'; expected an integer >= 0"),
    ("step", -1, "entry 'step' is -1"), ("step", 2.5, "entry 'step' is 2.5"),
    ("run.pair", MISSING, "no 'pair' entry"), ("run.pair", "audio-image", "entry 'pair' is 'audio-image'"),
    ("run.data", MISSING, "no 'data' entry"), ("run.data", 3, "entry 'data' is 3; expected a data spec"),
    ("config.switch_every", 0, "DiffGAPConfig.switch_every is 0; expected an integer >= 1"),
    ("config.time_dim", 7, "DiffGAPConfig.time_dim is 7; expected an even integer"),
    ("config.p_uncond", 1.5, "DiffGAPConfig.p_uncond is 1.5; expected a number in [0, 1)"),
    ("config.width", 3, "unexpected keyword argument 'width'"),
]


@pytest.mark.parametrize("key,value,words", BAD_ENTRIES)
def test_a_bad_checkpoint_entry_is_one_line_naming_the_file_in_sample_and_resume(tmp_path, capsys, key, value, words):
    import sample
    import train
    path = tmp_path / "audio-video" / "ckpt.pt"
    path.parent.mkdir()
    write_checkpoint(path, **{key: value})
    for main, argv in ((sample.main, ["--ckpt", str(path), "--device", "cpu"]),
                       (train.main, ["--resume", str(path), "--out", str(tmp_path), "--device", "cpu"])):
        err = one_error_line(capsys, main, argv)
        assert err.startswith(f"error: {path}: ") and words in err, err


@pytest.mark.parametrize("key,value,words", [
    ("optimizer", MISSING, "no 'optimizer' entry"), ("optimizer", {"lr": 1}, "entry 'optimizer' is a dict without"),
    ("run.lr", float("nan"), "entry 'lr' is nan"), ("run.batch_size", 0, "entry 'batch_size' is 0"),
    ("run.epochs", "30", "entry 'epochs' is '30'"), ("run.direction", "up", "entry 'direction' is 'up'"),
    ("run.seed", 1.5, "entry 'seed' is 1.5"), ("run.batch_size", MISSING, "no 'batch_size' entry"),
])
def test_the_entries_only_resume_reads_are_checked_too(tmp_path, capsys, key, value, words):
    import train
    path = tmp_path / "audio-video" / "ckpt.pt"
    path.parent.mkdir()
    write_checkpoint(path, **{key: value})
    err = one_error_line(capsys, train.main, ["--resume", str(path), "--out", str(tmp_path), "--device", "cpu"])
    assert err.startswith(f"error: {path}: ") and words in err, err


def test_another_models_optimizer_state_is_one_line_on_resume(tmp_path, capsys):
    import train
    path = tmp_path / "audio-video" / "ckpt.pt"
    path.parent.mkdir()
    other = dg.DiffGAP(dg.DiffGAPConfig(dim_a=16, dim_b=16, hidden=16, inner=8, depth=2, time_dim=8))
    write_checkpoint(path, optimizer=dg.make_optimizer(other).state_dict())
    err = one_error_line(capsys, train.main, ["--resume", str(path), "--out", str(tmp_path), "--device", "cpu"])
    assert err.startswith(f"error: {path}: its optimizer state does not fit the model"), err
    # the unchanged checkpoint resumes (the entries above are what train.py writes)
    write_checkpoint(path)
    with pytest.raises(SystemExit) as stop:
        ev.run_cli(lambda: train.main(["--resume", str(path), "--out", str(tmp_path), "--device", "cpu", "--no-eval"]))
    assert stop.value.code == 0, capsys.readouterr().err


def test_a_checkpoint_of_the_earlier_layout_loads_samples_and_resumes(tmp_path, capsys):
    """Checkpoints written before the run settings became one "run" entry keep working."""
    import sample
    import train
    path = tmp_path / "audio-video" / "ckpt.pt"
    path.parent.mkdir()
    write_checkpoint(path, old_layout=True)
    model, ckpt = ev.load_checkpoint(str(path))
    assert ckpt["run"]["data"] == SPEC and ckpt["run"]["batch_size"] == 16 and "compile" not in ckpt
    write_checkpoint(path, old_layout=True, data=3)
    assert one_error_line(capsys, sample.main, ["--ckpt", str(path)]).startswith(f"error: {path}: entry 'data' is 3")
    write_checkpoint(path, old_layout=True)
    for main, argv in ((train.main, ["--resume", str(path), "--out", str(tmp_path), "--no-eval"]),
                       (sample.main, ["--ckpt", str(path), "--num-samples", "1"])):
        with pytest.raises(SystemExit) as stop:
            ev.run_cli(lambda: main(argv))
        assert stop.value.code == 0, capsys.readouterr().err
