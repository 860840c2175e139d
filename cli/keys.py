"""`dalle-farm keys`: create, list and revoke API keys in the configured store.

    dalle-farm keys create alice      # the secret is the last line; it is shown only once
    dalle-farm keys list
    dalle-farm keys revoke alice      # by name or id

The store is Redis when DALLE_FARM_REDIS_URL is set, else the embedded SQLite file in
DALLE_FARM_DATA_DIR (the one `dalle-farm serve` uses). Only a hash of each secret is stored.
"""

from __future__ import annotations

import argparse

from cli.main import CommandError


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``keys`` sub-parser and its create, list and revoke commands."""
    parser = subparsers.add_parser(
        "keys",
        help="create, list and revoke API keys",
        description="Manage the API keys that requests carry as 'Authorization: Bearer KEY'.",
    )
    actions = parser.add_subparsers(title="actions", dest="action", metavar="ACTION")
    actions.required = True
    create = actions.add_parser("create", help="create a key; its secret is the last line")
    create.add_argument("name", help="who or what the key is for")
    actions.add_parser("list", help="list the keys (never their secrets)")
    revoke = actions.add_parser("revoke", help="revoke a key by id or name")
    revoke.add_argument("id_or_name", metavar="ID_OR_NAME")


def run(args: argparse.Namespace) -> int:
    """Run the keys action; return the exit status."""
    from cli.api import load_settings
    from core.services import build_store
    from core.store import StoreError

    settings = load_settings()
    try:
        store = build_store(settings)
    except (StoreError, OSError) as error:
        raise CommandError(error) from error
    try:
        if args.action == "create":
            try:
                key, secret = store.create_key(args.name)
            except ValueError as error:
                raise CommandError(error) from error
            print(
                f"created key {key.id} ({key.name}); keep the secret below, it is not shown again"
            )
            print(secret)
        elif args.action == "list":
            keys = store.list_keys()
            if not keys:
                print("no keys; create one with `dalle-farm keys create NAME`")
            for key in keys:
                state = "revoked" if key.revoked else "active"
                print(f"{key.id}  {key.name}  {key.created_at}  {state}")
        else:
            if not store.revoke_key(args.id_or_name):
                raise CommandError(f"no key with id or name {args.id_or_name!r}")
            print(f"revoked {args.id_or_name}")
    except StoreError as error:
        raise CommandError(error) from error
    finally:
        store.close()
    return 0
