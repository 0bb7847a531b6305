"""pyproject.toml: an installed copy is importable from elsewhere and asks for what requirements.txt asks.

Runs on every Python the project declares (3.10 and later): tomllib is 3.11+, so the two string
arrays compared here are read with a small reader, checked against tomllib where it exists.
"""
import ast
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def toml_string_array(text: str, key: str) -> list[str]:
    """The array of strings `key = [...]` in a TOML text whose strings hold no '#', '[' or ']'."""
    found = re.search(rf"^{re.escape(key)}\s*=\s*\[(.*?)\]", text, re.S | re.M)
    assert found, f"pyproject.toml has no {key} = [...]"
    body = "\n".join(line.split("#")[0] for line in found.group(1).splitlines())   # drop comments
    return ast.literal_eval(f"[{body}]")


def test_dependencies_match_requirements_txt():
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        text = f.read()
    dependencies, test_extra = toml_string_array(text, "dependencies"), toml_string_array(text, "test")
    if sys.version_info >= (3, 11):   # the small reader agrees with a real TOML parser
        import tomllib   # novermin (3.11+, behind the version check)
        project = tomllib.loads(text)["project"]
        assert (dependencies, test_extra) == (project["dependencies"], project["optional-dependencies"]["test"])
        assert project["requires-python"] == ">=3.10"
    norm = lambda s: s.replace(" ", "").replace("'", '"')
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        lines = [norm(line) for line in f.read().splitlines() if line.strip() and not line.startswith("#")]
    runtime = [line for line in lines if not line.startswith("pytest")]
    assert [norm(d) for d in dependencies] == runtime
    assert [norm(d) for d in test_extra] == [line for line in lines if line.startswith("pytest")]


def build_command(src, wheel) -> list[str]:
    """pip wheel for the project copy: offline with the setuptools this Python has, else in pip's
    isolated build environment, which installs setuptools>=61 from the package index (a fresh
    Python 3.12+ venv has no setuptools)."""
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    return [sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q", "-w", str(wheel), str(src)]


def test_the_installed_package_imports_from_another_folder(tmp_path):
    src, wheel = tmp_path / "src", tmp_path / "wheel"   # a copy: building writes build/ and *.egg-info beside it
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "diffgap.py", "diffgap_eval.py"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    for name in ("kernels", "embed_cache"):
        shutil.copytree(os.path.join(ROOT, name), src / name, ignore=shutil.ignore_patterns("__pycache__"))
    build = subprocess.run(build_command(src, wheel), cwd=tmp_path, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-2000:]
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                    *map(str, wheel.glob("*.whl"))], check=True, capture_output=True)
    # no top-level name that another PyPI distribution installs (Hugging Face's `kernels`)
    (whl,) = wheel.glob("*.whl")
    with zipfile.ZipFile(whl) as z:
        top = {name.split("/")[0].removesuffix(".py") for name in z.namelist() if ".dist-info" not in name}
    assert top == {"diffgap", "diffgap_eval", "diffgap_kernels", "embed_cache"}, top
    code = ("import diffgap, diffgap_eval, diffgap_kernels, embed_cache; "
            "assert diffgap._fused_step in (diffgap_kernels.fused_linear_temb_silu, None); "
            "print(diffgap.__file__, diffgap_eval.__file__, diffgap_kernels.__file__, embed_cache.__file__, "
            "len(embed_cache.load('synthetic:n_train=64,n_val=8,n_test=8', 'audio-video').splits['train'].a), "
            "diffgap._fused_step is diffgap_kernels.fused_linear_temb_silu)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(site)},
                         capture_output=True, text=True, check=True).stdout.split()
    assert all(path.startswith(str(site)) for path in out[:4]) and out[4] == "64"
    assert out[5] == "True"     # installed, diffgap.py finds its kernels under their installed name


def test_a_python_without_setuptools_builds_in_isolation(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "setuptools" else real(name, *a))
    assert "--no-build-isolation" not in build_command("src", "wheel")
    monkeypatch.undo()
    assert ("--no-build-isolation" in build_command("src", "wheel")) == (real("setuptools") is not None)
