"""Every benchmark script parses and answers ``--help`` (they are run by hand, so nothing else runs them)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

BENCHMARKS = sorted((Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py"))


def test_every_benchmark_script_answers_help():
    assert len(BENCHMARKS) >= 10
    # one interpreter for all of them: the imports (torch, scanpy, sctransformer) load once
    script = textwrap.dedent(
        """
        import contextlib, io, runpy, sys
        failed = []
        for path in sys.argv[1:]:
            sys.argv = [path, "--help"]
            out = io.StringIO()
            try:
                with contextlib.redirect_stdout(out):
                    runpy.run_path(path, run_name="__main__")
                failed.append(f"{path}: did not exit on --help")
            except SystemExit as exit:
                if exit.code not in (0, None) or "usage:" not in out.getvalue():
                    failed.append(f"{path}: exit {exit.code}, printed {out.getvalue()[:200]!r}")
            except Exception as error:
                failed.append(f"{path}: {type(error).__name__}: {error}")
        print("\\n".join(failed))
        sys.exit(1 if failed else 0)
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", script, *map(str, BENCHMARKS)], capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
