"""Text sampling (``transfusion.generation.sample_tokens``): temperature and top-p draw from the exact distribution.

On a 6-token vocabulary the distribution is written out here (softmax of logits / temperature; top-p keeps the
smallest set of most likely tokens whose mass reaches top_p, renormalised) and compared with 20,000 draws: tokens
outside the nucleus never appear, and each frequency is within 4.5 binomial standard deviations of its probability.
The seeds are fixed, so the test is deterministic; with other seeds a correct sampler would fail a given token's
check with probability < 1e-5.
"""

import math

import pytest
import torch

from transfusion.generation import sample_tokens

LOGITS = [1.0, -0.5, 2.0, 0.3, -1.2, 1.4]  # not in order: the nucleus must be mapped back to token ids
N = 20_000


def exact_distribution(logits: list[float], temperature: float, top_p: float) -> list[float]:
    """The nucleus distribution, by definition, in float64."""
    weights = [math.exp(x / temperature) for x in logits]
    p = [w / sum(weights) for w in weights]
    order = sorted(range(len(p)), key=lambda i: -p[i])
    kept, mass = [], 0.0
    for i in order:
        if mass >= top_p:
            break
        kept.append(i)
        mass += p[i]
    # keep the cut away from a rounding tie: the mass before the last kept token is clearly below top_p
    assert top_p == 1.0 or (mass - p[kept[-1]] < top_p - 0.02 and mass > top_p + 0.02), (temperature, top_p)
    return [p[i] / mass if i in kept else 0.0 for i in range(len(p))]


def _draws(temperature: float, top_p: float, seed: int = 0) -> torch.Tensor:
    logits = torch.tensor(LOGITS).expand(N, -1)  # one row a draw, each row its own generator
    generators = [torch.Generator().manual_seed(seed * N + i) for i in range(N)]
    return sample_tokens(logits, temperature, top_p, generators)


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.5, 1.0), (2.0, 1.0), (1.0, 0.75), (0.7, 0.9),
                                                (1.5, 0.5), (1.0, 0.3)])
def test_draws_follow_the_exact_distribution(temperature, top_p):
    expected = exact_distribution(LOGITS, temperature, top_p)
    tokens = _draws(temperature, top_p)
    assert tokens.shape == (N,) and tokens.dtype == torch.long
    counts = torch.bincount(tokens, minlength=len(LOGITS)).tolist()
    for token, (count, p) in enumerate(zip(counts, expected)):
        if p == 0.0:
            assert count == 0, f"token {token} is outside the nucleus but was drawn {count} times"
        else:
            tolerance = 4.5 * math.sqrt(p * (1 - p) / N)
            assert abs(count / N - p) <= tolerance, (token, count / N, p, tolerance, counts)


def test_temperature_zero_is_greedy_and_each_row_draws_from_its_own_generator():
    logits = torch.tensor([LOGITS, LOGITS[::-1], [0.0, 5.0, 0.0, 0.0, 0.0, 0.0]])
    assert sample_tokens(logits, 0.0, 1.0, [None] * 3).tolist() == [2, 3, 1]
    # a row's draw depends only on its generator: the same as drawing it alone
    batch = sample_tokens(logits.repeat(20, 1), 1.3, 0.9, [torch.Generator().manual_seed(i) for i in range(60)])
    alone = [int(sample_tokens(logits[i % 3][None], 1.3, 0.9, [torch.Generator().manual_seed(i)])) for i in range(60)]
    assert batch.tolist() == alone
