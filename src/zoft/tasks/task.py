"""Tasks defined by YAML files in the style of lm-evaluation-harness.

A task names its data (``dataset_path`` plus split names), how a row becomes a prompt
(``doc_to_text``), its candidate answers (``doc_to_choice``) and its gold label
(``doc_to_target``). Builtin tasks live in ``configs/``; a user's own YAML file works
the same way, so a new SuperGLUE-style dataset needs no code.
"""
from __future__ import annotations

import ast
import logging
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import meta

from zoft.errors import DataError, excerpt
from zoft.tasks.example import Example, TaskData
from zoft.tasks.harness import IGNORED_METRIC_KEYS, load_yaml, triage_keys
from zoft.tasks.metrics import METRICS
from zoft.tasks.nested import check_explode, explode_rows, field_value
from zoft.tasks.readers import Row, data_dir, read_rows
from zoft.tasks.sampling import sample_task_data

CONFIG_DIR = Path(__file__).parent / "configs"
KINDS = ("classification", "multiple_choice", "generation")
OUTPUT_TYPES = ("multiple_choice", "generate_until")
KEYS = {"task", "dataset_path", "dataset_name", "data_files", "training_split", "validation_split",
        "test_split", "output_type", "doc_to_text", "doc_to_choice", "doc_to_target", "class_labels",
        "answers_field", "target_delimiter", "metric_list", "generation_kwargs", "description", "kind",
        "explode"}
GENERATION_DEFAULTS: dict[str, Any] = {"max_gen_toks": 32, "until": ["\n"]}
BOOLEAN_TEXT = {"false": 0, "true": 1}
log = logging.getLogger(__name__)

# StrictUndefined turns a typo in a template into an error instead of an empty string;
# keep_trailing_newline because prompts such as RTE's end in "\n" on purpose.
_ENV = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                          autoescape=False)


def _is_template(text: str) -> bool:
    return "{{" in text or "{%" in text


class _Template:
    """A compiled jinja2 template that reports missing fields with file, row and field."""

    def __init__(self, source: str, key: str, yaml_path: str):
        self.key = key
        try:
            parsed = _ENV.parse(source)
            self.template = _ENV.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise DataError(f"bad template: {e.message}", yaml_path, field=key) from None
        self.fields = sorted(meta.find_undeclared_variables(parsed))

    def render(self, doc: dict, path: str, row: int) -> str:
        for name in self.fields:
            if doc.get(name) is None:  # a null would render as "None" in the prompt
                raise DataError(f"missing or null in this row (used by {self.key})", path, row, name)
        try:
            return self.template.render(doc)
        except (jinja2.TemplateError, TypeError, ValueError, IndexError, KeyError) as e:
            raise DataError(f"cannot render {self.key}: {e}", path, row, self.key) from None


