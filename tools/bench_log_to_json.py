"""Recover benchmark rows from a `python -m bench.kernels` log (its `print_table` blocks) as JSON.

For runs whose JSON was lost (session 2's per-kernel runs overwrote one file) but whose printed
tables survive: each block is a title line, a header line of column names and one line per row;
numbers keep the printed precision (3 significant digits), `-` becomes null.

    python tools/bench_log_to_json.py LOG OUT.json --env-from OTHER.json [--set KEY=VALUE ...]
        (env copied from a JSON of the same session and machine; --set corrects or adds entries,
        e.g. flashinfer=0.7.4 measured_commit=e991099)
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path


def _value(text: str) -> object:
    if text == "-":
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def parse_tables(log: str) -> dict[str, list[dict]]:
    """{kernel name (the title's first word, before ':'): rows} for every table in `log`."""
    tables: dict[str, list[dict]] = {}
    lines = log.splitlines()
    for i, line in enumerate(lines[:-1]):
        title = re.match(r"^([a-z_0-9]+)(?: \(|:)", line)
        if not title or not re.match(r"^\s*model\s", lines[i + 1]):
            continue
        columns = lines[i + 1].split()
        rows = []
        for row in lines[i + 2 :]:
            cells = row.split()
            if len(cells) != len(columns):
                break
            rows.append(dict(zip(columns, map(_value, cells))))
        tables[title.group(1)] = rows
    return tables


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("log")
    parser.add_argument("out")
    parser.add_argument("--env-from", help="a JSON of the same run whose `env` to copy")
    parser.add_argument("--set", nargs="*", default=[], help="env entries KEY=VALUE")
    args = parser.parse_args()
    env = json.loads(Path(args.env_from).read_text())["env"] if args.env_from else {}
    env.update(item.split("=", 1) for item in args.set)
    kernels = parse_tables(Path(args.log).read_text())
    out = {"env": env, "parsed_from_log": Path(args.log).name, "kernels": kernels}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"{args.out}: " + ", ".join(f"{k} {len(v)} rows" for k, v in kernels.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
