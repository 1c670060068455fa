"""LOGO's data path: preference records, positional indices synthesis, shared-prefix packing, builder."""
from .positions import STRATEGIES, SynthesizedPositions, synthesize_positions
from .records import InvalidPreferenceFile, PreferenceRecord, read_preference_file, write_preference_file

__all__ = ["STRATEGIES", "SynthesizedPositions", "synthesize_positions", "InvalidPreferenceFile",
           "PreferenceRecord", "read_preference_file", "write_preference_file"]
