"""The README is a newcomer's page: short, its Python example runs, its commands use real options."""
import ast
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md")).read()


def test_readme_is_short_and_its_picture_exists():
    assert len(README.splitlines()) <= 260
    assert len(open(os.path.join(ROOT, "results", "README.md")).read().splitlines()) <= 400
    for path in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", README):
        assert os.path.isfile(os.path.join(ROOT, path)), path


def test_every_option_in_a_readme_command_is_one_the_script_has():
    scripts = {"train.py": "train.py", "sample.py": "sample.py", "embed_cache.extract": "-m embed_cache.extract"}
    helps = {}
    for line in (part for text in README.splitlines() for part in re.split(r"&&|;", text)):
        for name, invocation in scripts.items():
            if re.search(rf"(python|torchrun)[^#]*\b{re.escape(name)}\b", line):
                if name not in helps:
                    cmd = [sys.executable, *invocation.split(), "--help"] if name.startswith("embed") else \
                        [sys.executable, os.path.join(ROOT, name), "--help"]
                    helps[name] = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
                for flag in re.findall(r"\s(--[a-z][a-z-]*)", line.split(name, 1)[1].split("#")[0]):
                    assert flag in helps[name], (name, flag, line)
    assert set(helps) == set(scripts)


def test_the_python_example_runs_and_two_way_beats_contrastive():
    code = re.search(r"## From Python\n.*?```python\n(.*?)```", README, re.S).group(1)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    r1 = ast.literal_eval(out.stdout.strip().splitlines()[-1])
    assert set(r1) == {"contrastive", "diffgap", "two-way"} and all(0 <= v <= 1 for v in r1.values())
    assert r1["two-way"] > r1["contrastive"] + 0.1
