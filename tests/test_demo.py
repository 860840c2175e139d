"""scripts/demo offline: the fetch fails, the script says so plainly, falls back to random
weights, renders a real job on the embedded farm and ends with the web app's address.

The hub is a loopback port nothing listens on, so the fetch fails at once, as it does on a
machine without network. The script runs as a user would start it (bash, its own venv).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.servers import free_port

ROOT = Path(__file__).resolve().parent.parent
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_the_demo_offline_falls_back_to_random_weights_and_says_so(tmp_path: Path) -> None:
    closed, port = free_port(), free_port()
    empty = tmp_path / "no-weights"
    env = {
        **os.environ,
        "DALLE_FARM_DEMO_DIR": str(tmp_path),
        "DALLE_FARM_DEMO_PORT": str(port),
        "DALLE_FARM_MODELS_ROOT": str(empty),
        "HF_ENDPOINT": f"http://127.0.0.1:{closed}",
    }
    env.pop("DALLE_FARM_WEIGHTS_URL", None)
    env.pop("DALLE_FARM_MODEL", None)
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "demo"), "a red apple"],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "Traceback" not in output
    assert "could not connect to the server" in output  # the fetch was tried, and why it failed
    assert "Using RANDOM weights instead" in output
    assert f"put DALL·E mini's weights in {empty} by hand" in output
    assert done.stdout.rstrip().endswith(f"The web app: http://127.0.0.1:{port}/")
    assert (tmp_path / ".demo-weights").is_dir()
    assert (tmp_path / "demo-grid.png").read_bytes().startswith(PNG_SIGNATURE)
