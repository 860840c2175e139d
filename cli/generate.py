"""`dalle-farm generate`: text → image, the equivalent of min-dalle's image_from_text.py.

Same options and defaults as that script (Mini, float32, random seed, one image saved to
``generated.png``, an ASCII preview on stdout), plus the sampling settings, seamless and
progressive output, and a progress bar over the decoder's 256 steps.

torch and the model are imported inside `run` only; see `cli.main`.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import secrets
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from cli.main import CommandError
from model.config import VQGAN_CODE_COUNT

if TYPE_CHECKING:
    import torch
    from PIL import Image

DEFAULT_TEXT = "Dali painting of WALL·E"
MODELS_ROOT_ENV = "DALLE_FARM_MODELS_ROOT"
DTYPES = ("float32", "float16", "bfloat16")
MAX_GRID_SIZE = 16
# torch.Generator.manual_seed takes seeds up to 2**64 - 1.
MAX_SEED = 2**64 - 1
# The ASCII preview's characters, darkest first, and width, as in min-dalle's script.
ASCII_CHARS = ".,;/IOX"
ASCII_SIZE = 128

log = logging.getLogger(__name__)


# -- arguments ------------------------------------------------------------------------------


def _int_between(low: int, high: int) -> Callable[[str], int]:
    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
        if not low <= number <= high:
            raise argparse.ArgumentTypeError(f"must be from {low} to {high}, got {number}")
        return number

    return parse


def _finite_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {value!r}")
    return number


def _positive_float(value: str) -> float:
    number = _finite_float(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {value!r}")
    return number


def _seed(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
    if number > MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_SEED}, got {number}")
    return number


def _text(value: str) -> str:
    if not value.strip():
        raise argparse.ArgumentTypeError("the prompt must not be blank")
    return value


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``generate`` sub-parser."""
    parser = subparsers.add_parser(
        "generate",
        help="generate an image from a text prompt (like min-dalle's image_from_text.py)",
        description="Generate an image (or a grid of images) from a text prompt, save it as "
        "a PNG and print an ASCII preview.",
    )
    parser.add_argument(
        "--text", type=_text, default=DEFAULT_TEXT, help="the prompt (default: %(default)r)"
    )
    parser.add_argument(
        "--mega",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="use DALL·E Mega instead of Mini (default: Mini)",
    )
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default="float32",
        help="dtype of the BART encoder and decoder (default: %(default)s)",
    )
    parser.add_argument(
        "--fp16",
        dest="dtype",
        action="store_const",
        const="float16",
        help="same as --dtype float16 (min-dalle's spelling)",
    )
    parser.add_argument(
        "--seed",
        type=_seed,
        default=-1,
        help="random seed; 0 or less picks one at random (default: %(default)s)",
    )
    parser.add_argument(
        "--grid-size",
        type=_int_between(1, MAX_GRID_SIZE),
        default=1,
        help="generate a grid of N×N images (default: %(default)s)",
    )
    parser.add_argument(
        "--image-path",
        default="generated",
        help="where to save the PNG; '.png' is appended if missing, and an existing folder "
        "gets generated.png inside it (default: %(default)s)",
    )
    parser.add_argument(
        "--models-root",
        default=os.environ.get(MODELS_ROOT_ENV) or "pretrained",
        help=f"folder of the weight files, downloaded there if missing "
        f"(default: ${MODELS_ROOT_ENV} or 'pretrained'; now %(default)r)",
    )
    parser.add_argument(
        "--top-k",
        "--top_k",
        dest="top_k",
        type=_int_between(1, VQGAN_CODE_COUNT),
        default=256,
        help="sample each token from the K most likely ones (default: %(default)s)",
    )
    parser.add_argument(
        "--temperature",
        type=_positive_float,
        default=1.0,
        help="sampling temperature (default: %(default)s)",
    )
    parser.add_argument(
        "--supercondition-factor",
        type=_finite_float,
        default=16.0,
        help="classifier-free guidance strength (default: %(default)s)",
    )
    parser.add_argument("--seamless", action="store_true", help="make the image tile seamlessly")
    parser.add_argument(
        "--progressive",
        action="store_true",
        help="also save the 8 intermediate frames as <name>-frame-<k>.png",
    )
    parser.add_argument(
        "--device",
        default="auto",
        help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda if available, else cpu)",
    )


# -- output ---------------------------------------------------------------------------------


