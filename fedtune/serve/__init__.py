"""`fedtune serve`: an OpenAI-compatible server for one base model and many users' LoRA adapters.

    app.py        routes: /v1/models, /v1/completions, /v1/chat/completions (SSE streaming), OpenAI errors
    schemas.py    request bodies and response shapes
    scheduler.py  groups concurrent requests into one batched generate with mixed adapters
    engine.py     the batched decode loop (per-row adapter, temperature, top_p, seed)
    pool.py       served adapters and the bounded LRU of those loaded into the peft model
    watcher.py    adapters from the registry through the verified device pull, hot-swapped on promote
    text.py       chat template, incremental detokenization, stop strings
    server.py     assembly (``build_server``) + uvicorn (``serve``)
Nothing is imported here, so the engine, pool and scheduler run without FastAPI (GPU benchmarks).
"""
