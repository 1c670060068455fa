"""LOGO's data path: preference records, tokenisation, positional indices synthesis, shared-prefix packing,
the data builder (``python -m logo.data build``) and the embedded synthetic tasks."""
from .batching import PositionSynthesis, collate
from .encoding import EncodedExample, encode_record, encode_records
from .positions import STRATEGIES, SynthesizedPositions, synthesize_positions
from .records import InvalidPreferenceFile, PreferenceRecord, read_preference_file, write_preference_file

__all__ = ["STRATEGIES", "SynthesizedPositions", "synthesize_positions", "InvalidPreferenceFile",
           "PreferenceRecord", "read_preference_file", "write_preference_file", "EncodedExample", "encode_record",
           "encode_records", "PositionSynthesis", "collate"]
