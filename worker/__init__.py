"""Celery workers that render jobs, and the job contract they share with the API."""
