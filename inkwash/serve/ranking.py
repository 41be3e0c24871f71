"""Bradley–Terry ranking for the arena: two images side by side, the user votes left, right or tie.

The model (Bradley & Terry 1952): player i has a strength p_i > 0 and beats j with probability
p_i / (p_i + p_j). A tie counts as half a win for each side, as LMSYS Chatbot Arena does. Strengths are fitted
by maximum likelihood: a few steps of Hunter's (2004) MM algorithm ("MM algorithms for generalized Bradley–Terry
models", Ann. Statist. 32(1)) and then Newton's method, on all bootstrap resamples at once as batched numpy.

Prior: every pair of players that has votes gets `prior` virtual games that end in a tie (default one). That is
the penalised negative log-likelihood over log-strengths theta = log p

    -sum_votes [o log s(theta_a - theta_b) + (1 - o) log s(theta_b - theta_a)]
    - prior/2 * sum_{i<j} [log s(theta_i - theta_j) + log s(theta_j - theta_i)],     s = logistic sigmoid,

a symmetric pull towards equal strengths that keeps undefeated players and disconnected comparison graphs
finite and is negligible once a pair has more than a handful of real votes.

Ratings are on the Elo scale, 1000 + 400 log10(p), with the log-strengths centred so that the mean rating of the
players who have votes is 1000. Players listed in `names` without any vote are left out of the fit and get
exactly 1000 (and, in `ranking`, lo == hi == 1000).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

ELO_SCALE = 400.0 / np.log(10.0)  # rating points per unit of natural log-strength

Vote = tuple[str, str, float]


def _prepare(votes: Iterable[Vote], names: Sequence[str] | None) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Check votes; return the roster, the (k, 3) array of distinct (i, j, outcome) and how often each occurred."""
    roster = list(names) if names is not None else []
    if len(set(roster)) != len(roster):
        raise ValueError("names contains duplicates")
    index = {name: i for i, name in enumerate(roster)}
    rows = []
    for a, b, outcome in votes:
        o = float(outcome)
        if o not in (0.0, 0.5, 1.0):
            raise ValueError(f"outcome must be 1.0 (a won), 0.0 (b won) or 0.5 (tie), got {outcome!r}")
        if a == b:
            raise ValueError(f"a vote pits {a!r} against itself")
        for name in (a, b):
            if name not in index:
                if names is not None:
                    raise ValueError(f"vote names {name!r}, who is not in names")
                index[name] = len(roster)
                roster.append(name)
        rows.append((index[a], index[b], o))
    if not rows:
        return roster, np.zeros((0, 3)), np.zeros(0, dtype=np.int64)
    kinds, counts = np.unique(np.asarray(rows, dtype=float), axis=0, return_counts=True)
    return roster, kinds, counts


def _fit(kinds: np.ndarray, counts: np.ndarray, n: int, prior: float, iters: int, tol: float) -> np.ndarray:
    """Penalised ML log-strengths, centred, for a batch of vote-count vectors `counts` (B, k) -> (B, n).

    A few MM steps (Hunter 2004, eq. 3: p_i <- W_i / sum_j n_ij / (p_i + p_j), monotone from anywhere), then
    Newton steps on the concave penalised log-likelihood: MM alone can need thousands of steps when ratings lie far
    apart. Every player 0..n-1 must be active (the prior ties each to every other one)."""
    i, j, o = kinds[:, 0].astype(int), kinds[:, 1].astype(int), kinds[:, 2]
    score = np.zeros((len(kinds), n * n))  # score of row player against column player, per vote kind
    games = np.zeros((len(kinds), n * n))
    k = np.arange(len(kinds))
    np.add.at(score, (k, i * n + j), o)
    np.add.at(score, (k, j * n + i), 1.0 - o)
    np.add.at(games, (k, i * n + j), 1.0)
    np.add.at(games, (k, j * n + i), 1.0)
    wins = (counts @ score).reshape(-1, n, n).sum(-1) + prior * (n - 1) / 2.0  # (B, n), with virtual half wins
    pairs = (counts @ games).reshape(-1, n, n) + prior * (1.0 - np.eye(n))  # (B, n, n), with virtual games
    theta = np.zeros_like(wins)
    for _ in range(min(iters, 10)):
        p = np.exp(theta)
        theta = np.log(wins) - np.log((pairs / (p[:, :, None] + p[:, None, :])).sum(-1))
        theta -= theta.mean(-1, keepdims=True)
    for _ in range(iters):
        d = theta[:, :, None] - theta[:, None, :]
        win_prob = 0.5 + 0.5 * np.tanh(d / 2)  # logistic(theta_i - theta_j), without overflow
        grad = (pairs * win_prob).sum(-1) - wins  # of the penalised negative log-likelihood
        weight = pairs * win_prob * win_prob.transpose(0, 2, 1)
        hess = np.eye(n) * weight.sum(-1)[:, :, None] - weight + 1.0 / n  # + 1/n: fixes the free shift
        step = np.linalg.solve(hess, -grad[..., None])[..., 0]
        step *= np.minimum(1.0, 2.0 / np.abs(step).max(-1, keepdims=True).clip(1e-300))  # at most 2 per step
        theta = theta + step
        theta -= theta.mean(-1, keepdims=True)
        if np.abs(step).max() < tol:
            break
    return theta


