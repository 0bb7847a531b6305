"""Retrieval metrics on hand-worked cases, and the Frechet distance against closed forms."""
import numpy as np
import pytest
import torch

import diffgap as dg
import diffgap_eval as ev


def test_single_relevant_item():
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.3],    # correct 0 -> rank 1
                           [0.9, 0.1, 0.5, 0.3],    # correct 2 -> rank 2
                           [0.2, 0.8, 0.6, 0.7]])   # correct 0 -> rank 4
    m = ev.retrieval_metrics(scores, torch.tensor([0, 2, 0]), ks=(1, 2, 5))
    assert m["R@1"] == pytest.approx(1 / 3)
    assert m["R@2"] == pytest.approx(2 / 3)
    assert m["R@5"] == pytest.approx(1.0)
    assert m["median_rank"] == 2.0
    assert m["mAP@10"] == pytest.approx((1 + 1 / 2 + 1 / 4) / 3)


def test_several_relevant_items_per_query():
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5],
                           [0.1, 0.2, 0.3, 0.4, 0.5]])
    rel = torch.tensor([[False, True, False, True, False],   # hits at ranks 2 and 4
                        [True, False, False, False, False]])  # hit at rank 5
    m = ev.retrieval_metrics(scores, rel, ks=(1, 2, 5))
    assert m["R@1"] == 0.0 and m["R@2"] == 0.5 and m["R@5"] == 1.0
    assert m["median_rank"] == pytest.approx(3.5)  # mean of the two middle ranks, 2 and 5
    ap0 = (1 / 2 + 2 / 4) / 2                       # precision at each hit over min(n_rel, 10)
    ap1 = (1 / 5) / 1
    assert m["mAP@10"] == pytest.approx((ap0 + ap1) / 2)


def test_map_at_10_never_exceeds_one():
    torch.manual_seed(0)
    scores = torch.randn(20, 30)
    rel = torch.zeros(20, 30, dtype=torch.bool)
    rel[:, :15] = True   # 15 relevant items, more than 10
    scores[:, :15] += 10  # all ranked first
    m = ev.retrieval_metrics(scores, rel)
    assert m["mAP@10"] == pytest.approx(1.0)


def test_ties_go_to_the_lower_gallery_index():
    scores = torch.tensor([[0.5, 0.5, 0.5]])
    assert ev.retrieval_metrics(scores, torch.tensor([0]))["R@1"] == 1.0
    assert ev.retrieval_metrics(scores, torch.tensor([2]), ks=(1, 2, 3))["R@2"] == 0.0


def test_bad_relevance_is_refused():
    with pytest.raises(ValueError, match="no relevant"):
        ev.retrieval_metrics(torch.randn(2, 3), torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="shape"):
        ev.retrieval_metrics(torch.randn(2, 3), torch.zeros(2, 4, dtype=torch.bool))


def test_frechet_distance_closed_forms():
    torch.manual_seed(0)
    x = torch.randn(500, 6, dtype=torch.float64) @ torch.randn(6, 6, dtype=torch.float64)
    assert ev.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)
    # y = 2x + 1: S_y = 4 S_x commutes with S_x, so FD = |mu_x - mu_y|^2 + tr(S_x)
    y = 2 * x + 1
    xn = x.numpy()
    expected = np.sum((xn.mean(0) - (2 * xn + 1).mean(0)) ** 2) + np.trace(np.cov(xn.T))
    assert ev.frechet_distance(x, y) == pytest.approx(expected, rel=1e-8)
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2
    u, v = torch.randn(1000, 1, dtype=torch.float64), 3 * torch.randn(1000, 1, dtype=torch.float64) + 2
    s1, s2 = np.std(u.numpy(), ddof=1), np.std(v.numpy(), ddof=1)
    expected = (u.mean() - v.mean()).item() ** 2 + (s1 - s2) ** 2
    assert ev.frechet_distance(u, v) == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_is_symmetric_for_non_commuting_covariances():
    torch.manual_seed(1)
    x = torch.randn(400, 5) @ torch.randn(5, 5)
    y = torch.randn(400, 5) @ torch.randn(5, 5) + 0.5
    assert ev.frechet_distance(x, y) == pytest.approx(ev.frechet_distance(y, x), rel=1e-6)
    assert ev.frechet_distance(x, y) > 0


@pytest.mark.parametrize("dims", [(16, 16), (16, 24)])   # the two halves may differ in dim
def test_every_score_is_one_inner_product_and_ranks_like_its_dense_formula(dims):
    d_q, d_g = dims
    g = torch.Generator().manual_seed(0)
    q, g_hat, gal, q_hat = (torch.randn(n, d, generator=g) for n, d in ((30, d_q), (30, d_g), (50, d_g), (50, d_q)))
    names = ev.score_names(d_q == d_g)
    assert names == (["contrastive", "diffgap", "blend-0.25", "blend-0.5", "blend-0.75", "two-way",
                      "two-way-blend-0.25", "two-way-blend-0.5", "two-way-blend-0.75"] if d_q == d_g
                     else ["diffgap", "two-way"])
    single = torch.randint(0, 50, (30,), generator=g)
    many = torch.rand(30, 50, generator=g) < 0.1
    many[torch.arange(30), single] = True
    for name in names:
        learned, lam = ev.parse_score(name)
        dense = ev.cosine_scores(g_hat, gal) if learned == "diffgap" else \
            (ev.cosine_scores(g_hat, gal) + ev.cosine_scores(q, q_hat)) / 2
        if lam < 1:
            dense = (1 - lam) * ev.cosine_scores(q, gal) + lam * dense
        qv, gv = ev.query_side(name, q, g_hat), ev.gallery_side(name, gal, q_hat)
        assert qv.shape[1] == gv.shape[1] == (d_g if learned == "diffgap" else d_g + d_q)
        assert torch.allclose(gv.norm(dim=1), torch.ones(50), atol=1e-6)      # unit rows: ready for an index
        assert torch.allclose(qv @ gv.T, dense / (1 if learned == "diffgap" else 2 ** 0.5), atol=1e-5), name
        for relevant in (single, many):
            assert ev.score_retrieval(q, gal, relevant, g_hat, q_hat, scores=[name])[name]["R@1"] == \
                pytest.approx(ev.retrieval_metrics(dense, relevant)["R@1"])


