"""The identity split (choose settings on one half of the people, report on the other)."""

import pytest

from faceemd.data.identity_split import identity_half


def test_halves_are_disjoint_cover_everyone_and_do_not_depend_on_order():
    names = [f"p{i % 7}" for i in range(40)]
    a, b = identity_half(names, 0), identity_half(names, 1)
    assert a.isdisjoint(b) and a | b == set(names)
    assert (len(a), len(b)) == (4, 3)  # ceil and floor of 7 / 2
    assert identity_half(list(reversed(names)), 0) == a  # a set of names, not their order
    assert identity_half(names, 0, seed=1) != a or identity_half(names, 0, seed=2) != a
    with pytest.raises(ValueError, match="0 or 1"):
        identity_half(names, 2)


def test_the_halves_rank_the_whole_set_s_queries_between_them(compose_evaluate, tmp_path):
    """Against the same (whole) gallery each query's ranking does not depend on the other
    queries: the halves' query counts add up and their P@1 average to the whole set's."""
    from faceemd.jobs.evaluate import run_evaluation

    base = [f"paths.log_dir={tmp_path}", "data.query.num_identities=9", "rerank.top_k=5",
            "backbone=tiny_cnn", "logger=none", "trainer.enable_progress_bar=false"]  # fmt: skip
    whole = run_evaluation(compose_evaluate(base))
    halves = [run_evaluation(compose_evaluate([*base, f"identity_half={h}"])) for h in (0, 1)]
    counts = [int(h["eval/num_queries"]) for h in halves]
    assert sum(counts) == whole["eval/num_queries"] and min(counts) > 0
    assert [h["eval/identity_half"] for h in halves] == [0, 1]
    assert halves[0]["eval/gallery_size"] == whole["eval/gallery_size"]
    assert not list(tmp_path.rglob("skipped_images.json"))  # the other half is not "skipped"
    for stage in ("stage1", "stage2"):
        mean = sum(n * h[f"{stage}/p_at_1"] for n, h in zip(counts, halves, strict=True)) / sum(
            counts
        )
        assert mean == pytest.approx(whole[f"{stage}/p_at_1"], abs=1e-9)


def test_identity_half_is_refused_where_the_queries_are_the_gallery(compose_evaluate, tmp_path):
    from faceemd.jobs.evaluate import run_evaluation

    cfg = compose_evaluate([f"paths.log_dir={tmp_path}", "data.gallery=null", "identity_half=0",
                            "backbone=tiny_cnn", "logger=none"])  # fmt: skip
    with pytest.raises(ValueError, match="identity_half=0: use 0 or 1, on a protocol with a sep"):
        run_evaluation(cfg)
