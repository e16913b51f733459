"""Reading lm-evaluation-harness task YAMLs as they are: ``!function`` tags, ``include:`` and
the keys that do not change what zoft trains or reports.

A harness YAML names Python code with ``!function module.name``; zoft runs no code from a
task file, so such a value is read as a :class:`PythonFunction` marker and refused with one
line naming the code-free alternative (a jinja2 template, ``explode:`` for nested rows), unless
the key is one zoft ignores anyway. ``include: base.yaml`` merges another YAML under this one,
as the harness does.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml

from zoft.errors import DataError

# TaskConfig keys of lm-evaluation-harness that zoft accepts and does not use: naming, grouping,
# decontamination, few-shot settings (zoft's icl method has its own icl_k), filters and result
# hooks (zoft computes metric_list itself). The note that lists them makes the difference visible.
IGNORED_KEYS = frozenset({
    "task_alias", "tag", "group", "group_alias", "reference", "metadata", "should_decontaminate",
    "doc_to_decontamination_query", "dataset_kwargs", "fewshot_split", "fewshot_config", "num_fewshot",
    "fewshot_delimiter", "repeats", "filter_list", "use_prompt", "unsafe_code", "process_results",
    "gen_prefix", "doc_to_image", "doc_to_audio"})
# metric_list entry keys of the harness; zoft averages every metric over examples, higher is better.
IGNORED_METRIC_KEYS = frozenset({"aggregation", "higher_is_better", "ignore_case", "ignore_punctuation",
                                 "regexes_to_ignore", "hf_evaluate"})
# What to write instead of Python code, by key.
_INSTEAD = {
    "process_docs": "flatten nested rows with `explode:` (README, 'Nested rows'), or prepare the file beforehand",
    "doc_to_text": "write it as a jinja2 template, e.g. \"{{passage}}\\nQuestion: {{question}}?\"",
    "doc_to_target": "give a field name or a jinja2 template",
    "doc_to_choice": "give a list of strings or templates, or the name of a field holding the list",
}


class PythonFunction(str):
    """The ``module.name`` of a ``!function`` tag: code zoft does not run."""


class _Loader(yaml.SafeLoader):
    """yaml.safe_load plus the harness's ``!function`` tag."""


_Loader.add_constructor("!function", lambda loader, node: PythonFunction(loader.construct_scalar(node)))


def load_yaml(path: Path, seen: tuple[Path, ...] = ()) -> Any:
    """Parses a task YAML, merging any ``include:`` file under it (its keys lose to this file's).

    Raises:
        DataError: the file is missing or is not valid YAML, or an include is missing or circular.
    """
    if not path.is_file():
        raise DataError("task file not found", str(path))
    try:
        config = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise DataError(f"invalid YAML: {getattr(e, 'problem', None) or e}", str(path),
                        mark.line + 1 if mark else None) from None
    if not isinstance(config, dict) or "include" not in config:
        return config
    include = config.pop("include")
    if not isinstance(include, str):
        raise DataError("must be the path of another task YAML", str(path), field="include")
    base_path = (path.parent / include).resolve()
    if base_path in seen:
        raise DataError(f"circular include of {base_path}", str(path), field="include")
    if not base_path.is_file():
        raise DataError(f"included file not found: {base_path}", str(path), field="include")
    base = load_yaml(base_path, (*seen, path.resolve()))
    if not isinstance(base, dict):
        raise DataError("a task YAML must be a mapping of keys to values", str(base_path))
    return {**base, **config}


def triage_keys(config: dict, known: set[str], path: str) -> list[str]:
    """The harness keys of ``config`` zoft ignores, sorted; refuses unknown keys and needed code.

    Raises:
        DataError: an unknown key (with a did-you-mean), or a ``!function`` value for a key zoft uses.
    """
    ignored = []
    for key, value in config.items():
        if key in IGNORED_KEYS:
            ignored.append(key)
        elif isinstance(value, PythonFunction) or key == "process_docs":
            instead = _INSTEAD.get(key, "give the value in the YAML itself")
            what = f"!function {value}" if isinstance(value, PythonFunction) else "process_docs"
            raise DataError(f"{what} is Python code, which zoft does not run from a task file: "
                            f"{instead}", path, field=key)
        elif key not in known:
            close = difflib.get_close_matches(key, sorted(known | IGNORED_KEYS), n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"allowed: {', '.join(sorted(known))}"
            raise DataError(f"unknown key ({hint})", path, field=key)
    return sorted(ignored)
