"""`dalle-farm weights fetch|convert|verify|info`: get the weight files, check them, show them.

    fetch     download the original Flax checkpoints (Hugging Face hub, a hub mirror, or a local
              folder) and convert them; or copy min-dalle's .pt files from a mirror
    convert   convert Flax checkpoint folders already on disk
    verify    re-hash the installed files against their manifests; name any that differ
    info      what is installed: model, sizes, dtype, files and hashes, and the weights' identity

torch and the model are imported inside `run` only; see `cli.main`.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cli.main import CommandError

if TYPE_CHECKING:
    from model.weights.files import WeightPaths
    from model.weights.manifest import Manifest

MODELS_ROOT_ENV = "DALLE_FARM_MODELS_ROOT"
DTYPES = ("float16", "bfloat16", "float32")
MODEL_NAMES = {"mini": "DALL·E Mini", "mega": "DALL·E Mega"}

log = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``weights`` sub-parser and its actions."""
    parser = subparsers.add_parser(
        "weights",
        help="fetch, convert, verify and describe the weight files",
        description="Get DALL·E Mini/Mega weights from the original checkpoints, check them "
        "against their manifest, and show what is installed.",
    )
    actions = parser.add_subparsers(title="actions", dest="action", metavar="ACTION")
    actions.required = True

    fetch = actions.add_parser(
        "fetch",
        help="download the original checkpoints and convert them (or copy min-dalle's files)",
        description="Fetch what is missing of a model: by default the original Flax checkpoints "
        "from the Hugging Face hub (dalle-mini/dalle-mini or dalle-mini/dalle-mega, and "
        "dalle-mini/vqgan_imagenet_f16_16384), converted once to safetensors. Downloads resume "
        "after a break. A manifest of sha256 hashes is written beside the weights.",
    )
    _add_model_options(fetch)
    source = fetch.add_mutually_exclusive_group()
    source.add_argument(
        "--from",
        dest="hub",
        metavar="URL_OR_FOLDER",
        help="a hub to download the Flax checkpoints from ({URL}/{repo}/resolve/main/{file}), "
        "or a folder holding them ({FOLDER}/dalle-mini/dalle-mini/flax_model.msgpack, …) "
        "(default: $HF_ENDPOINT or https://huggingface.co)",
    )
    source.add_argument(
        "--pt-mirror",
        metavar="URL_OR_FOLDER",
        help="copy min-dalle's .pt files from this mirror instead (default when "
        "$DALLE_FARM_WEIGHTS_URL is set)",
    )
    fetch.add_argument(
        "--dtype",
        choices=DTYPES,
        default="float16",
        help="dtype of the converted BART files (default: %(default)s, like min-dalle's files)",
    )
    fetch.add_argument(
        "--keep-checkpoints",
        action="store_true",
        help="keep the downloaded Flax checkpoints in MODELS_ROOT/.checkpoints after converting",
    )

    convert = actions.add_parser(
        "convert",
        help="convert Flax checkpoint folders already on disk",
        description="Convert dalle-mini Flax checkpoint folders (flax_model.msgpack with "
        "config.json, and vocab.json and merges.txt for DalleBart) to safetensors in "
        "MODELS_ROOT. Each folder may hold DalleBart (Mini or Mega) or the VQGAN.",
    )
    convert.add_argument("checkpoints", nargs="+", type=Path, metavar="FOLDER")
    _add_root_option(convert)
    convert.add_argument(
        "--mega",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="install DalleBart as Mega (or Mini) (default: Mega when the checkpoint's "
        "config.json has Mega's sizes)",
    )
    convert.add_argument(
        "--dtype",
        choices=DTYPES,
        default="float16",
        help="dtype of the converted BART files (default: %(default)s)",
    )

    verify = actions.add_parser(
        "verify",
        help="re-check the installed files against their manifests",
        description="Re-hash every file in MODELS_ROOT's weight folders and compare it with "
        "the folder's manifest.json. Exits with status 1, naming the files, if any differ.",
    )
    _add_root_option(verify)

    info = actions.add_parser(
        "info",
        help="show what is installed",
        description="Show the installed models: sizes, files, dtypes, sha256 hashes, and the "
        "identity that job.json records.",
    )
    _add_root_option(info)


