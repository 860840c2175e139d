"""Tests for the `dalle-farm` command line: real `python -m cli` processes, small random model."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from cli.generate import ascii_from_image
from cli.main import build_parser
from tests.servers import free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
SEED = "7"


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    def stderr_lines(self) -> list[str]:
        """Non-empty stderr lines; tqdm redraws with '\\r', so that splits lines too."""
        lines = self.stderr.replace("\r", "\n").splitlines()
        return [line for line in lines if line.strip()]


def cli_env(**extra: str) -> dict[str, str]:
    """The environment for a CLI process: ours, minus any DALLE_FARM_* settings from outside."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("DALLE_FARM_")}
    # One torch thread: on a small shared machine, busy cores make multi-threaded torch stall
    # in its thread synchronisation, which can make a run several times slower.
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def dalle_farm(*args: str | Path, timeout: float = 120, **env: str) -> Result:
    """Run ``python -m cli ARGS`` from the repository root and capture its output."""
    proc = subprocess.run(
        [sys.executable, "-m", "cli", *map(str, args)],
        cwd=REPO_ROOT,
        env=cli_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def assert_one_line_error(result: Result, prefix: str = "dalle-farm") -> str:
    """The run failed with exactly one error line and no traceback; return that line."""
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr_lines() if ": error:" in line]
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith(prefix), errors[0]
    return errors[0]


def png(path: Path) -> Image.Image:
    with Image.open(path) as image:
        image.load()
        assert image.format == "PNG"
        return image


@pytest.fixture(scope="module")
def models_root(small_models_root: Path) -> Path:
    return small_models_root


@pytest.fixture(scope="module")
def generated(models_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Result]:
    """One plain generation (seed SEED, saved as out.png), shared by several tests."""
    out = tmp_path_factory.mktemp("generated") / "out"
    result = dalle_farm(
        "generate", "--models-root", models_root, "--image-path", out, "--seed", SEED
    )
    assert result.returncode == 0, result.stderr
    return out.with_suffix(".png"), result


# -- generating -----------------------------------------------------------------------------


def test_generate_writes_png_and_prints_preview(generated: tuple[Path, Result]) -> None:
    path, result = generated
    assert png(path).size == (256, 256)
    assert f"saving image to {path}" in result.stdout
    preview = [line for line in result.stdout.splitlines() if len(line) == 128]
    assert len(preview) == 64
    assert set("".join(preview)) <= set(".,;/IOX")
    assert "Traceback" not in result.stderr


def test_same_seed_same_bytes_and_directory_path(
    generated: tuple[Path, Result], models_root: Path, tmp_path: Path
) -> None:
    # An existing directory as --image-path gets generated.png inside it.
    first, _ = generated
    result = dalle_farm(
        "generate", "--models-root", models_root, "--image-path", tmp_path, "--seed", SEED
    )
    assert result.returncode == 0, result.stderr
    second = tmp_path / "generated.png"
    assert f"saving image to {second}" in result.stdout
    assert second.read_bytes() == first.read_bytes()


