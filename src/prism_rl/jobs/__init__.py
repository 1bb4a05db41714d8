"""Jobs: things that load a model and generate for users.

``difficulty`` (``prism data filter-difficulty``) samples a policy on a problem set and keeps the
problems of middling pass rate; ``serve`` (``prism serve``) answers OpenAI-style chat requests.
They sit above ``data/``, ``models/``, ``rollout/`` and ``eval/``, so that ``data/`` stays free of
models and generation.
"""
