"""Positional indices synthesis: invariants of every strategy, seeding, and coverage of the window."""
import pytest
import torch

from logo.data import STRATEGIES, synthesize_positions

CHUNKS = [512] * 16  # the paper's 16 chunks of 512 tokens


def chunk_bounds(lengths, prefix):
    bounds, start = [], prefix
    for length in lengths:
        bounds.append((start, start + length))
        start += length
    return bounds


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("seed", range(5))
def test_invariants(strategy, seed):
    lengths = CHUNKS if seed % 2 else [300, 512, 17, 512, 450, 1]
    prefix, tail, window = 37, 700, 65536
    g = torch.Generator().manual_seed(seed)
    out = synthesize_positions(lengths, window=window, prefix=prefix, tail=tail, strategy=strategy, generator=g)
    pos = out.context
    assert pos.shape == (prefix + sum(lengths),)
    assert torch.equal(pos[:prefix], torch.arange(prefix)), "the prefix keeps 0..prefix-1"
    assert (pos[1:] > pos[:-1]).all(), "strictly increasing over real tokens"
    assert int(pos.max()) < window and out.tail_start + tail <= window
    assert out.tail_start == int(pos[-1]) + 1, "the question follows the last context position"
    assert torch.equal(out.tail(5), torch.arange(out.tail_start, out.tail_start + 5))
    if out.strategy in ("continuous", "slots"):
        for a, b in chunk_bounds(lengths, prefix):
            assert (pos[a + 1:b] - pos[a:b - 1] == 1).all(), "contiguous inside a chunk"
    assert out.strategy in ("continuous", "sparse") if strategy in ("mixed", "continuous", "sparse") else True


def test_seeded_and_mixed_ratio():
    run = lambda seed: synthesize_positions(CHUNKS, window=65536, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    assert torch.equal(run(3).context, run(3).context)
    picked = [run(seed).strategy for seed in range(400)]
    share = picked.count("continuous") / len(picked)
    assert 0.85 <= share <= 0.95, f"continuous share {share} (expected ~0.9)"


# Over 1,000 draws of 16 x 512 tokens in a 64K window (prefix 32, tail 600), measured: share of 256 bins hit
# continuous 0.992, sparse 0.992, slots 0.934, mixed 0.992 (the last two bins hold only the tail); mean first tail
# position continuous 63.2K, sparse 64.8K, slots 59.4K, mixed 63.3K (bench/positions_coverage.py).
COVERAGE_FLOOR = {"continuous": 0.95, "sparse": 0.95, "slots": 0.9, "mixed": 0.95}
DRAWS, PREFIX, TAIL, WINDOW = 1000, 32, 600, 65536


@pytest.fixture(scope="module")
def draws():
    """Per strategy: 1,000 synthesized samples of the paper's shape."""
    out = {}
    for strategy in COVERAGE_FLOOR:
        g = torch.Generator().manual_seed(0)
        out[strategy] = [synthesize_positions(CHUNKS, window=WINDOW, prefix=PREFIX, tail=TAIL, strategy=strategy,
                                              generator=g) for _ in range(DRAWS)]
    return out


@pytest.mark.parametrize("strategy", list(COVERAGE_FLOOR))
def test_positions_cover_the_window(strategy, draws):
    """Over many samples the real tokens (k ~ 8K) land all over the 64K window (position extension)."""
    bins = 256
    hit = torch.zeros(bins, dtype=torch.bool)
    for out in draws[strategy]:
        hit[out.context // (WINDOW // bins)] = True
    coverage = hit.float().mean().item()
    assert coverage >= COVERAGE_FLOOR[strategy], f"{strategy} covers only {coverage:.2%} of the window"


def test_continuous_chunks_reach_the_top_of_the_window(draws):
    """The paper's continuous strategy puts each chunk in its own slot: the question follows the last chunk within
    one slot of K - tail (the old cumulative gaps left it near the middle of the window, ~36.6K)."""
    real = PREFIX + sum(CHUNKS) + TAIL
    slot = (WINDOW - real) / len(CHUNKS)
    tails = torch.tensor([out.tail_start for out in draws["continuous"]], dtype=torch.float64)
    assert tails.mean() >= WINDOW - slot and tails.max() < WINDOW
    assert (tails >= WINDOW - TAIL - slot - 1).all()  # every draw: the last chunk ends in the last slot
    for out in draws["continuous"][:50]:  # one bias per chunk: contiguous chunks, biases inside their slots
        for c, (a, b) in enumerate(chunk_bounds(CHUNKS, PREFIX)):
            bias = int(out.context[a]) - a
            assert c * slot - 1 <= bias <= (c + 1) * slot + 1


def test_errors():
    with pytest.raises(ValueError, match="do not fit the position window 1000"):
        synthesize_positions([600, 600], window=1000)
    with pytest.raises(ValueError, match="positive ints"):
        synthesize_positions([10, 0], window=1000)
    with pytest.raises(ValueError, match="strategy must be one of"):
        synthesize_positions([10], window=1000, strategy="random")
    with pytest.raises(ValueError, match="does not fit a slot"):
        synthesize_positions([400, 10], window=1000, strategy="slots")


def test_no_slack_gives_plain_positions():
    out = synthesize_positions([5, 5], window=13, prefix=1, tail=2, strategy="continuous")
    assert out.context.tolist() == list(range(11)) and out.tail_start == 11
