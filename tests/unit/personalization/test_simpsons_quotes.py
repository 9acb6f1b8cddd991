"""The short-history dataset recipe: 'Speaker: line' rows -> one user per speaker, sized by characters."""

import json
import sqlite3
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

from simulations.simpsons_quotes import lines_by_speaker, select_speakers  # noqa: E402


def test_speakers_become_users_and_notes_are_dropped(tmp_path):
    db = tmp_path / "q.sqlite"
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE quotes (quoteid INTEGER PRIMARY KEY, library VARCHAR, quote TEXT)")
        rows = [("simpsons", "Homer: D'oh! % Mmm, donuts."), ("simpsons", "Mr. Burns: Excellent."),
                ("simpsons", "% [Note: an editor's note]"), ("simpsons", "no speaker here"),
                ("grail", "Arthur: It's only a model."), ("simpsons", "Homer: Woo-hoo!")]
        con.executemany("INSERT INTO quotes (library, quote) VALUES (?, ?)", rows)
    lines = lines_by_speaker(db)
    assert lines == {"Homer": ["D'oh! Mmm, donuts.", "Woo-hoo!"], "Mr. Burns": ["Excellent."]}
    assert select_speakers(lines, 12, 100) == {"Homer": ["D'oh! Mmm, donuts.", "Woo-hoo!"]}
    json.dumps(lines)
