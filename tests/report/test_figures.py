def test_pareto_front_is_the_set_no_point_dominates():
    import itertools

    import numpy as np

    from textkeep.report.figures import pareto_front

    rng = np.random.default_rng(0)
    for _ in range(20):
        pts = {f"p{i}": tuple(rng.integers(0, 5, 2).tolist()) for i in range(7)}  # ties on purpose
        brute = {
            a
            for a in pts
            if not any(all(u >= v for u, v in zip(pts[b], pts[a])) and pts[b] != pts[a] for b in pts if b != a)
        }
        front = pareto_front(pts)
        assert set(front) == brute
        assert [pts[a] for a in front] == sorted(pts[a] for a in front)
        for a, b in itertools.combinations(front, 2):  # along the frontier one axis rises as the other falls
            assert (pts[a][0] - pts[b][0]) * (pts[a][1] - pts[b][1]) <= 0
