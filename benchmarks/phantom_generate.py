"""Seconds and peak memory to generate synthetic chest-CT phantoms (default and adult-sized grids).

Run: ``.venv/bin/python benchmarks/phantom_generate.py [--quick]``; records benchmarks/results/phantom_generate.json.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

from _record import peak_rss_mib, record

from nodulenet.preprocess.phantom import PhantomConfig, make_phantom


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="3 seeds instead of 10")
    args = parser.parse_args()
    seeds = range(3 if args.quick else 10)
    figures = {}
    for name, config in (("default_288", PhantomConfig()), ("adult_384", replace(PhantomConfig(), shape_yx=(384, 384)))):
        times, shapes = [], []
        for seed in seeds:
            t0 = time.perf_counter()
            ph = make_phantom(seed, config)
            times.append(time.perf_counter() - t0)
            shapes.append(list(ph.image.shape_zyx))
        figures[name] = {
            "seconds_median": round(statistics.median(times), 3),
            "seconds_max": round(max(times), 3),
            "n_seeds": len(times),
            "shapes_zyx": shapes,
        }
        print(f"{name}: median {figures[name]['seconds_median']} s, max {figures[name]['seconds_max']} s")
    figures["peak_rss_mib"] = round(peak_rss_mib(), 1)
    print(f"peak RSS {figures['peak_rss_mib']} MiB")
    record("phantom_generate", figures)


if __name__ == "__main__":
    main()
