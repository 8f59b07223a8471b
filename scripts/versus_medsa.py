"""Our training step beside Medical-SAM-Adapter's own, on this machine, in one sitting: seconds per step and
peak memory of both, per net and mode, and the ratios (engine/versus_medsa.py says what each step does).

    git clone https://github.com/KidsWithTokens/Medical-SAM-Adapter ../Medical-SAM-Adapter; pip install einops
    python scripts/versus_medsa.py -medsa ../Medical-SAM-Adapter -out figs/readme/versus_medsa
    python scripts/versus_medsa.py -medsa ../Medical-SAM-Adapter -rows efficient_sam:vit_t:sam_adpt:1 -pairs 40

Per row, each toolkit is started in a fresh process of its own and builds its step; after the warm-up steps
the two take single steps in turn (Med-SA first in every other pair), so a slow phase of the machine falls
on both steps of a pair. The speed is the median over the pairs of Med-SA's seconds / ours. Ours runs under
-host_memory reuse, as train.py does; Med-SA's under the C library's defaults. Each peak is its own process's.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.cli import run_cli  # noqa: E402

TOOLKITS = ("medsa", "ours")


def serve(toolkit: str, spec: str, checkout: Path) -> None:
    """Build one toolkit's step for one row in this process, say so, then answer the parent's commands."""
    from engine.versus_medsa import Row, medsa_step, ours_step, serve_steps

    row = Row.parse(spec)
    step = medsa_step(checkout, row) if toolkit == "medsa" else ours_step(row)
    print(json.dumps({"ready": spec}), flush=True)
    serve_steps(step, sys.stdin, sys.stdout)


class Server:
    """A toolkit's step for a row in a fresh process (ours started with -host_memory reuse's environment)."""

    def __init__(self, toolkit: str, spec: str, checkout: Path):
        from engine.host_memory import start_up_environment

        self.name = f"{toolkit} {spec}"
        environment = start_up_environment("reuse", os.environ) if toolkit == "ours" else dict(os.environ)
        self.errors = tempfile.TemporaryFile("w+")  # a file, not a pipe: warnings can never fill it and block
        self.process = subprocess.Popen([sys.executable, __file__, "-medsa", str(checkout), "-serve", toolkit, spec],
                                        env=environment, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=self.errors, text=True)
        self.read()  # built

    def read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            self.process.wait()
            self.errors.seek(0)
            last_line = (self.errors.read().strip().splitlines() or ["no output"])[-1]
            from common.errors import UserError
            raise UserError(f"{self.name} failed: {last_line.removeprefix('error: ')}")
        return json.loads(line)

    def ask(self, command: str) -> dict:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self.read()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            self.process.wait()
        self.errors.close()


def measure_row(spec: str, checkout: Path, pairs: int, warmup: int) -> dict:
    """Both toolkits' paired steps and memory for one row (summarise's input)."""
    servers = {}
    try:
        for toolkit in TOOLKITS:
            servers[toolkit] = Server(toolkit, spec, checkout)
        for server in servers.values():
            server.ask(f"warm {warmup}")
        seconds = {toolkit: [] for toolkit in TOOLKITS}
        for pair in range(pairs):
            for toolkit in TOOLKITS if pair % 2 == 0 else reversed(TOOLKITS):
                seconds[toolkit].append(servers[toolkit].ask("step")["seconds"])
        measured = {"row": spec, **{f"{toolkit}_s": found for toolkit, found in seconds.items()}}
        for toolkit, server in servers.items():
            memory = server.ask("memory")
            measured |= {f"{toolkit}_peak_mb": memory["peak_mb"], f"{toolkit}_added_mb": memory["added_mb"]}
        return measured
    finally:
        for server in servers.values():
            server.close()


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
    from common.errors import UserError
    from engine.versus_medsa import DEFAULT_ROWS, Row, check_checkout, sitting_header, summarise, versus_table

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-medsa", type=Path, required=True, help="a Medical-SAM-Adapter checkout")
    parser.add_argument("-rows", default=",".join(row.spec for row in DEFAULT_ROWS),
                        help="comma-separated net:encoder:mod:batch (default: issue 16's nine rows)")
    parser.add_argument("-pairs", type=int, default=20, help="timed pairs of steps per row (one step of each toolkit)")
    parser.add_argument("-warmup", type=int, default=3, help="untimed steps of each toolkit first")
    parser.add_argument("-out", type=Path, help="write <out>.csv and <out>.md")
    parser.add_argument("-serve", nargs=2, metavar=("TOOLKIT", "ROW"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for flag, least in (("pairs", 1), ("warmup", 0)):
        if getattr(args, flag) < least:
            raise UserError(f"-{flag} must be at least {least}, got {getattr(args, flag)}")
    if args.serve:
        try:
            serve(*args.serve, args.medsa)
        except UserError as error:  # said here: Med-SA's `models` is bound now, so run_cli cannot load cfg
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)
        return []
    check_checkout(args.medsa)
    rows = [Row.parse(spec) for spec in args.rows.split(",")]
    header = sitting_header(args.medsa, args.pairs, args.warmup)
    print(header, flush=True)
    lines = []
    for row in rows:
        lines.append(summarise(measure_row(row.spec, args.medsa, args.pairs, args.warmup)))
        found = lines[-1]
        print(f"{row.spec:36s} Med-SA {found['medsa_s']:.4f} s/step, ours {found['ours_s']:.4f}: "
              f"{found['speed']:.2f}x ({found['speed_q1']:.2f}-{found['speed_q3']:.2f}); peaks "
              f"{found['medsa_peak_mb']:,.0f} / {found['ours_peak_mb']:,.0f} MB", flush=True)
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
