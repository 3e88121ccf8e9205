"""Serving a run: the batching engine, the OpenAI-compatible HTTP app, the request log, and the loop back.

    engine.py      continuous batching over the run's model (adapters of one base chosen per request)
    app.py         FastAPI app: /v1/chat/completions, /v1/completions, /v1/models, /v1/classify, /v1/score, …
    requestlog.py  the SQLite request log (WAL) and feedback; `tunesmith monitor` reads it
"""
