"""Writes that cannot fail late or half: outputs checked before the work, every file written atomically under a
unique temporary name, and `import common` free of POSIX-only modules (issue 12, items 3 and 4)."""
import ast
import errno
import json
import os
import re
import subprocess
import sys
import threading

import pytest
import torch
from safetensors.torch import load_file

from peftsum.errors import UsageError
from peftsum import runtime
from peftsum.runtime import peak_memory_mb
from peftsum.methods import apply_lora
from peftsum.files import weights_lock
from peftsum.weights import write_safetensors
from peftsum.interop import export_peft, load_model
from conftest import ROOT, cli


@pytest.fixture
def base(tiny_dir, data_dir, tmp_path):
    return ["--model", tiny_dir, "--data", data_dir, "--max-new-tokens", 4, "--test-size", 2, "--eval-batch-size",
            2, "--batch-size", 4, "--max-steps", 2]


@pytest.mark.parametrize("flag", ["--out", "--weights"])
def test_an_output_that_cannot_be_written_fails_before_the_work(base, tmp_path, flag):
    """A --out or --weights inside a path that is a file (as a read-only or missing disk would be) fails in seconds,
    before any training step, and writes nothing."""
    (tmp_path / "file").write_text("x")
    target = tmp_path / "file" / ("runs" if flag == "--out" else "w.safetensors")
    defaults = {"--out": tmp_path / "runs", "--weights": tmp_path / "w.safetensors"}
    p = cli("main2.py", *base, *(x for f, v in (defaults | {flag: target}).items() for x in (f, v)), "--train")
    folder = target if flag == "--out" else target.parent
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip() == f"error: cannot write to {folder}: {tmp_path / 'file'} is a file, not a folder"
    assert "epoch" not in p.stdout and sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_a_failed_write_is_one_line_and_keeps_the_previous_file(base, tmp_path, monkeypatch):
    """Disk full while writing the run record: one line, and the record of the previous run stays whole (never the
    0-byte file that broke report.py); no temporary file is left."""
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "hard_prompt-24.json").write_text('{"old": true}')
    replace = os.replace

    def disk_full(src, dst):
        if str(dst).endswith(".json"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        replace(src, dst)
    monkeypatch.setattr(os, "replace", disk_full)
    p = cli("main2.py", *base, "--out", runs, "--baseline", "--overwrite")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip() == f"error: cannot write {runs / 'hard_prompt-24.json'}: No space left on device"
    assert json.loads((runs / "hard_prompt-24.json").read_text()) == {"old": True}
    assert sorted(p.name for p in runs.iterdir()) == ["hard_prompt-24.json", "hard_prompt-24.predictions.jsonl"]


def test_concurrent_writers_never_collide(tmp_path):
    """Unique temporary names: four writers saving one checkpoint path 50 times each never fail (a fixed name made
    44 of 6,400 concurrent saves fail), and the file is always whole."""
    path, errors = tmp_path / "w.ckpt.safetensors", []

    def writer(value):
        try:
            for _ in range(50):
                write_safetensors(path, {"x": torch.full((256,), float(value))}, {"state": "{}"})
                x = load_file(path)["x"]
                assert (x == x[0]).all()
        except Exception as e:  # noqa: BLE001 (collected for the assertion below)
            errors.append(e)
    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert [p.name for p in tmp_path.iterdir()] == ["w.ckpt.safetensors"]


def test_exports_appear_whole_or_not_at_all(tmp_path, tiny_dir, monkeypatch):
    model, tok = load_model(str(tiny_dir))
    apply_lora(model, 2, 4)

    def fail(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr("peftsum.interop.save_file", fail)
    with pytest.raises(UsageError, match="cannot write .*adapter: No space left on device"):
        export_peft(model, tmp_path / "adapter")
    assert list(tmp_path.iterdir()) == []  # no half adapter folder, no temporary folder


def test_import_common_needs_no_posix_only_module(monkeypatch, tmp_path):
    """`import resource` at the top made `import common` fail on Windows: POSIX-only modules are imported where
    they are used, and each use has a fallback."""
    for path in [ROOT / "common.py", *sorted((ROOT / "peftsum").glob("*.py"))]:
        tree = ast.parse(path.read_text())
        top = {alias.name.split(".")[0] for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))
               for alias in node.names} | {node.module for node in tree.body if isinstance(node, ast.ImportFrom)}
        assert not top & {"resource", "fcntl", "termios", "pwd", "grp", "posix"}, path
    monkeypatch.setitem(sys.modules, "resource", None)  # as on Windows: importing it raises ImportError
    monkeypatch.setattr(runtime, "PROC_STATUS", str(tmp_path / "no-proc"))  # and there is no /proc
    monkeypatch.setitem(sys.modules, "fcntl", None)
    assert peak_memory_mb(torch.device("cpu")) != peak_memory_mb(torch.device("cpu"))  # NaN: unknown
    with weights_lock(tmp_path / "w.safetensors"):
        assert list(tmp_path.iterdir()) == []  # no lock file: Windows has no flock (and no lock here)


