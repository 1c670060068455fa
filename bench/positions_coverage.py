"""Where positional indices synthesis puts the real tokens: per strategy, over many draws of the paper's shape
(16 chunks x 512 tokens in a 64K window), the mean and max first tail (question) position and the share of the
window's bins the real tokens hit.

    python bench/positions_coverage.py                     # 1,000 draws, 16 x 512 in 65536, prefix 32, tail 600
    python bench/positions_coverage.py --window 32768 --draws 200

Writes bench/results/positions.csv (``--out``).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

from logo.data import STRATEGIES, synthesize_positions  # noqa: E402


def coverage(strategy: str, *, draws: int, chunks: list, window: int, prefix: int, tail: int, bins: int,
             seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    hit = torch.zeros(bins, dtype=torch.bool)
    tails = []
    for _ in range(draws):
        out = synthesize_positions(chunks, window=window, prefix=prefix, tail=tail, strategy=strategy, generator=g)
        hit[out.context * bins // window] = True
        tails.append(out.tail_start)
    t = torch.tensor(tails, dtype=torch.float64)
    return {"strategy": strategy, "draws": draws, "window": window, "real_tokens": prefix + sum(chunks) + tail,
            "mean_tail_start": round(float(t.mean()), 1), "max_tail_start": int(t.max()),
            "min_tail_start": int(t.min()), "bin_coverage": round(float(hit.float().mean()), 4)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draws", type=int, default=1000)
    parser.add_argument("--window", type=int, default=65536)
    parser.add_argument("--chunks", type=int, default=16)
    parser.add_argument("--chunk-tokens", type=int, default=512)
    parser.add_argument("--prefix", type=int, default=32)
    parser.add_argument("--tail", type=int, default=600)
    parser.add_argument("--bins", type=int, default=256)
    parser.add_argument("--out", default=os.path.join(harness.RESULTS_DIR, "positions.csv"))
    args = parser.parse_args(argv)
    rows = [coverage(s, draws=args.draws, chunks=[args.chunk_tokens] * args.chunks, window=args.window,
                     prefix=args.prefix, tail=args.tail, bins=args.bins) for s in STRATEGIES]
    print(f"{args.draws} draws of {args.chunks} x {args.chunk_tokens} tokens (prefix {args.prefix}, tail {args.tail}) "
          f"in a {args.window}-position window; slot = (K - k) / N = "
          f"{(args.window - rows[0]['real_tokens']) / args.chunks:.0f}")
    print(f"{'strategy':<12}{'mean tail':>12}{'max tail':>10}{'min tail':>10}{'bins hit':>10}")
    for r in rows:
        print(f"{r['strategy']:<12}{r['mean_tail_start']:>12.0f}{r['max_tail_start']:>10}{r['min_tail_start']:>10}"
              f"{r['bin_coverage']:>10.1%}")
    harness.write_csv(rows, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
