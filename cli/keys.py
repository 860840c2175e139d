"""`dalle-farm keys`: create, list and revoke API keys in the configured store.

    dalle-farm keys create alice      # the secret is the last line; it is shown only once
    dalle-farm keys create bulk-bot --max-jobs 200 --rate 20/s   # with limits of its own
    dalle-farm keys set alice --rate 5/s --max-jobs default      # change them later
    dalle-farm keys list
    dalle-farm keys revoke alice      # by name or id
    dalle-farm keys webhook-secret alice          # the key's webhook signing secret
    dalle-farm keys rotate-webhook-secret alice   # a new one (the old one stops at once)

Each key has a webhook signing secret (README: Webhooks), shown by `create` and by
`webhook-secret`; a key made before webhooks gets one the first time it is asked for (or a
delivery needs it). `local` names the embedded `dalle-farm serve`'s keyless loopback owner.

The store is Redis when DALLE_FARM_REDIS_URL is set, else the embedded SQLite file in
DALLE_FARM_DATA_DIR (the one `dalle-farm serve` uses). Only a hash of each secret is stored.

Limits (core/limits.py): `--max-jobs N` jobs queued plus running (0: no limit), `--rate R/s`
(or R/m, R/h; `none`: no limit); `default` (or leaving it out at create) follows the farm's
DALLE_FARM_KEY_MAX_JOBS and DALLE_FARM_KEY_RATE.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from cli.main import CommandError

if TYPE_CHECKING:
    from core.store import ApiKey, JobStore


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
    _limit_options(create)
    change = actions.add_parser(
        "set", help="set a key's own limits (by id, or every key of a name)"
    )
    change.add_argument("id_or_name", metavar="ID_OR_NAME")
    _limit_options(change)
    actions.add_parser("list", help="list the keys (never their secrets) and their limits")
    revoke = actions.add_parser("revoke", help="revoke a key by id or name")
    revoke.add_argument("id_or_name", metavar="ID_OR_NAME")
    show = actions.add_parser(
        "webhook-secret", help="show a key's webhook signing secret (created if it has none)"
    )
    show.add_argument("id_or_name", metavar="ID_OR_NAME")
    rotate = actions.add_parser(
        "rotate-webhook-secret", help="replace a key's webhook signing secret; shows the new one"
    )
    rotate.add_argument("id_or_name", metavar="ID_OR_NAME")


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
                key, secret = store.create_key(args.name, _limits(args))
            except ValueError as error:
                raise CommandError(error) from error
            webhook_secret = store.webhook_secret(key.id)
            print(
                f"created key {key.id} ({key.name}); keep the secret below, it is not shown again"
            )
            print(
                f"webhook signing secret (`dalle-farm keys webhook-secret {key.id}` shows it "
                f"again): {webhook_secret}"
            )
            print(secret)
        elif args.action == "list":
            keys = store.list_keys()
            if not keys:
                print("no keys; create one with `dalle-farm keys create NAME`")
            for key in keys:
                state = "revoked" if key.revoked else "active"
                print(f"{key.id}  {key.name}  {key.created_at}  {state}  {_describe(key)}")
        elif args.action == "set":
            limits = _limits(args)
            if not limits:
                raise CommandError("say what to set: --max-jobs N, --rate R/s, or both")
            try:
                changed = store.set_key_limits(args.id_or_name, limits)
            except ValueError as error:
                raise CommandError(error) from error
            if not changed:
                raise CommandError(f"no key with id or name {args.id_or_name!r}")
            for key in changed:
                print(f"{key.id}  {key.name}  {_describe(key)}")
        elif args.action in ("webhook-secret", "rotate-webhook-secret"):
            owner = _owner(store, args.id_or_name)
            if args.action == "webhook-secret":
                print(store.webhook_secret(owner))
            else:
                print(store.rotate_webhook_secret(owner))
        else:
            if not store.revoke_key(args.id_or_name):
                raise CommandError(f"no key with id or name {args.id_or_name!r}")
            print(f"revoked {args.id_or_name}")
    except StoreError as error:
        raise CommandError(error) from error
    finally:
        store.close()
    return 0


DEFAULT = "default"


def _limit_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-jobs",
        metavar="N",
        help="jobs queued plus running at once (0: no limit; default: the farm's)",
    )
    parser.add_argument(
        "--rate",
        metavar="R/s",
        help="requests per second (R/s), minute (R/m) or hour (R/h); none: no limit; "
        "default: the farm's",
    )


def _limits(args: argparse.Namespace) -> dict[str, int | str | None]:
    """The limits the options give: a value, or None for `default`."""
    limits: dict[str, int | str | None] = {}
    if args.max_jobs is not None:
        if args.max_jobs == DEFAULT:
            limits["max_jobs"] = None
        elif args.max_jobs.isdigit():
            limits["max_jobs"] = int(args.max_jobs)
        else:
            raise CommandError(
                f"--max-jobs takes a whole number (0: no limit) or {DEFAULT!r}, "
                f"got {args.max_jobs!r}"
            )
    if args.rate is not None:
        limits["rate"] = None if args.rate == DEFAULT else args.rate
    return limits


def _describe(key: ApiKey) -> str:
    jobs = "farm's" if key.max_jobs is None else (str(key.max_jobs) if key.max_jobs else "none")
    rate = "farm's" if key.rate is None else key.rate
    return f"max-jobs={jobs}  rate={rate}"


def _owner(store: JobStore, id_or_name: str) -> str:
    """The id of the one key with this id or name (the embedded serve's `local` too)."""
    from cli.serve import LOCAL_OWNER

    keys = store.list_keys()
    by_id = [key for key in keys if key.id == id_or_name]
    if by_id:
        return by_id[0].id
    by_name = [key for key in keys if key.name == id_or_name and not key.revoked]
    if len(by_name) == 1:
        return by_name[0].id
    if len(by_name) > 1:
        ids = ", ".join(key.id for key in by_name)
        raise CommandError(f"several keys are named {id_or_name!r} ({ids}); give the key's id")
    if id_or_name == LOCAL_OWNER:
        return LOCAL_OWNER
    raise CommandError(f"no active key with id or name {id_or_name!r}")
