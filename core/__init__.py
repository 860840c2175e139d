"""The farm's shared core: what the API and the workers both use.

The job contract (contract.py, job.py), the settings read from the environment, the job stores
(Redis, SQLite), the queues (Celery, SQLite) and the result storage (S3, local files). Torch-free
and Flask-free: the API imports it without loading the model, and the workers without Flask.
"""
