"""Rows: examples and documents made into what the model reads: packed training rows (``sequences``: image-caption
pairs and text; ``documents``: interleaved documents; ``edits``), token streams (``tokens``), and ``predict`` prompts
(``prompts``, ``geneval_prompts``)."""
