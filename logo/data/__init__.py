"""LOGO's data path: preference records, positional indices synthesis, shared-prefix packing, builder."""
from .positions import STRATEGIES, SynthesizedPositions, synthesize_positions

__all__ = ["STRATEGIES", "SynthesizedPositions", "synthesize_positions"]
