"""The `dalle-farm` command line: one console script with a subcommand per task.

Importing this package (or `cli.main`) must stay cheap and torch-free, so that torch-free
processes such as the API server can share it; subcommands import heavy modules inside `run`.
"""
