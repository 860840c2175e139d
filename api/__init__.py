"""The farm's REST API: Flask, torch-free. It validates and records jobs, enqueues their ids, and
shows their records; workers do the rendering.

    app.py        create_app(settings, store=, storage=, queue=) and create_app_from_env()
    services.py   Services (store, storage, queue, tokenizer) built from Settings
    auth.py       Bearer API keys, or one anonymous owner for the embedded `serve`
    routes.py     /v1: jobs and result files
    job_json.py   a JobRecord as the API shows it
    health.py     /healthz and /readyz
    metrics.py    /metrics (Prometheus), read from the store at scrape time
    operations.py what each route accepts and answers (for the generated document)
    openapi.py    the OpenAPI 3.1 document at /openapi.json, generated from the app
    docs.py       /docs: Swagger UI, served from the farm
    server.py     the HTTP server (waitress); protocol.py, its limits and problem answers
    problems.py   every error as RFC 9457 application/problem+json
"""
