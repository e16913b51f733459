"""Applications of rubric scoring (the task kind is :mod:`zoft.tasks.rubric`): ``zoft score``
(:mod:`~zoft.scoring.score`), the OpenAI-compatible server (:mod:`~zoft.scoring.serve`) and
OpenAI chat JSONL export (:mod:`~zoft.scoring.openai_jsonl`)."""
