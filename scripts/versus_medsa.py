"""Our training step beside Medical-SAM-Adapter's own, on this machine, in one sitting: seconds per step and
peak memory of both, per net and mode, and the ratios (engine/versus_medsa.py says what each step does).

    git clone https://github.com/KidsWithTokens/Medical-SAM-Adapter ../Medical-SAM-Adapter; pip install einops
    python scripts/versus_medsa.py -medsa ../Medical-SAM-Adapter -out figs/readme/versus_medsa
    python scripts/versus_medsa.py -medsa ../Medical-SAM-Adapter -rows efficient_sam:vit_t:sam_adpt:1 -rounds 5

Every measurement is a fresh process. Each round measures every row once per toolkit, alternating which
goes first; a row reports each toolkit's median round (and the range), so a slow phase of the machine
falls on both. Ours runs under -host_memory reuse, as train.py does; Med-SA's under the C library's defaults.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.cli import run_cli  # noqa: E402


def child(toolkit: str, spec: str, checkout: Path, steps: int, warmup: int) -> None:
    """Measure one row of one toolkit in this process; print it as a JSON line."""
    from engine.versus_medsa import Row, medsa_step, ours_step, timed_step

    row = Row.parse(spec)
    step = medsa_step(checkout, row) if toolkit == "medsa" else ours_step(row)
    print(json.dumps({"row": spec, "toolkit": toolkit, **timed_step(step, steps, warmup)}))


def measure_in_child(toolkit: str, spec: str, args: argparse.Namespace) -> dict:
    """One row of one toolkit measured in a fresh process (ours started with -host_memory reuse's environment)."""
    from common.errors import UserError
    from engine.host_memory import start_up_environment

    environment = start_up_environment("reuse", os.environ) if toolkit == "ours" else dict(os.environ)
    command = [sys.executable, __file__, "-medsa", str(args.medsa), "-steps", str(args.steps), "-warmup",
               str(args.warmup), "-child", toolkit, spec]
    done = subprocess.run(command, env=environment, capture_output=True, text=True)
    if done.returncode != 0:
        last_line = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"{toolkit} {spec} failed: {last_line.removeprefix('error: ')}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
    from common.errors import UserError
    from engine.versus_medsa import DEFAULT_ROWS, Row, check_checkout, sitting_header, summarise, versus_table

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-medsa", type=Path, required=True, help="a Medical-SAM-Adapter checkout")
    parser.add_argument("-rows", default=",".join(row.spec for row in DEFAULT_ROWS),
                        help="comma-separated net:encoder:mod:batch (default: issue 16's nine rows)")
    parser.add_argument("-rounds", type=int, default=3)
    parser.add_argument("-steps", type=int, default=10, help="timed steps per measurement (median)")
    parser.add_argument("-warmup", type=int, default=2)
    parser.add_argument("-out", type=Path, help="write <out>.csv and <out>.md")
    parser.add_argument("-child", nargs=2, metavar=("TOOLKIT", "ROW"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for flag, least in (("rounds", 1), ("steps", 1), ("warmup", 0)):
        if getattr(args, flag) < least:
            raise UserError(f"-{flag} must be at least {least}, got {getattr(args, flag)}")
    if args.child:
        try:
            child(*args.child, args.medsa, args.steps, args.warmup)
        except UserError as error:  # said here: Med-SA's `models` is bound now, so run_cli cannot load cfg
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)
        return []
    check_checkout(args.medsa)
    rows = [Row.parse(spec) for spec in args.rows.split(",")]
    header = sitting_header(args.medsa, args.rounds, args.steps, args.warmup)
    print(header, flush=True)
    measurements = []
    for round_index in range(args.rounds):
        for row in rows:
            for toolkit in ("medsa", "ours") if round_index % 2 == 0 else ("ours", "medsa"):
                measurements.append(measure_in_child(toolkit, row.spec, args))
                found = measurements[-1]
                print(f"round {round_index + 1}/{args.rounds}: {toolkit:5s} {row.spec:36s} "
                      f"{found['sec_per_step']:.4f} s/step, peak {found['peak_mb']:,.0f} MB, added "
                      f"{found['added_mb']:,.0f} MB", flush=True)
    lines = summarise(measurements)
    table = versus_table(lines)
    print(table)
    if args.out:
        from engine.logbook import write_metrics_csv  # not before: it imports the toolkit's models

        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_metrics_csv(args.out.with_suffix(".csv"), lines)
        args.out.with_suffix(".md").write_text(f"{header}\n\n{table}\n")
    return lines


if __name__ == "__main__":
    run_cli(main)
