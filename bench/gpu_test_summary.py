#!/usr/bin/env python
"""Merge the GPU test shards of bench/gpu_check.sh into one log and one JUnit file, and summarise.

    python bench/gpu_test_summary.py SHARD_DIR OUT_DIR RC0 [RC1 ...]

``SHARD_DIR`` holds ``shard{i}.log`` and ``shard{i}.xml`` (pytest's output and ``--junitxml`` of
shard i of n, ``LORAFAST_TEST_SHARD=i/n``) and ``RCi`` is shard i's exit status. Writes
``OUT_DIR/gpu_tests.log`` (every shard's log under a header, then the summary) and
``OUT_DIR/gpu_tests.xml`` (the shards' ``testsuite`` elements in one ``testsuites``), and prints
the summary: per-shard counts from the XML, every FAILED/ERROR line, each failure's ``E`` lines
(pytest ``--tb=short``), and the totals. Exit status 0 (the shell script decides pass or fail
from the shards' own statuses). The shards' own files stay in SHARD_DIR: the device tool brings
back at most 8 files, so OUT_DIR gets the two merged ones only.
"""

from __future__ import annotations

import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

#: pytest's exit statuses, and what ``timeout`` makes of a stage it stopped.
STATES = {
    "0": "ok",
    "1": "tests failed",
    "2": "interrupted",
    "3": "pytest internal error",
    "4": "usage error",
    "5": "no tests collected",
    "124": "TIMED OUT (interrupted)",
    "137": "KILLED after the timeout",
}
FIELDS = ("tests", "failures", "errors", "skipped")
SECTION = re.compile(r"_{3,} (.+?) _{3,}")
MAX_MESSAGE_LINES = 12


def summarise(shard_dir: Path, out_dir: Path, shard_rcs: list[str]) -> list[str]:
    """Write the merged log and XML; return the summary lines."""
    lines = [f"===== summary: {len(shard_rcs)} shards ====="]
    totals = dict.fromkeys(FIELDS, 0)
    merged = ET.Element("testsuites")
    for index, rc in enumerate(shard_rcs):
        state = STATES.get(rc, f"exit status {rc}")
        try:
            root = ET.parse(shard_dir / f"shard{index}.xml").getroot()
        except (OSError, ET.ParseError) as exc:
            lines.append(f"shard {index}: {state}; no JUnit XML ({type(exc).__name__})")
            continue
        for suite in root.iter("testsuite"):
            counts = {name: int(suite.get(name, 0)) for name in FIELDS}
            totals = {name: totals[name] + counts[name] for name in FIELDS}
            suite.set("name", f"gpu_tests_shard{index}")
            merged.append(suite)
            passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
            lines.append(
                f"shard {index}: {state}; {passed} passed, {counts['failures']} failed, {counts['errors']} errors, "
                f"{counts['skipped']} skipped in {float(suite.get('time', 0)):.0f} s"
            )
    ET.ElementTree(merged).write(out_dir / "gpu_tests.xml", encoding="utf-8", xml_declaration=True)

    logs = []
    messages: dict[str, list[str]] = {}  # failure section title -> its "E   ..." lines
    for index, rc in enumerate(shard_rcs):
        log = shard_dir / f"shard{index}.log"
        text = log.read_text(errors="replace") if log.exists() else "(no log)\n"
        logs.append(f"===== shard {index}/{len(shard_rcs)} (exit status {rc}) =====\n{text}")
        section = None
        for line in text.splitlines():
            if line.startswith(("FAILED ", "ERROR ")):
                lines.append(line)
            elif SECTION.fullmatch(line):
                section = SECTION.fullmatch(line)[1]
            elif line.startswith("E   ") and line[4:].strip() and section is not None:
                messages.setdefault(section, []).append(line[4:])
    lines += [f"{section}: " + " | ".join(found[:MAX_MESSAGE_LINES]) for section, found in messages.items()]
    passed = totals["tests"] - totals["failures"] - totals["errors"] - totals["skipped"]
    unfinished = sum(rc in ("124", "137") for rc in shard_rcs)
    lines.append(
        f"gpu tests: {passed} passed, {totals['failures']} failed, {totals['errors']} errors, "
        f"{totals['skipped']} skipped"
        + (f"; {unfinished} shard(s) ran out of time (their remaining tests did not run)" if unfinished else "")
    )
    (out_dir / "gpu_tests.log").write_text("".join(logs) + "\n".join(lines) + "\n")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 3:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    print("\n".join(summarise(Path(args[0]), Path(args[1]), args[2:])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