def test_grid_size_2(models_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "grid.png"
    result = dalle_farm(
        "generate", "--models-root", models_root, "--image-path", out, "--grid-size", "2"
    )
    assert result.returncode == 0, result.stderr
    assert png(out).size == (512, 512)


def test_progressive_saves_frames(
    generated: tuple[Path, Result], models_root: Path, tmp_path: Path
) -> None:
    result = dalle_farm(
        "generate",
        "--models-root", models_root,
        "--image-path", tmp_path / "prog",
        "--seed", SEED,
        "--progressive",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    frames = [tmp_path / f"prog-frame-{k}.png" for k in range(1, 9)]
    assert sorted(tmp_path.iterdir()) == sorted([*frames, tmp_path / "prog.png"])
    for frame in frames:
        assert png(frame).size == (256, 256)
    final = (tmp_path / "prog.png").read_bytes()
    assert final == frames[-1].read_bytes()
    # Progressive output only adds frames: the final image is the plain run's.
    assert final == generated[0].read_bytes()
    assert png(frames[0]).tobytes() != png(frames[-1]).tobytes()


# -- errors ---------------------------------------------------------------------------------


def test_offline_without_weights_is_one_line(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/"
    result = dalle_farm(
        "generate",
        "--models-root", tmp_path,
        "--image-path", tmp_path / "out",
        DALLE_FARM_WEIGHTS_URL=url,
    )  # fmt: skip
    assert result.returncode == 1
    line = assert_one_line_error(result, prefix="dalle-farm: error:")
    assert str(tmp_path) in line
    assert url in line
    assert "decoding" not in result.stderr  # failed before any progress bar
    assert not (tmp_path / "out.png").exists()


def test_missing_output_folder_fails_before_loading(tmp_path: Path) -> None:
    out = tmp_path / "missing" / "out"
    result = dalle_farm("generate", "--models-root", tmp_path, "--image-path", out)
    assert result.returncode == 1
    line = assert_one_line_error(result, prefix="dalle-farm: error:")
    assert str(out.parent) in line
    assert not any(tmp_path.iterdir())  # nothing downloaded or created


@pytest.mark.parametrize(
    "args",
    [
        ["--grid-size", "0"],
        ["--grid-size", "1.5"],
        ["--top-k", "0"],
        ["--top-k", "20000"],
        ["--temperature", "0"],
        ["--temperature", "nan"],
        ["--supercondition-factor", "inf"],
        ["--dtype", "float64"],
        ["--text", "   "],
    ],
)
def test_bad_input_is_one_line(args: list[str], tmp_path: Path) -> None:
    result = dalle_farm("generate", "--models-root", tmp_path, *args)
    assert result.returncode == 2  # argparse's status for usage errors
    line = assert_one_line_error(result, prefix="dalle-farm generate: error:")
    assert args[0] in line


def test_interrupt_is_one_line(models_root: Path, tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", "generate", "--models-root", str(models_root),
         "--image-path", str(tmp_path / "out"), "--progressive"],
        cwd=REPO_ROOT,
        env=cli_env(),
        # Ctrl-C's default action, even when pytest runs in the background (where a shell
        # makes its children ignore SIGINT).
        preexec_fn=_default_sigint,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    assert proc.stderr is not None
    seen = []
    try:
        # Interrupt once sampling starts: eight VQGAN frames are still to come.
        for line in proc.stderr:
            seen.append(line)
            if line.startswith("sampling"):
                proc.send_signal(signal.SIGINT)
                break
        stderr = "".join(seen) + proc.stderr.read()
        returncode = proc.wait(timeout=60)
    finally:
        proc.kill()
        proc.stderr.close()
    assert returncode == 130, stderr
    assert "Traceback" not in stderr
    assert stderr.replace("\r", "\n").splitlines()[-1] == "dalle-farm: interrupted"


# -- parser and help ------------------------------------------------------------------------


def test_parser_defaults_and_aliases(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DALLE_FARM_MODELS_ROOT", raising=False)
    args = build_parser().parse_args(["generate"])
    assert (args.text, args.mega, args.seed) == ("Dali painting of WALL·E", False, -1)
    assert args.dtype == "float32"
    assert (args.grid_size, args.image_path, args.models_root) == (1, "generated", "pretrained")
    assert (args.top_k, args.temperature, args.supercondition_factor) == (256, 1.0, 16.0)
    assert (args.seamless, args.progressive, args.device) == (False, False, "auto")

    args = build_parser().parse_args(["generate", "--fp16", "--mega", "--top_k", "5"])
    assert (args.dtype, args.mega, args.top_k) == ("float16", True, 5)
    assert build_parser().parse_args(["generate", "--mega", "--no-mega"]).mega is False

    monkeypatch.setenv("DALLE_FARM_MODELS_ROOT", "/weights")
    assert build_parser().parse_args(["generate"]).models_root == "/weights"


def test_help_lists_generate_without_torch() -> None:
    result = dalle_farm("--help")
    assert result.returncode == 0
    assert "generate" in result.stdout
    # The entry point must stay torch-free: the API process will share it.
    check = "import sys, cli.main; cli.main.build_parser(); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", check], cwd=REPO_ROOT, env=cli_env(), check=True)


# -- ASCII preview --------------------------------------------------------------------------


def test_ascii_from_image_shape_and_characters() -> None:
    gradient = Image.linear_gradient("L").convert("RGB")  # black at the top, white at the bottom
    rows = ascii_from_image(gradient).split("\n")
    assert len(rows) == 64
    assert all(len(row) == 128 for row in rows)
    assert rows[0] == "." * 128
    assert set("".join(rows)) <= set(".,;/IOX")
    assert len(set("".join(rows))) == 7  # 64 of 70 rows still span every character

    assert ascii_from_image(Image.new("RGB", (256, 256), "white"), size=20) == "\n".join(
        ["X" * 20] * 10
    )


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
