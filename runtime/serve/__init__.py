"""`mamba2-aot serve`: an OpenAI-compatible HTTP server with continuous batching over state slots.

A layer on runtime.engine (nothing in the engine, format or tools imports it). Modules:
  config.py     ServeConfig: the server's settings, checked against the artifact
  scheduler.py  continuous batching: the queue, admission in prefill chunks, decode blocks (no HTTP)
  slots.py      the decode batch on the device: N slots' state and logits, rows written in and read out
  schemas.py    OpenAI request bodies -> checked requests; response and chunk shapes
  errors.py     ApiError and OpenAI's error body
  text.py       tokenizer, chat template, incremental detokenizer, stop strings
  exchange.py   one API request through the scheduler: its choices, text, response or SSE chunks
  service.py    loading, readiness, draining: what the app serves from
  metrics.py    Prometheus series
  app.py        the FastAPI app (routes, auth, body limit, errors)
  server.py     uvicorn with drain-on-SIGTERM
  cli.py        the `serve` command
"""
