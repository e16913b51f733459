"""Automatic scoring of student responses against a rubric: data, OpenAI chat JSONL, metrics."""
from zoft.scoring.data import (Response, ScoringItem, pairs, read_asap, read_asap_item, read_semeval,
                               read_table, to_example)

__all__ = ["ScoringItem", "Response", "read_asap", "read_asap_item", "read_semeval", "read_table",
           "pairs", "to_example"]