def bradley_terry(
    votes: Iterable[Vote],
    names: Sequence[str] | None = None,
    *,
    prior: float = 1.0,
    iters: int = 100,
    tol: float = 1e-10,
) -> dict[str, float]:
    """Maximum-likelihood Bradley–Terry ratings (Bradley & Terry 1952) on the Elo scale, by MM (Hunter 2004) + Newton.

    votes: (a, b, outcome) with outcome 1.0 if a won, 0.0 if b won, 0.5 for a tie (half a win each).
    names: the roster, in order; players without votes get 1000. Without it, players in order of first vote.
    prior: virtual tied games per pair of players with votes (see the module docstring); must be > 0.
    Returns {name: rating}, mean rating 1000 over the players with votes, not rounded.
    """
    roster, kinds, counts = _prepare(votes, names)
    return _ratings(roster, kinds, counts[None], prior, iters, tol)[0]


def _ratings(roster, kinds, counts, prior, iters, tol) -> list[dict[str, float]]:
    """Ratings for a batch of count vectors over the same vote kinds; players without votes in `kinds` get 1000."""
    if prior <= 0:
        raise ValueError("prior must be > 0 (it keeps undefeated players finite)")
    active = np.unique(kinds[:, :2].astype(int)) if len(kinds) else np.zeros(0, dtype=int)
    out = np.full((len(counts), len(roster)), 1000.0)
    if len(active):
        remap = np.full(len(roster), -1)
        remap[active] = np.arange(len(active))
        local = kinds.copy()
        local[:, 0], local[:, 1] = remap[kinds[:, 0].astype(int)], remap[kinds[:, 1].astype(int)]
        out[:, active] = 1000.0 + ELO_SCALE * _fit(local, counts.astype(float), len(active), prior, iters, tol)
    return [dict(zip(roster, row.tolist())) for row in out]


def ranking(
    votes: Iterable[Vote],
    names: Sequence[str] | None = None,
    *,
    bootstrap: int = 200,
    seed: int = 0,
    level: float = 0.95,
    prior: float = 1.0,
) -> list[dict]:
    """The arena leaderboard: Bradley–Terry ratings with percentile-bootstrap intervals, best first.

    Each row is {"name", "rating", "lo", "hi", "wins", "losses", "ties", "matches"}; ratings rounded to 0.1.
    lo/hi: the (1 - level)/2 and (1 + level)/2 percentiles of the ratings refitted on `bootstrap` resamples of
    the votes drawn with replacement (numpy Generator seeded with `seed`, so the table is reproducible).
    `bootstrap=0` gives lo == hi == rating. Players without votes: rating, lo and hi all 1000.
    """
    if not 0.0 < level < 1.0:
        raise ValueError("level must be in (0, 1)")
    roster, kinds, counts = _prepare(votes, names)
    point = _ratings(roster, kinds, counts[None], prior, 100, 1e-10)[0]
    n_votes = int(counts.sum())
    if bootstrap > 0 and n_votes:
        rng = np.random.default_rng(seed)
        # resampling the votes with replacement == multinomial counts over the distinct kinds of vote
        draws = rng.multinomial(n_votes, counts / n_votes, size=bootstrap)
        boot = _ratings(roster, kinds, draws, prior, 100, 1e-8)
        samples = np.array([[b[name] for name in roster] for b in boot])
        lo, hi = np.percentile(samples, [50 * (1 - level), 50 * (1 + level)], axis=0)
    else:
        lo = hi = np.array([point[name] for name in roster])
    tally = {name: {"wins": 0, "losses": 0, "ties": 0} for name in roster}
    for (i, j, o), c in zip(kinds, counts.tolist()):
        a, b = roster[int(i)], roster[int(j)]
        if o == 0.5:
            tally[a]["ties"] += c
            tally[b]["ties"] += c
        else:
            winner, loser = (a, b) if o == 1.0 else (b, a)
            tally[winner]["wins"] += c
            tally[loser]["losses"] += c
    rows = [
        {
            "name": name,
            "rating": round(point[name], 1),
            "lo": round(float(lo[k]), 1),
            "hi": round(float(hi[k]), 1),
            **tally[name],
            "matches": sum(tally[name].values()),
        }
        for k, name in enumerate(roster)
    ]
    rows.sort(key=lambda r: (-r["rating"], r["name"]))
    return rows
