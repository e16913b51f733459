"""Rubric scoring of student responses, as a task kind: data, prompts, ScoringTask, metrics."""
from zoft.tasks.rubric.data import (Response, ScoringItem, pairs, read_asap, read_asap_item, read_semeval,
                                    read_table)
from zoft.tasks.rubric.prompts import system_prompt, to_example, user_prompt
from zoft.tasks.rubric.task import ScoringTask, load_scoring_task

__all__ = ["ScoringTask", "ScoringItem", "Response", "load_scoring_task", "read_asap", "read_asap_item",
           "read_semeval", "read_table", "pairs", "system_prompt", "user_prompt", "to_example"]
