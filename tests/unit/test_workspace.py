import pytest

from fedtune.errors import UserError
from fedtune.workspace import check_run_root


def test_new_empty_and_resumable_roots_pass(tmp_path):
    check_run_root(tmp_path / "new", resume=False)
    check_run_root(tmp_path, resume=False)  # empty
    (tmp_path / "checkpoint.json").write_text("{}")
    check_run_root(tmp_path, resume=True)
    with pytest.raises(UserError, match="pass --resume"):
        check_run_root(tmp_path, resume=False)


def test_a_foreign_directory_is_refused_even_with_resume(tmp_path):
    (tmp_path / "thesis.tex").write_text("x")
    for resume in (False, True):
        with pytest.raises(UserError, match="not empty and is not a fedtune run"):
            check_run_root(tmp_path, resume=resume)
