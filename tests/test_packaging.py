"""pyproject.toml: an installed copy is importable from elsewhere and asks for what requirements.txt asks."""
import os
import shutil
import subprocess
import sys
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_dependencies_match_requirements_txt():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    norm = lambda s: s.replace(" ", "").replace("'", '"')
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        lines = [norm(line) for line in f.read().splitlines() if line.strip() and not line.startswith("#")]
    runtime = [line for line in lines if not line.startswith("pytest")]
    assert [norm(d) for d in project["dependencies"]] == runtime
    assert [norm(d) for d in project["optional-dependencies"]["test"]] == [line for line in lines if line.startswith("pytest")]


def test_the_installed_package_imports_from_another_folder(tmp_path):
    src, wheel = tmp_path / "src", tmp_path / "wheel"   # a copy: building writes build/ and *.egg-info beside it
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "diffgap.py"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    for name in ("kernels", "embed_cache"):
        shutil.copytree(os.path.join(ROOT, name), src / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheel),
                    str(src)], check=True, cwd=tmp_path, capture_output=True)
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                    *map(str, wheel.glob("*.whl"))], check=True, capture_output=True)
    code = ("import diffgap, kernels, embed_cache; "
            "print(diffgap.__file__, kernels.__file__, embed_cache.__file__, len(embed_cache.load('synthetic:n_train=64,"
            "n_val=8,n_test=8', 'audio-video').splits['train'].a))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(site)},
                         capture_output=True, text=True, check=True).stdout.split()
    assert all(path.startswith(str(site)) for path in out[:3]) and out[3] == "64"
