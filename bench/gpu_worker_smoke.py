"""The worker's own path on a GPU: Engine.load, then jobs rendered from several threads at once.

The jobs decode together in the worker's BatchEngine (as under Celery's thread pool), with the
batch sized by free memory. Two rounds of 8 jobs (grids 1×1 to 4×4); the first captures the CUDA
graphs. Prints each job's time and PNG sizes.

    DALLE_FARM_MODEL=mega DALLE_FARM_MODELS_ROOT=/tmp/mega python -m bench.gpu_worker_smoke
"""

from __future__ import annotations

import threading
import time

from core.job import JobParams
from core.settings import Settings
from worker.engine import Engine


def main() -> None:
    settings = Settings.from_env()
    start = time.perf_counter()
    engine = Engine.load(settings)
    print(f"Engine.load: {time.perf_counter() - start:.1f} s, batch rows {engine.batch.max_rows}")
    results: dict[int, tuple[float, int, int]] = {}

    def render(i: int) -> None:
        job_start = time.perf_counter()
        params = JobParams(
            text=f"a fox number {i}",
            seed=10 + i,
            grid_size=1 + i % 4,
            model="mega" if settings.model == "mega" else "mini",
        )
        rendered = engine.render(params, job_id=f"job{i}")
        seconds = time.perf_counter() - job_start
        results[i] = (seconds, len(rendered.grid_png), len(rendered.tile_pngs))

    try:
        for round_number in range(2):
            threads = [threading.Thread(target=render, args=(i,)) for i in range(8)]
            round_start = time.perf_counter()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            print(f"round {round_number}: 8 jobs in {time.perf_counter() - round_start:.2f} s")
            for i, (seconds, png_bytes, tiles) in sorted(results.items()):
                print(f"  job {i}: {seconds:.2f} s, grid PNG {png_bytes} bytes, {tiles} tiles")
    finally:
        engine.close()


if __name__ == "__main__":
    main()
