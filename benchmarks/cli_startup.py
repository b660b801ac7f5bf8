"""Start-up time of the command line: wall time of `fpt --help` and of every command's `--help`, each run in a
fresh interpreter (best and median of N runs), and which heavy libraries the parser imported (none should be).

Run from the repository root with the project's venv: `python benchmarks/cli_startup.py [N]`.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import time

COMMANDS = [[], ["info"], ["preload"], ["train"], ["evaluate"], ["predict"], ["synth"], ["demo"], ["bench", "memory"]]
COMMANDS += [["bench", "accuracy"]]
CHECK = "import sys; from fpt.cli import build_parser; build_parser(); print(sorted(m for m in {} if m in sys.modules))"
HEAVY = ("torch", "timm", "sklearn", "matplotlib", "tensorboard", "torchvision")


def main(runs: int) -> None:
    fpt = shutil.which("fpt") or sys.exit("fpt is not on PATH; activate the project's venv")
    print("| command | best (s) | median (s) |\n| --- | ---: | ---: |")
    for command in COMMANDS:
        seconds = []
        for _ in range(runs):
            started = time.perf_counter()
            subprocess.run([fpt, *command, "--help"], check=True, stdout=subprocess.DEVNULL)
            seconds.append(time.perf_counter() - started)
        print(f"| `fpt {' '.join([*command, '--help'])}` | {min(seconds):.2f} | {statistics.median(seconds):.2f} |")
    imported = subprocess.run([sys.executable, "-c", CHECK.format(HEAVY)], capture_output=True, text=True, check=True)
    print(f"\nheavy libraries imported by the parser: {imported.stdout.strip()}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
