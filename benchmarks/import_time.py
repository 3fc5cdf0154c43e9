"""Time ``import codelens`` in fresh interpreters (target: under 2 s), against ``import torch``.

Prints, for each, the median over ``--runs`` runs of the wall time and of the CPU time
(user + system of the child process: on a loaded machine the wall time also counts the
wait for a core, the CPU time does not), their ratio, and the slowest imports (cumulative,
from ``python -X importtime``) of one ``import codelens``.

    python benchmarks/import_time.py --runs 5
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import time


def timed(statement: str, runs: int) -> tuple[float, float]:
    """Median (wall, CPU) seconds for a fresh interpreter to run ``statement``."""
    walls, cpus = [], []
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", statement], check=True)
        walls.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return statistics.median(walls), statistics.median(cpus)


def slowest_imports(statement: str, top: int) -> list[tuple[float, str]]:
    """(cumulative seconds, module) of the ``top`` slowest imports in one run."""
    err = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", statement],
        check=True,
        capture_output=True,
        text=True,
    ).stderr
    rows = []
    for line in err.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cumulative, name = (part.strip() for part in line[len("import time:") :].split("|"))
        rows.append((int(cumulative) / 1e6, name))
    return sorted(rows, reverse=True)[:top]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--top", type=int, default=8)
    args = parser.parse_args()
    print(f"median of {args.runs} fresh interpreters (wall s, CPU s):")
    results = {}
    for statement in ("pass", "import torch", "import codelens"):
        wall, cpu = results[statement] = timed(statement, args.runs)
        print(f"  python -c {statement!r:18} {wall:6.2f} {cpu:6.2f}")
    (wall, cpu), (torch_wall, torch_cpu) = results["import codelens"], results["import torch"]
    print(f"import codelens: CPU {cpu:.2f} s, wall {wall:.2f} s (target < 2 s)")
    print(f"codelens / torch: wall {wall / torch_wall:.2f}, CPU {cpu / torch_cpu:.2f}")
    print("slowest imports of one 'import codelens' (cumulative s):")
    for seconds, name in slowest_imports("import codelens", args.top):
        print(f"  {seconds:6.3f}  {name}")


if __name__ == "__main__":
    main()
