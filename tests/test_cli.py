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


def test_merge_command_reports_bad_settings_in_one_line(tmp_path):
    cfg = tmp_path / "merge.json"
    cfg.write_text('{"model_settings": {"model_path": "/no/such/model"}, "adapter_path": "/no/adapter", "save_path": "%s"}' % (tmp_path / "out"))
    r = _run("merge_adapters_to_base", "--settings_path", str(cfg))
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "model_path" in r.stderr or "/no/such/model" in r.stderr