def test_the_torch_free_modules_import_no_torch():
    """`--help`, the checks of the flags, sweep.py's names, atomic writes and all of report.py need no torch: the
    torch-free modules stay so."""
    code = ("import sys; import peftsum.config, peftsum.records, peftsum.files, peftsum.results, peftsum.figures; "
            "print(*sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers') "
            "or m == 'matplotlib.pyplot'))")  # pyplot: a global backend, a notebook's changed by an import
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.strip() == "", p.stdout[:300] + p.stderr


def test_every_name_the_readme_library_example_uses_is_in_common():
    """The README's library example calls common.<name>: each exists, and common's map lists every module."""
    import common
    readme = (ROOT / "README.md").read_text()
    example = readme.split("## Library", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    names = set(re.findall(r"common\.(\w+)", example))
    assert names >= {"load_model", "apply_lora", "generate", "rouge"}
    assert not [n for n in names if not hasattr(common, n)]
    modules = {p.stem for p in (ROOT / "peftsum").glob("*.py")} - {"__init__"}
    assert all(re.search(rf"^  {m}\b", common.__doc__, re.M) for m in modules), "a module missing from the map"


def test_each_module_imports_only_modules_above_it_in_the_map():
    """common.py's docstring lists the package's modules in import order; no module imports one below it."""
    import common
    order = re.findall(r"^  (\w+)\s", common.__doc__, re.M)
    assert sorted(order) == sorted(p.stem for p in (ROOT / "peftsum").glob("*.py") if p.stem != "__init__")
    for i, name in enumerate(order):
        tree = ast.parse((ROOT / "peftsum" / f"{name}.py").read_text())
        used = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "peftsum"
                for a in n.names}
        used |= {n.module.split(".")[1] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                 and (n.module or "").startswith("peftsum.")}
        assert used <= set(order[:i]), f"{name} imports {sorted(used - set(order[:i]))}, listed after it"


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="Linux's /proc only")
def test_a_trainings_peak_memory_counts_from_its_start():
    """What a training records as its peak memory is its own, not the model loading's: 300 MB held and freed
    before `reset_peak_memory` are not in the peak after it."""
    cpu = torch.device("cpu")
    big = torch.ones(300 * 2**20 // 4)  # 300 MB, written
    del big
    before = peak_memory_mb(cpu)
    runtime.reset_peak_memory(cpu)
    assert peak_memory_mb(cpu) < before - 200


def test_written_weights_have_the_permissions_of_any_new_file(tmp_path, tiny):
    """safetensors writes through mkstemp (0600): our weights, checkpoints and exports get what open() gives a new
    file (0666 less the umask), so another user of the machine can read them as they read the rest."""
    import copy
    import os
    import torch
    from peftsum.interop import export_merged, export_peft
    from peftsum.methods import apply_lora
    from peftsum.weights import write_safetensors
    umask = os.umask(0o022)
    os.umask(umask)
    expected = 0o666 & ~umask
    write_safetensors(tmp_path / "w.safetensors", {"x": torch.zeros(2)}, {})
    model, tokenizer = tiny
    model = apply_lora(copy.deepcopy(model), 2, 4)
    export_peft(model, tmp_path / "adapter")
    export_merged(model, tokenizer, tmp_path / "merged")
    written = [tmp_path / "w.safetensors", *(tmp_path / "adapter").iterdir(), *(tmp_path / "merged").iterdir()]
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in written} == {p.name: oct(expected) for p in written}
