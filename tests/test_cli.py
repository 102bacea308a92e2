import subprocess, sys


def _run(*args, **kw):
    return subprocess.run([sys.executable, "-m", "alignlab", *args], capture_output=True, text=True, timeout=120, **kw)


def test_help_lists_commands_and_imports_nothing_heavy():
    r = _run("--help")
    assert r.returncode == 0 and "quickstart" in r.stdout and "zoo" in r.stdout
    r = subprocess.run([sys.executable, "-c", "import sys, alignlab, alignlab.cli; print(sorted(m for m in ('torch','transformers','peft','panel') if m in sys.modules))"],
                       capture_output=True, text=True)
    assert r.stdout.strip() == "[]", r.stdout


def test_console_script_is_installed():
    import shutil
    exe = shutil.which("alignlab")
    assert exe, "pip install -e . registers the alignlab command"
    assert subprocess.run([exe, "--help"], capture_output=True).returncode == 0


def test_bad_input_is_one_line_and_non_zero():
    r = _run("zoo", "card", "nope")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "unknown zoo item 'nope'" in r.stderr


def test_zoo_list_and_path(tiny_llama):
    r = _run("zoo", "list")
    assert "tiny-llama" in r.stdout and "built" in r.stdout
    assert _run("zoo", "path", "tiny-llama").stdout.strip() == str(tiny_llama)