class Task:
    """A task loaded from a YAML definition.

    Attributes:
        name: The task's name (``task`` key).
        kind: "classification" (fixed label words), "multiple_choice" (per-row options)
            or "generation".
        metric: The main metric (first of ``metric_list``).
        metrics: All metric names.
        target_delimiter: String put between context and choice/answer.
        generation_kwargs: ``max_gen_toks`` and ``until`` (generation tasks).
        label_words: The fixed choices of a classification task, else empty.
        description: Text prepended to every context ("" if none).
        training_split, validation_split, test_split: Split names.
        source: The YAML file.
    """

    def __init__(self, config: dict, source: Path, builtin: bool = False):
        """Validates a parsed YAML definition; data is read lazily by :meth:`load_split`.

        Raises:
            DataError: an unknown key, a missing or ill-typed value, or a bad template.
        """
        self.source, self._builtin = source, builtin
        src = str(source)

        def fail(message: str, key: str) -> DataError:
            return DataError(message, src, field=key)

        if not isinstance(config, dict):
            raise DataError("a task YAML must be a mapping of keys to values", src)
        ignored = triage_keys(config, KEYS, src)
        for key in ("task", "dataset_path", "output_type", "doc_to_text"):
            if not isinstance(config.get(key), str) or not config[key]:
                raise fail("required, must be a non-empty string", key)

        self.name: str = config["task"]
        self.dataset_path: str = config["dataset_path"]
        self.dataset_name: str | None = config.get("dataset_name")
        self.data_files: dict[str, str] = config.get("data_files") or {}
        if not isinstance(self.data_files, dict):
            raise fail("must map split names to file names", "data_files")
        self.training_split: str = str(config.get("training_split", "train"))
        self.validation_split: str = str(config.get("validation_split", "validation"))
        self.test_split: str | None = config.get("test_split")
        self.description: str = config.get("description") or ""
        self.target_delimiter: str = str(config.get("target_delimiter", " "))

        output_type = config["output_type"]
        if output_type not in OUTPUT_TYPES:
            raise fail(f"must be one of {', '.join(OUTPUT_TYPES)}", "output_type")
        choices = config.get("doc_to_choice")
        # A string is the harness's per-row form: a field holding the list, or a template that
        # renders to a Python list literal ("['{{a}}', '{{b}}']").
        self._choice_source: str | None = choices if isinstance(choices, str) else None
        if output_type == "generate_until":
            kind = "generation"
            if choices is not None:
                raise fail("not used by generate_until tasks", "doc_to_choice")
        elif self._choice_source is not None:
            kind = "multiple_choice"
            choices = []
        else:
            if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
                raise fail("must be a list of at least two strings, a field name or a template", "doc_to_choice")
            kind = "multiple_choice" if any(_is_template(c) for c in choices) else "classification"
        self.kind: str = config.get("kind", kind)
        if self.kind not in KINDS or (self.kind == "generation") != (output_type == "generate_until") or (
                self._choice_source is not None and self.kind != "multiple_choice"):
            raise fail(f"'{self.kind}' does not fit output_type '{output_type}'", "kind")

        self._text = _Template(config["doc_to_text"], "doc_to_text", src)
        self._choices = [_Template(c, "doc_to_choice", src) for c in choices or []]
        self._choice_template = (_Template(choices_src, "doc_to_choice", src)
                                 if (choices_src := self._choice_source) and _is_template(choices_src) else None)
        self.label_words: list[str] = list(choices) if self.kind == "classification" else []

        target = config.get("doc_to_target")
        self.answers_field: str | None = config.get("answers_field")
        if self.answers_field is not None and self.kind != "generation":
            raise fail("only used by generate_until tasks", "answers_field")
        if target is None and self.answers_field is None:
            raise fail("required (a field name or a template)", "doc_to_target")
        if target is not None and not isinstance(target, str):
            raise fail("must be a field name or a template", "doc_to_target")
        self._target_field = target if target and not _is_template(target) else None
        self._target = _Template(target, "doc_to_target", src) if target and _is_template(target) else None
        self.class_labels: list | None = config.get("class_labels")
        if self.class_labels is not None and (
                not isinstance(self.class_labels, list)
                or (self._choice_source is None and len(self.class_labels) != len(self._choices))):
            raise fail("must list one raw label per choice, in choice order", "class_labels")

        metric_list = config.get("metric_list") or [
            {"metric": "exact_match" if self.kind == "generation" else "acc"}]
        if not isinstance(metric_list, list):
            raise fail("must be a list of {metric: name}", "metric_list")
        self.metrics: list[str] = []
        for entry in metric_list:
            if (not isinstance(entry, dict) or entry.get("metric") not in METRICS
                    or set(entry) - {"metric"} - IGNORED_METRIC_KEYS):
                raise fail(f"entries must be {{metric: name}} with name in {', '.join(METRICS)}",
                           "metric_list")
            self.metrics.append(entry["metric"])
            ignored += sorted(f"metric_list.{k}" for k in set(entry) & IGNORED_METRIC_KEYS
                              if f"metric_list.{k}" not in ignored)
        self.metric: str = self.metrics[0]

        gen = config.get("generation_kwargs") or {}
        if not isinstance(gen, dict) or set(gen) - set(GENERATION_DEFAULTS):
            raise fail(f"allowed keys: {', '.join(GENERATION_DEFAULTS)}", "generation_kwargs")
        self.generation_kwargs: dict[str, Any] = {**GENERATION_DEFAULTS, **gen}
        if isinstance(self.generation_kwargs["until"], str):
            self.generation_kwargs["until"] = [self.generation_kwargs["until"]]
        self.explode: dict[str, str] = check_explode(config.get("explode"), src)
        self._cache: dict[str, list[Example]] = {}
        if ignored:
            log.warning("%s: ignoring lm-evaluation-harness keys zoft does not use: %s", src, ", ".join(ignored))

    @classmethod
    def from_yaml(cls, path: str | Path, builtin: bool = False) -> Task:
        """Reads a task definition file.

        lm-evaluation-harness YAMLs load as they are (:mod:`zoft.tasks.harness`): ``include:``
        is merged, keys zoft does not use are named in one warning, and ``!function`` code is
        refused with the code-free alternative.

        Raises:
            DataError: the file is missing, is not valid YAML, or fails validation.
        """
        path = Path(path)
        return cls(load_yaml(path), path, builtin)

    def __repr__(self) -> str:
        return f"Task({self.name!r}, kind={self.kind!r}, metric={self.metric!r})"

    # -- data ------------------------------------------------------------------------

    def _local_dir(self) -> Path | None:
        """The dataset folder, if ``dataset_path`` names a local one."""
        p = Path(self.dataset_path).expanduser()
        if p.is_absolute():
            return p if p.is_dir() else None
        bases = [] if self._builtin else [self.source.parent]
        root = data_dir()
        bases += [root] if root else []
        bases.append(Path.cwd())
        return next((b / p for b in bases if (b / p).is_dir()), None)

    def _read_split(self, split: str) -> tuple[str, list[Row]]:
        """Reads a split's rows from a local folder or, failing that, the HF hub."""
        folder = self._local_dir()
        if folder is not None:
            name = self.data_files.get(split)
            if name is None:
                name = f"{split}.jsonl"
                if not (folder / name).exists() and (folder / f"{split}.csv").exists():
                    name = f"{split}.csv"
            file = folder / name
            if not file.is_file():
                raise DataError(f"split '{split}' of task '{self.name}' not found", str(file))
            return str(file), read_rows(file)
        try:
            import datasets  # lazily: slow to import and only needed for hub datasets

            ds = datasets.load_dataset(self.dataset_path, self.dataset_name, split=split,
                                       data_files=self.data_files or None)
        except Exception as e:  # noqa: BLE001 - any hub failure becomes one readable line
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(f"'{self.dataset_path}' is not a local folder (data dir: {data_dir() or 'not found; set ZOFT_DATA_DIR'}) "
                            f"and loading it from the hub failed: {first}", str(self.source),
                            field="dataset_path") from None
        label = f"{self.dataset_path}[{split}]"
        rows = [(i, dict(r)) for i, r in enumerate(ds, start=1)]
        if not rows:
            raise DataError("split is empty", label)
        return label, rows

    def load_split(self, split: str) -> list[Example]:
        """All examples of a split, validated row by row (cached).

        Raises:
            DataError: a missing or empty split file, a malformed row, a template field
                missing from a row, or an unknown label.
        """
        if split not in self._cache:
            path, rows = self._read_split(split)
            if self.explode:
                rows = explode_rows(rows, self.explode, path)
            self._cache[split] = [self._to_example(doc, path, row) for row, doc in rows]
        return list(self._cache[split])

    def get_data(self, n_train: int = 1000, n_dev: int = 500, n_eval: int = 1000, seed: int = 0,
                 k_per_class: int | None = None) -> TaskData:
        """Samples disjoint train/dev (training split) and eval (validation split) sets.

        See :func:`zoft.tasks.sampling.sample_task_data` for the rules.
        """
        same = self.training_split == self.validation_split
        train_pool = self.load_split(self.training_split)
        eval_pool = train_pool if same else self.load_split(self.validation_split)
        return sample_task_data(train_pool, eval_pool, same_split=same, n_train=n_train, n_dev=n_dev,
                                n_eval=n_eval, seed=seed, k_per_class=k_per_class, name=self.name)

    def response_columns(self, examples: list[Example]) -> dict[str, Any]:
        """Per-response columns a report needs beside the predictions (ids, second rater,
        subgroups): none for a plain task; :class:`zoft.tasks.rubric.ScoringTask` has them."""
        return {}

    # -- row conversion --------------------------------------------------------------

    def _to_example(self, doc: dict, path: str, row: int) -> Example:
        ref = f"{path}:{row}"
        context = self.description + self._text.render(doc, path, row)
        if self.kind == "generation":
            return Example(context, [], None, self._answers(doc, path, row), doc, ref)
        choices = self.label_words or self._row_choices(doc, path, row)
        target = self._target_index(self._raw_target(doc, path, row), choices, path, row)
        return Example(context, choices, target, [choices[target]], doc, ref)

    def _row_choices(self, doc: dict, path: str, row: int) -> list[str]:
        if self._choice_source is None:
            return [t.render(doc, path, row) for t in self._choices]
        if self._choice_template is not None:
            text = self._choice_template.render(doc, path, row)
            try:
                choices = ast.literal_eval(text.strip())
            except (ValueError, SyntaxError):
                raise DataError(f"doc_to_choice rendered {excerpt(text)!r}, not a list literal", path, row,
                                "doc_to_choice") from None
        else:
            choices = field_value(doc, self._choice_source)
            if choices is None:
                raise DataError("missing or null in this row (used by doc_to_choice)", path, row,
                                self._choice_source)
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise DataError("doc_to_choice must give a list of at least two strings", path, row,
                            self._choice_source)
        return choices

    def _raw_target(self, doc: dict, path: str, row: int) -> Any:
        if self._target is not None:
            return self._target.render(doc, path, row)
        value = field_value(doc, self._target_field)
        if value is None:
            raise DataError("missing or null in this row (used by doc_to_target)", path, row,
                            self._target_field)
        return value

    def _answers(self, doc: dict, path: str, row: int) -> list[str]:
        if self.answers_field is None:
            return [str(self._raw_target(doc, path, row))]
        answers = doc.get(self.answers_field)
        if isinstance(answers, str):
            answers = [answers]
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
            raise DataError("must be a non-empty list of strings", path, row, self.answers_field)
        return answers

    def _target_index(self, raw: Any, choices: list[str], path: str, row: int) -> int:
        """Maps a raw label to a choice index: via class_labels, an int index, or a choice string.

        A boolean is an index, as in lm-evaluation-harness (Python's False == 0, True == 1): with
        ``doc_to_choice: ["no", "yes"]`` false picks "no". So is the text "true"/"false" (a CSV
        cell, a rendered template) unless it is itself one of the choices.
        """
        field = self._target_field or "doc_to_target"
        stripped = [c.strip() for c in choices]
        if self.class_labels is not None:
            for i, label in enumerate(self.class_labels):
                # Also compare as text: CSV gives "true" where YAML gives True.
                if raw == label or str(raw).strip().lower() == str(label).strip().lower():
                    return i
            raise DataError(f"unknown label {raw!r} (expected one of {self.class_labels})", path, row, field)
        if isinstance(raw, str) and raw.strip().lower() in BOOLEAN_TEXT and raw.strip() not in stripped:
            raw = BOOLEAN_TEXT[raw.strip().lower()]
        if isinstance(raw, bool):
            raw = int(raw)
        if (isinstance(raw, int) and not isinstance(raw, bool)) or (isinstance(raw, str) and raw.strip().isdigit()):
            if 0 <= int(raw) < len(choices):
                return int(raw)
            raise DataError(f"label index {raw!r} out of range for {len(choices)} choices", path, row, field)
        if isinstance(raw, str) and raw.strip() in stripped:
            return stripped.index(raw.strip())
        raise DataError(f"unknown label {excerpt(raw)!r}: expected a choice index (true/false count as 1/0) or one "
                        f"of the choices {choices}; map other labels to choices with class_labels", path, row, field)


def list_tasks() -> list[str]:
    """Names of the builtin tasks."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