def _add_root_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--models-root",
        type=Path,
        default=Path(os.environ.get(MODELS_ROOT_ENV) or "pretrained"),
        help=f"folder of the weight files (default: ${MODELS_ROOT_ENV} or 'pretrained'; "
        "now %(default)s)",
    )


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--mega",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="DALL·E Mega instead of Mini (default: Mini)",
    )
    _add_root_option(parser)


def run(args: argparse.Namespace) -> int:
    """Run the ``weights`` action ``args`` asks for; return the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from model.errors import ModelError

    actions = {"fetch": _fetch, "convert": _convert, "verify": _verify, "info": _info}
    try:
        return actions[args.action](args)
    except ModelError as err:
        raise CommandError(err) from err
    except OSError as err:
        where = f" {err.filename}" if err.filename else ""
        raise CommandError(f"{err.strerror or err}{where}") from err


# -- fetch and convert ----------------------------------------------------------------------


def _fetch(args: argparse.Namespace) -> int:
    import torch

    from model.weights import fetch
    from model.weights.files import WeightPaths

    paths = WeightPaths(args.models_root, args.mega)
    if args.hub is not None:
        source = fetch.Source("hub", args.hub)
    elif args.pt_mirror is not None:
        source = fetch.Source("pt", args.pt_mirror)
    else:
        source = fetch.default_source()
    if not source.is_url and not Path(source.location).is_dir():
        raise CommandError(f"{source.location} is neither an http(s) URL nor a folder")
    name = MODEL_NAMES[paths.model_name]
    fetched = fetch.fetch_weights(
        paths,
        source,
        dtype=getattr(torch, args.dtype),
        keep_checkpoints=args.keep_checkpoints,
    )
    if fetched:
        print(f"{name} is installed in {paths.models_root} ({source})")
    else:
        print(f"{name} was already installed in {paths.models_root}; nothing to fetch")
    print("`dalle-farm weights info` shows it; `dalle-farm weights verify` checks it")
    return 0


def _convert(args: argparse.Namespace) -> int:
    import torch

    from model.weights import convert

    for folder in args.checkpoints:
        if not folder.is_dir():
            raise CommandError(f"{folder} is not a folder")
    for folder in args.checkpoints:
        output = convert.convert_checkpoint(
            folder,
            args.models_root,
            is_mega=args.mega,
            dtype=getattr(torch, args.dtype),
            show_progress=True,
        )
        print(f"converted {folder} → {output}")
    return 0


# -- verify and info ------------------------------------------------------------------------


def _weight_folders(models_root: Path) -> list[Path]:
    names = ("dalle_bart_mini", "dalle_bart_mega", "vqgan")
    return [models_root / name for name in names if (models_root / name).is_dir()]


def _verify(args: argparse.Namespace) -> int:
    from model.weights import manifest

    folders = _weight_folders(args.models_root)
    if not folders:
        raise CommandError(
            f"no weights in {args.models_root}; `dalle-farm weights fetch` gets them"
        )
    problems: list[str] = []
    for folder in folders:
        if manifest.read_manifest(folder) is None:
            print(f"NO MANIFEST  {folder}")
            problems.append(f"{folder} (no {manifest.MANIFEST_NAME})")
            continue
        mismatches = manifest.verify_folder(folder)
        for mismatch in mismatches:
            print(f"BAD  {mismatch}")
            problems.append(str(mismatch.path))
        if not mismatches:
            print(f"ok   {folder} ({len(manifest.weight_file_names(folder))} files)")
    if problems:
        raise CommandError(
            f"{len(problems)} file(s) do not match their manifest: {', '.join(problems)}. Fetch "
            "or convert them again."
        )
    return 0


def _info(args: argparse.Namespace) -> int:
    from model.weights.files import WeightPaths

    root = args.models_root
    print(f"models root: {root}")
    for is_mega in (False, True):
        paths = WeightPaths(root, is_mega)
        name = MODEL_NAMES[paths.model_name]
        if not paths.dalle_dir.is_dir():
            flag = " --mega" if is_mega else ""
            print(f"{name}: not installed (`dalle-farm weights fetch{flag}`)")
            continue
        _print_model(paths, name)
    vqgan_dir = WeightPaths(root, False).vqgan_dir
    if vqgan_dir.is_dir():
        print(f"VQGAN: {vqgan_dir}{_source_note(vqgan_dir)}")
        _print_files(vqgan_dir)
    else:
        print("VQGAN: not installed (`dalle-farm weights fetch` gets it with either model)")
    return 0


def _print_model(paths: WeightPaths, name: str) -> None:
    from model.config import ModelConfig
    from model.errors import ModelError
    from model.weights import manifest

    print(f"{name}: {paths.dalle_dir}{_source_note(paths.dalle_dir)}")
    config = ModelConfig.preset(paths.is_mega)
    if paths.config.is_file():
        config = ModelConfig.from_json(paths.config, config)
    print(
        f"  sizes: {config.layer_count} layers, {config.attention_head_count} heads, embed "
        f"{config.embed_count}, GLU {config.glu_embed_count}, text vocab "
        f"{config.text_vocab_count}, image vocab {config.image_vocab_count}, "
        f"{config.text_token_count} text tokens"
    )
    _print_files(paths.dalle_dir)
    try:
        identity = manifest.weights_identity(paths, verify=False)
    except ModelError as err:
        print(f"  identity: unavailable ({err})")
        return
    loads = ", ".join(identity["files"])
    print(f"  identity (job.json's weights.sha256): {identity['sha256']}")
    print(f"    over the files it loads: {loads}")


def _source_note(folder: Path) -> str:
    from model.weights import manifest

    found = manifest.read_manifest(folder)
    if found is None:
        return " (no manifest: files placed by hand)"
    source: dict[str, Any] = found.source
    origin = source.get("repo") or source.get("location") or source.get("checkpoint")
    kind = source.get("kind", "unknown source")
    if kind == "flax":
        kind = "converted from the Flax checkpoint"
    return f" ({kind}{f' {origin}' if origin else ''})"


def _print_files(folder: Path) -> None:
    from model.weights import manifest

    found: Manifest | None = manifest.read_manifest(folder)
    for file_name in manifest.weight_file_names(folder):
        path = folder / file_name
        record = found.files.get(file_name) if found is not None else None
        if record is not None:
            digest = record.sha256
        else:
            digest = f"{manifest.sha256_file(path)} (hashed now)"
        print(f"  {file_name:<22} {_size(path.stat().st_size):>9}  {_dtype(path):<9} {digest}")


def _dtype(path: Path) -> str:
    from model.errors import WeightsFormatError
    from model.weights.tensor_files import SAFETENSORS_SUFFIX, header_dtypes, read_header

    try:
        if path.suffix == SAFETENSORS_SUFFIX:
            return "+".join(header_dtypes(read_header(path))) or "-"
        if path.suffix == ".pt":
            import torch

            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            dtypes = {str(value.dtype).removeprefix("torch.") for value in state.values()}
            return "+".join(sorted(dtypes))
    except (WeightsFormatError, RuntimeError, OSError, ValueError, AttributeError):
        return "unreadable"
    return ""


def _size(size: int) -> str:
    if size < 1000:
        return f"{size} B"
    value = float(size)
    for unit in ("KB", "MB", "GB"):
        value /= 1000
        if value < 1000 or unit == "GB":
            break
    return f"{value:.1f} {unit}"
