"""Packaging a user can live with: the library asks for ranges, so installing it beside another torch keeps that torch;
the exact CPU pins live in constraints.txt, which the README's commands and .ci/run use."""
import configparser, json, subprocess, sys, venv
from pathlib import Path
from packaging.requirements import Requirement

ROOT = Path(__file__).parents[1]

def _requirements():
    ini = configparser.ConfigParser(); ini.read(ROOT / "settings.ini")
    return [Requirement(r) for r in ini["DEFAULT"]["requirements"].split()]


def test_runtime_requirements_are_ranges_with_the_tested_floor():
    reqs = {r.name: r for r in _requirements()}
    assert not [str(r) for r in reqs.values() if any(s.operator == "==" for s in r.specifier)], "exact pins belong in constraints.txt"
    torch = reqs["torch"].specifier
    assert torch.contains("2.13.0") and torch.contains("2.14.1") and torch.contains("3.0.0") and not torch.contains("2.12.0")
    pins = (ROOT / "constraints.txt").read_text()
    assert "torch==2.13.0" in pins
    readme, ci = (ROOT / "README.md").read_text(), (ROOT / ".ci/run").read_text()
    assert readme.count("pip install -c constraints.txt -e") == 2 and "pip install -c constraints.txt -e" in ci


def test_install_beside_another_torch_keeps_it(tmp_path):
    """A fresh venv whose installed torch is 2.14.1 (only its metadata: the resolver reads nothing else): pip's plan for
    `pip install -e .` installs alignlab and its other requirements, not a torch."""
    env = tmp_path / "venv"
    venv.create(env, with_pip=True)
    py = env / "bin" / "python"
    site = Path(subprocess.check_output([py, "-c", "import site; print(site.getsitepackages()[0])"], text=True).strip())
    info = site / "torch-2.14.1.dist-info"  # 2.14.1: another release, inside this machine's pip cap (/etc/xdg/pip)
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 2.14.1\n")
    (info / "INSTALLER").write_text("pip\n"); (info / "RECORD").write_text("")
    report = tmp_path / "report.json"
    r = subprocess.run([py, "-m", "pip", "install", "-q", "--dry-run", "-e", str(ROOT), "--report", str(report)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    names = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}
    assert "alignlab" in names and "transformers" in names  # the plan is real: it resolves the library's requirements
    assert "torch" not in names, f"pip would replace the installed torch 2.14.1 by {names.get('torch')}"