def test_score_names_parse_and_bad_names_are_refused():
    assert ev.parse_score("two-way-blend-0.3") == ("two-way", 0.3)
    assert ev.parse_score("blend-0.25") == ("diffgap", 0.25)
    assert ev.parse_score("contrastive") == ("diffgap", 0.0)
    for bad in ("blend-1", "blend-0", "blend-x", "two-way-blend-", "cosine", "xblend-0.5", "blend-nan", "two-way-0.5"):
        with pytest.raises(ValueError, match="unknown score"):
            ev.parse_score(bad)


def test_choice_on_validation_takes_the_best_and_the_simpler_on_a_tie():
    m = lambda r, lo=0.01: {"R@1": r, "gain lo adjusted": lo}     # gains beyond noise unless lo <= 0
    assert ev.choose_score({"contrastive": m(0.5), "diffgap": m(0.6), "two-way": m(0.7)}) == "two-way"
    assert ev.choose_score({"contrastive": m(0.7), "diffgap": m(0.6), "two-way": m(0.7)}) == "contrastive"
    assert ev.choose_score({"contrastive": m(0.5), "diffgap": m(0.6), "blend-0.5": m(0.6)}) == "diffgap"
    assert ev.choose_score({"contrastive": m(0.5), "diffgap": m(0.6), "two-way": m(0.7, lo=0.0)}) == "diffgap"
    assert ev.choose_score({"contrastive": m(0.5), "diffgap": m(0.6, -0.1), "two-way": m(0.7, -0.01)}) == "contrastive"
    assert ev.choose_score({"diffgap": m(0.6, None), "two-way": m(0.7, None)}) == "two-way"   # no contrastive: dims differ


def test_bootstrap_interval_covers_the_mean_with_the_binomial_width():
    hits = (torch.rand(1000, generator=torch.Generator().manual_seed(0)) < 0.3).float()
    lo, hi = ev.bootstrap_interval(hits)
    assert lo < hits.mean().item() < hi
    assert 0.045 < hi - lo < 0.07                   # 2 x 1.96 sqrt(0.3 x 0.7 / 1000) = 0.057
    assert ev.bootstrap_interval(torch.ones(50)) == (1.0, 1.0)
    assert ev.bootstrap_interval(hits) == (lo, hi)  # seeded: the same interval every time


def test_tied_correct_items_beyond_the_top_10_in_different_chunks_count_the_first():
    """The streamed metric's second pass ranks the first of two tied correct items, not the later one."""
    q = torch.tensor([[1.0, 0.0]])
    g = torch.cat([torch.tensor([[1.0, 0.0]]).repeat(12, 1),       # 12 items ahead of every correct one
                   torch.tensor([[0.6, 0.8]]).repeat(12, 1)])      # 12 tied items, chunks 8..15 and 16..23
    rel = torch.zeros(1, 24, dtype=torch.bool)
    rel[0, [13, 21]] = True                                        # two tied correct items in two chunks
    m, ranks = ev.retrieval_metrics_from_embeddings(q, g, rel, chunk=8, return_ranks=True)
    assert ranks.tolist() == [14]                                  # 12 ahead, then item 12 (a lower index)
    assert m == ev.retrieval_metrics(ev.cosine_scores(q, g), rel)


def test_the_streamed_metrics_take_their_top_10_from_the_kernel(monkeypatch):
    """The one streaming top-k: kernels.cosine_topk, routed by diffgap.KERNELS, gives the top 10 the metrics read."""
    g = torch.Generator().manual_seed(0)
    q, gal = torch.randn(30, 8, generator=g), torch.randn(50, 8, generator=g)
    calls, real = [], ev.cosine_topk

    def spy(queries, gallery, k, **kw):
        calls.append((tuple(queries.shape), tuple(gallery.shape), k, kw))
        return real(queries, gallery, k, **kw)
    monkeypatch.setattr(ev, "cosine_topk", spy)
    m = ev.retrieval_metrics_from_embeddings(q, gal, torch.arange(30))
    assert calls == [((30, 8), (50, 8), 10, {"backend": "auto", "strict": False})]
    assert m == ev.retrieval_metrics(ev.cosine_scores(q, gal), torch.arange(30))
    monkeypatch.setattr(dg, "KERNELS", "torch")
    ev.retrieval_metrics_from_embeddings(q, gal, torch.arange(30))
    assert calls[-1][3] == {"backend": "torch", "strict": False}
    # its answer is what the metrics report: a top 10 holding each query's correct item first is R@1 = 1
    monkeypatch.setattr(ev, "cosine_topk", lambda queries, gallery, k, **kw:
                        (torch.zeros(len(queries), k), torch.arange(len(queries))[:, None].repeat(1, k)))
    assert ev.retrieval_metrics_from_embeddings(q, gal, torch.arange(30))["R@1"] == 1.0
