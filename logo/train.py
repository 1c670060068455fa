"""``python -m logo.train`` — the LOGO training loop.

Not implemented yet: the loop (typed config, HF model loading with LoRA, shared-prefix packing, the fused
LOGO loss, DeepSpeed ZeRO, resumable checkpoints, the embedded default run) is tracked in issue #6 and
depends on the loss (#4) and data (#5) issues. Until then this entry point says so and exits non-zero
instead of pretending to train.
"""
import sys


def main(argv=None) -> int:
    print("logo.train: the LOGO training loop is not implemented yet (issue #6). "
          "The fused op is usable now: `import logo_kernels; logo_kernels.linear_logprobs(...)`.",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