def output_path(image_path: str) -> Path:
    """Where the image goes, decided as min-dalle's script does.

    An existing folder gets ``generated.png`` inside it; any other path gets ``.png`` appended
    unless it already ends with it.
    """
    if os.path.isdir(image_path):
        return Path(image_path, "generated.png")
    if not image_path.endswith(".png"):
        image_path += ".png"
    return Path(image_path)


def frame_path(path: Path, frame: int) -> Path:
    """The file of progressive frame ``frame`` (1-based), beside the final image."""
    return path.with_name(f"{path.stem}-frame-{frame}.png")


def ascii_from_image(image: Image.Image, size: int = ASCII_SIZE) -> str:
    """A text preview of ``image``: ``size // 2`` rows of ``size`` characters from '.,;/IOX'.

    Same output as min-dalle's script: the image is resized to ``size`` by ``int(0.55 * size)``
    pixels (text characters are about twice as tall as wide) and converted to grayscale, each
    pixel picks a character by brightness, and only the first ``size // 2`` rows are kept (the
    script drops the bottom rows too; we keep its output identical).
    """
    gray = image.resize((size, int(0.55 * size))).convert("L").tobytes()
    chars = "".join(ASCII_CHARS[value * len(ASCII_CHARS) // 256] for value in gray)
    return "\n".join(chars[row * size : (row + 1) * size] for row in range(size // 2))


def _save(image: Image.Image, path: Path) -> None:
    # tqdm.write rather than print: it keeps an active progress bar intact.
    tqdm.write(f"saving image to {path}")
    try:
        image.save(path)
    except OSError as err:
        raise CommandError(f"cannot save image to {path}: {err.strerror or err}") from err


class DecodeProgress:
    """A progress bar over the decoder's steps, driven by MinDalle's ``on_step`` callback.

    The bar appears at the first step, so nothing is drawn when loading fails before it.
    """

    def __init__(self) -> None:
        self._bar: tqdm | None = None

    def __call__(self, step: int, total: int) -> None:
        if self._bar is None:
            self._bar = tqdm(total=total, desc="decoding", unit="token", file=sys.stderr)
        self._bar.update(step - self._bar.n)
        if step == total:
            self.close()

    def close(self) -> None:
        """Finish the bar, if any; safe to call more than once."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None


# -- running --------------------------------------------------------------------------------


def _device(name: str) -> torch.device:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise CommandError(f"invalid --device {name!r}: {err}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CommandError(f"--device {name}: CUDA is not available on this machine")
    return device


def _check_folder(path: Path) -> None:
    # Fail before the model loads rather than after minutes of generation.
    folder = path.parent
    if not folder.is_dir():
        raise CommandError(f"cannot save image to {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise CommandError(f"cannot save image to {path}: folder {folder} is not writable")


def _random_seed() -> int:
    # Picked here rather than inside MinDalle so it can be shown, and a liked image remade.
    return secrets.randbelow(2**63 - 1) + 1


def run(args: argparse.Namespace) -> int:
    """Generate, save and preview an image as ``args`` asks; return the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path = output_path(args.image_path)
    _check_folder(path)

    import torch
    from tqdm.contrib.logging import logging_redirect_tqdm

    from model.errors import ModelError
    from model.min_dalle import MinDalle

    device = _device(args.device)
    seed = args.seed if args.seed > 0 else _random_seed()
    progress = DecodeProgress()
    # Log lines go through tqdm while a bar is drawn, so they do not tear it.
    with logging_redirect_tqdm():
        try:
            model = MinDalle(
                models_root=args.models_root,
                dtype=getattr(torch, args.dtype),
                device=device,
                is_mega=args.mega,
                is_reusable=False,
                is_verbose=True,
            )
            log.info("seed %d", seed)
            frames = model.generate_image_stream(
                text=args.text,
                seed=seed,
                grid_size=args.grid_size,
                progressive_outputs=args.progressive,
                is_seamless=args.seamless,
                temperature=args.temperature,
                top_k=args.top_k,
                supercondition_factor=args.supercondition_factor,
                is_verbose=True,
                on_step=progress,
            )
            image = None
            for number, image in enumerate(frames, start=1):
                if args.progressive:
                    _save(image, frame_path(path, number))
        except (ModelError, ValueError, OSError) as err:
            raise CommandError(err) from err
        finally:
            progress.close()
    assert image is not None  # the stream always yields the final image
    _save(image, path)
    print(ascii_from_image(image))
    return 0
