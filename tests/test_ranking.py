"""Arena ranking: Bradley–Terry fits checked against a closed form, scipy, and simulated known strengths."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import minimize
from scipy.special import expit, log_expit

from inkwash.serve.ranking import bradley_terry, ranking

NAMES = ["ada", "bo", "cy", "di", "ed", "flo"]


def simulate(truth, n_votes, seed, tie_rate=0.0):
    """Votes drawn from Bradley–Terry with Elo ratings `truth`; ties (a share `tie_rate`) keep E[score] = P(win)."""
    rng = np.random.default_rng(seed)
    names = list(truth)
    elo = np.array([truth[n] for n in names])
    votes = []
    for _ in range(n_votes):
        i, j = rng.choice(len(names), 2, replace=False)
        p = 1.0 / (1.0 + 10.0 ** ((elo[j] - elo[i]) / 400.0))
        if rng.random() < tie_rate:
            outcome = 0.5
        else:  # a wins with q such that tie_rate/2 + (1 - tie_rate) q = p
            outcome = float(rng.random() < (p - tie_rate / 2) / (1 - tie_rate))
        votes.append((names[i], names[j], outcome))
    return votes


def scipy_ratings(votes, names, prior=1.0):
    """Minimise the documented penalised negative log-likelihood directly, vote by vote, over log-strengths."""
    index = {n: k for k, n in enumerate(names)}
    a = np.array([index[v[0]] for v in votes])
    b = np.array([index[v[1]] for v in votes])
    o = np.array([v[2] for v in votes])
    iu, ju = np.triu_indices(len(names), 1)

    def nll(free):
        theta = np.concatenate([[0.0], free])
        d = theta[a] - theta[b]
        data = -(o * log_expit(d) + (1 - o) * log_expit(-d)).sum()
        dp = theta[iu] - theta[ju]
        return data - prior / 2 * (log_expit(dp) + log_expit(-dp)).sum()

    def grad(free):
        theta = np.concatenate([[0.0], free])
        g = np.zeros_like(theta)
        d = theta[a] - theta[b]
        gd = -(o * expit(-d) - (1 - o) * expit(d))  # d nll / d (theta_a - theta_b)
        np.add.at(g, a, gd)
        np.add.at(g, b, -gd)
        dp = theta[iu] - theta[ju]
        gp = -prior / 2 * (expit(-dp) - expit(dp))
        np.add.at(g, iu, gp)
        np.add.at(g, ju, -gp)
        return g[1:]

    res = minimize(nll, np.zeros(len(names) - 1), jac=grad, method="BFGS", options={"gtol": 1e-8})
    assert np.abs(grad(res.x)).max() < 1e-6, res.message  # at the optimum, whatever BFGS's own verdict
    theta = np.concatenate([[0.0], res.x])
    theta -= theta.mean()
    return {n: 1000 + 400 / np.log(10) * t for n, t in zip(names, theta)}


@pytest.mark.parametrize("w, l", [(300, 100), (150, 450), (500, 500)])
def test_two_players_match_closed_form(w, l):
    votes = [("a", "b", 1.0)] * w + [("a", "b", 0.0)] * l
    r = bradley_terry(votes)
    assert r["a"] - r["b"] == pytest.approx(400 * np.log10(w / l), abs=2.0)
    assert (r["a"] + r["b"]) / 2 == pytest.approx(1000.0)
    # the prior is one virtual tie, so the exact penalised answer is also known in closed form
    assert r["a"] - r["b"] == pytest.approx(400 * np.log10((w + 0.5) / (l + 0.5)), abs=1e-6)


def test_agrees_with_scipy_on_random_votes():
    rng = np.random.default_rng(7)
    names = NAMES[:5]
    votes = [
        (names[i], names[j], float(rng.choice([0.0, 0.5, 1.0], p=[0.3, 0.2, 0.5])))
        for i, j in (rng.choice(5, 2, replace=False) for _ in range(120))
    ]
    ours = bradley_terry(votes, names)
    ref = scipy_ratings(votes, names)
    for n in names:
        assert ours[n] == pytest.approx(ref[n], abs=0.5)
    assert max(ours.values()) - min(ours.values()) > 50  # not a trivially flat answer


def test_agrees_with_scipy_with_undefeated_and_disconnected():
    # ada never loses; {ada, bo} and {cy, di} never meet: only the prior makes this finite and unique
    votes = [("ada", "bo", 1.0)] * 5 + [("cy", "di", 1.0)] * 3 + [("cy", "di", 0.0)] * 2
    names = ["ada", "bo", "cy", "di"]
    ours = bradley_terry(votes, names)
    ref = scipy_ratings(votes, names)
    for n in names:
        assert ours[n] == pytest.approx(ref[n], abs=0.5)


def test_agrees_with_scipy_when_ratings_lie_far_apart():
    # a chain of shut-outs: ratings ~1400 apart per link, where plain MM iterations crawl
    votes = [("a", "b", 1.0)] * 5000 + [("b", "c", 1.0)] * 5000 + [("c", "d", 1.0)] * 5000
    ours = bradley_terry(votes)
    ref = scipy_ratings(votes, ["a", "b", "c", "d"])
    for n in ref:
        assert ours[n] == pytest.approx(ref[n], abs=0.5)
    # and the two-player shut-out is the closed form with the one virtual tie
    r = bradley_terry([("a", "b", 1.0)] * 100_000)
    assert r["a"] - r["b"] == pytest.approx(400 * np.log10(100_000.5 / 0.5), abs=1e-6)


def test_recovers_known_strengths_with_covering_intervals():
    truth = dict(zip(NAMES, [1250.0, 1150.0, 1050.0, 950.0, 850.0, 750.0]))  # mean 1000, as fits are centred
    votes = simulate(truth, 3000, seed=3, tie_rate=0.15)
    rows = ranking(votes, bootstrap=200, seed=0)
    assert [r["name"] for r in rows] == NAMES
    covered = 0
    for r in rows:
        assert r["rating"] == pytest.approx(truth[r["name"]], abs=25)
        assert r["lo"] <= r["rating"] <= r["hi"]
        covered += r["lo"] <= truth[r["name"]] <= r["hi"]
    assert covered >= 5
    assert sum(r["matches"] for r in rows) == 2 * 3000
    assert sum(r["ties"] for r in rows) % 2 == 0 and sum(r["wins"] for r in rows) == sum(r["losses"] for r in rows)


def test_ties_count_as_half():
    only_ties = [("ada", "bo", 0.5), ("bo", "cy", 0.5), ("cy", "ada", 0.5)] * 10
    r = bradley_terry(only_ties)
    assert all(v == pytest.approx(1000.0, abs=1e-6) for v in r.values())
    # a tie is half a win each: 2 wins + 2 ties scores 3 of 4, exactly as 3 wins + 1 loss does
    half = bradley_terry([("a", "b", 1.0)] * 2 + [("a", "b", 0.5)] * 2)
    whole = bradley_terry([("a", "b", 1.0)] * 3 + [("a", "b", 0.0)] * 1)
    assert half["a"] - half["b"] == pytest.approx(whole["a"] - whole["b"], abs=1e-6)
    row = {r["name"]: r for r in ranking([("a", "b", 0.5), ("a", "b", 1.0)], bootstrap=0)}
    assert (row["a"]["wins"], row["a"]["ties"], row["a"]["losses"], row["a"]["matches"]) == (1, 1, 0, 2)
    assert (row["b"]["wins"], row["b"]["ties"], row["b"]["losses"], row["b"]["matches"]) == (0, 1, 1, 2)


def test_undefeated_is_finite_and_highest():
    votes = [("ada", "bo", 1.0), ("ada", "cy", 1.0), ("cy", "ada", 0.0)] * 20 + [("bo", "cy", 1.0), ("cy", "bo", 1.0)]
    r = bradley_terry(votes)
    assert np.isfinite(list(r.values())).all()
    assert max(r, key=r.get) == "ada"
    assert r["ada"] < 2500


def test_player_without_votes_gets_1000_and_a_point_interval():
    votes = [("ada", "bo", 1.0)] * 8 + [("ada", "bo", 0.0)] * 2
    names = ["ada", "bo", "zed"]
    r = bradley_terry(votes, names)
    assert r["zed"] == 1000.0
    assert bradley_terry(votes, names)["ada"] == pytest.approx(bradley_terry(votes)["ada"])  # zed does not shift
    row = {x["name"]: x for x in ranking(votes, names)}
    assert (row["zed"]["rating"], row["zed"]["lo"], row["zed"]["hi"], row["zed"]["matches"]) == (1000, 1000, 1000, 0)
    assert bradley_terry([], names) == dict.fromkeys(names, 1000.0)


def test_intervals_narrow_with_more_votes():
    truth = dict(zip(NAMES, [1150.0, 1100.0, 1000.0, 1000.0, 900.0, 850.0]))
    votes = simulate(truth, 2000, seed=11)

    def mean_width(v):
        return np.mean([r["hi"] - r["lo"] for r in ranking(v, bootstrap=200)])

    small, large = mean_width(votes[:50]), mean_width(votes)
    assert large > 0
    assert large < small / 2.5


def test_bootstrap_is_reproducible_and_seeded():
    votes = simulate(dict(zip(NAMES, [1100.0, 1050.0, 1000.0, 1000.0, 950.0, 900.0])), 300, seed=5)
    assert ranking(votes, seed=4) == ranking(votes, seed=4)
    assert ranking(votes, seed=4) != ranking(votes, seed=5)


def test_rejects_bad_votes():
    with pytest.raises(ValueError):
        bradley_terry([("a", "b", 0.7)])
    with pytest.raises(ValueError):
        bradley_terry([("a", "a", 1.0)])
    with pytest.raises(ValueError):
        bradley_terry([("a", "b", 1.0)], names=["a"])
