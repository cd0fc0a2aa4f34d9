"""Issue 16, bug 8: error messages, docstrings and comments cited ``PITFALLS.md``, a team notes file
that users do not have.  What a user can read (the package, notebooks, README, docs, benchmarks and
scripts) states each fact itself."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ("lora_lab", "notebooks", "docs", "benchmarks", "scripts", "binder")


def test_nothing_users_read_cites_the_team_notes():
    files = [ROOT / "README.md"] + [p for d in SHIPPED for p in (ROOT / d).rglob("*")
                                     if p.suffix in (".py", ".ipynb", ".md", ".txt", ".html")]
    assert len(files) > 50
    cited = [str(p.relative_to(ROOT)) for p in files if "PITFALLS" in p.read_text(errors="ignore")]
    assert not cited, cited
