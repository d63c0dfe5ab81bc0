"""Every figure and results table, from the run records that main*.py and sweep.py write.

  python3 report.py             every set of runs under runs/ (one folder per model and data, e.g. runs/smollm2):
                                its figures into plots/<set>/, its table into README.md between the markers
                                <!-- results:<set>:start --> and <!-- results:<set>:end -->
                                and the runs in runs/ itself (where main*.py write by default): their table
                                printed here, their figures into runs/plots/
  python3 report.py --runs DIR --out DIR --readme FILE [--section NAME] [--note TEXT]     one set, anywhere

A set's NOTE file (or --note) labels its figures and table: which model, data and machine the numbers come from;
its first line is each figure's one-line subtitle, the lines after it the table's caption (one line: both).
A figure whose runs are missing is skipped with a line saying which sweep makes them; a figure of an earlier report
that cannot be made again is removed, and the report says so. Nothing to report: exit code 2.
"""
import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from peftsum.errors import UsageError  # noqa: E402  (these modules import no torch)
from peftsum.figures import CAPTIONS, FIGURES, Figures  # noqa: E402
from peftsum.files import write_text  # noqa: E402
from peftsum.records import SHIPPED, load_runs, shipped_runs  # noqa: E402
from peftsum.results import Results, load_next_tokens  # noqa: E402


def readme_text(readme: Path, section: str) -> str:
    """The text of the README that will take the section: a file, with both markers."""
    start, end = f"<!-- results:{section}:start -->", f"<!-- results:{section}:end -->"
    if not readme.is_file():
        raise UsageError(f"--readme {readme}: {'a folder' if readme.is_dir() else 'no such file'}; give the README "
                         "whose results section to replace")
    content = readme.read_text()
    if start not in content or end not in content:
        raise UsageError(f"{readme} has no {start} ... {end} markers: add them where the table goes")
    return content


def write_section(readme: Path, section: str, text: str) -> None:
    """The section between its markers, in the README as it is now (read again: it may have been edited while the
    figures were drawn)."""
    start, end = f"<!-- results:{section}:start -->", f"<!-- results:{section}:end -->"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    write_text(readme, pattern.sub(lambda _: f"{start}\n{text}{end}", readme_text(readme, section)))


def shown(path: Path) -> str:
    """A path as the report names it: relative to the repository where it is inside it."""
    try:
        return path.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        return str(path)


def report(runs_dir: Path, out: Path, readme: Path | None, section: str, note: str, shipped: Path = SHIPPED) -> None:
    """The figures of the runs in `runs_dir` into `out`, and their section into `readme` between its markers (None:
    printed here); the section says which runs the weights in `shipped` are."""
    runs = load_runs(runs_dir)
    if not runs:
        print(f"error: no run records in {runs_dir}: run main*.py or sweep.py first", file=sys.stderr)
        sys.exit(2)
    if readme is not None:
        readme_text(readme, section)  # before any figure is drawn
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file: give a folder for the figures")
    if not note and (runs_dir / "NOTE").is_file():
        note = (runs_dir / "NOTE").read_text()
    out.mkdir(parents=True, exist_ok=True)
    results = Results(runs, note, load_next_tokens(runs_dir), load_runs(runs_dir, "validation"),
                      shipped_runs(runs, shipped), source=shown(runs_dir))
    written = Figures(results, out).draw()
    for stale in sorted(set(FIGURES) - set(written)):
        if (out / stale).exists():
            (out / stale).unlink()
            print(f"removed {out / stale}: an earlier report's figure whose runs are not in {runs_dir}")
    if readme is None:
        print(results.section({f: CAPTIONS[f] for f in written}, str(out)))
        print(f"wrote {', '.join(written) or 'no figures'} to {out}")
        return
    try:
        figure_dir = out.resolve().relative_to(readme.resolve().parent).as_posix()
    except ValueError:
        figure_dir = str(out)
    write_section(readme, section, results.section({f: CAPTIONS[f] for f in written}, figure_dir))
    print(f"wrote {', '.join(written) or 'no figures'} to {out}; the '{section}' results into {readme}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=Path, help="one folder of run records (default: every folder under runs/)")
    p.add_argument("--out", type=Path, help="folder for its figures (default: plots/<folder name>)")
    p.add_argument("--readme", type=Path, default=ROOT / "README.md", help="README whose results section to replace")
    p.add_argument("--section", help="the README section's name (default: the runs folder's name)")
    p.add_argument("--note", default="", help="a label for the figures and the table (default: the folder's NOTE)")
    args = p.parse_args()
    if args.runs:
        report(args.runs, args.out or ROOT / "plots" / args.runs.name, args.readme, args.section or args.runs.name,
               args.note)
        return
    sets = sorted(d for d in (ROOT / "runs").glob("*/") if any(d.glob("*.json")))
    own = any((ROOT / "runs").glob("*.json"))  # what main*.py write with their default --out
    if not sets and not own:
        print("error: no run records in runs/: run main*.py or sweep.py first", file=sys.stderr)
        sys.exit(2)
    for d in sets:
        report(d, ROOT / "plots" / d.name, args.readme, d.name, args.note)
    if own:
        report(ROOT / "runs", ROOT / "runs" / "plots", None, "runs", args.note)


if __name__ == "__main__":
    try:
        main()
    except UsageError as e:  # a file it cannot write: one line, as the scripts say it
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
