"""Mutation testing of the paper part of diffgap.py: do the fast tests catch a changed line?

mutmut (pinned below) changes one thing at a time in diffgap.py's sections 1-4 (schedule,
denoiser, diffusion, training loop; the metrics of section 5 and the raise lines, which only
build messages, are left alone) and runs the tests that cover the changed function, fastest
first; a mutant is killed when a test fails. It works on a copy of the repository in --work,
never on the checkout, and it is long (a first pass takes about 40 minutes on 2 cores), so it
is not part of CI:

    pip install mutmut==3.8.1
    python benchmarks/mutation.py --minutes 10     # repeat until it says "all mutants tested"
    python benchmarks/mutation.py --report         # killed / tested, and every survivor's diff

Each run stops after --minutes (Ctrl-C-like, the results so far are kept) and the next one goes
on where it stopped, with the checkout's tests as they are then; --retest marks the survivors
untested (after a test was added for them) and goes on like a plain run; --fresh starts over
from the checkout's current files. Each test process uses one thread (OMP_NUM_THREADS=1):
mutmut forks them from a warm process, and --jobs of them run at once. results/README.md ("Mutation testing") has the figure and why each survivor is
harmless or which test now catches it.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MUTMUT = "3.8.1"
SECTION_5 = "# 5. Metrics"        # where the paper part of diffgap.py ends

# The fast tests that exercise sections 1-4 (a few seconds each; nothing that starts a process)
TESTS = [
    "tests/test_schedule.py",
    "tests/test_sampler.py",
    "tests/test_training.py",
    "tests/test_model.py",
    "tests/test_user_faults.py",
    "tests/test_reliability.py::test_resume_at_any_step_is_bit_identical",
    "tests/test_reliability.py::test_an_epoch_is_a_permutation_of_whole_batches",
    "tests/test_score_choice.py::test_translate_is_the_mean_of_sample_many",
    "tests/test_score_choice.py::test_the_trained_model_earns_the_score_auto_chooses_on_validation",
    "tests/test_cli.py::test_cond_writes_the_seeded_mean_of_samples_in_the_asked_direction",
    "-k", "not works_alone and not torchrun and not diverging",
]

SETUP_CFG = """[mutmut]
source_paths = diffgap.py
also_copy =
    diffgap_eval.py
    train.py
    sample.py
    embed_cache/
    kernels/
    benchmarks/
pytest_add_cli_args_test_selection =
{tests}
do_not_mutate_patterns =
    ^\\s*raise\\s
"""


def copy_checkout(src: str) -> None:
    """The checkout's tracked files (as they are now, edits included) into src, section 5 of
    diffgap.py fenced off with mutmut's pragmas, and the mutmut configuration beside them."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if os.path.isfile(os.path.join(ROOT, name)):
            os.makedirs(os.path.dirname(os.path.join(src, name)) or src, exist_ok=True)
            shutil.copy2(os.path.join(ROOT, name), os.path.join(src, name))
    path = os.path.join(src, "diffgap.py")
    text = open(path).read()
    if SECTION_5 not in text:
        raise SystemExit(f"error: diffgap.py: no line starting {SECTION_5!r}: cannot find the end of the paper part")
    head, tail = text.split(SECTION_5, 1)
    with open(path, "w") as f:
        f.write(head + "# pragma: no mutate start\n" + SECTION_5 + tail.rstrip("\n") + "\n# pragma: no mutate end\n")
    with open(os.path.join(src, "setup.cfg"), "w") as f:
        f.write(SETUP_CFG.format(tests="\n".join("    " + t for t in TESTS)))


def refresh_tests(src: str) -> None:
    """The checkout's tests as they are now into the copy: earlier verdicts are kept, new tests join."""
    for name in os.listdir(os.path.join(ROOT, "tests")):
        if name.endswith(".py"):
            shutil.copy2(os.path.join(ROOT, "tests", name), os.path.join(src, "tests", name))


def run(src: str, minutes: float, jobs: int) -> None:
    """mutmut run of every mutant not yet tested, for at most `minutes`;
    interrupted, it keeps every result it has. Its progress goes to mutmut.log beside src."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    log = open(os.path.join(os.path.dirname(src), "mutmut.log"), "a")
    proc = subprocess.Popen([sys.executable, "-m", "mutmut", "run", "--max-children", str(jobs)], cwd=src,
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        proc.wait(timeout=60 * minutes)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGINT)      # mutmut stops its workers and saves what it has
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        print(f"stopped after {minutes:g} minutes: run again to go on")


def results(src: str) -> dict[str, str]:
    """{mutant name: status} from mutmut's record of diffgap.py."""
    from mutmut.stats import status_by_exit_code
    meta = os.path.join(src, "mutants", "diffgap.py.meta")
    if not os.path.exists(meta):
        return {}
    codes = json.load(open(meta))["exit_code_by_key"]
    return {name: status_by_exit_code[code] for name, code in codes.items()}


def report(src: str) -> None:
    status = results(src)
    if not status:
        raise SystemExit(f"error: {src}: no mutation results yet: run without --report first")
    tested = {n: s for n, s in status.items() if s not in ("not checked", "check was interrupted by user")}
    counts = {s: sum(1 for v in tested.values() if v == s) for s in sorted(set(tested.values()))}
    killed = counts.get("killed", 0) + counts.get("timeout", 0)
    print(f"{len(tested)} of {len(status)} mutants tested: {killed} killed ({100 * killed / max(1, len(tested)):.1f}%)"
          f"; " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    if len(tested) == len(status):
        print("all mutants tested")
    cwd = os.getcwd()
    os.chdir(src)          # mutmut reads its configuration and mutants from here
    try:
        from mutmut.__main__ import get_diff_for_mutant
        for name, s in sorted(tested.items()):
            if s not in ("killed", "timeout"):
                diff = get_diff_for_mutant(name)
                changed = [line for line in diff.splitlines() if line[:1] in "+-" and line[:3] not in ("+++", "---")]
                print(f"\n{name}: {s}\n" + "\n".join(changed))
    finally:
        os.chdir(cwd)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "diffgap-mutation"),
                   help="folder for the copy and mutmut's results (default: %(default)s)")
    p.add_argument("--minutes", type=float, default=10.0, help="stop after this long (default 10); rerun to go on")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="test processes at once (default: the cores)")
    p.add_argument("--fresh", action="store_true", help="forget earlier results and copy the checkout again")
    p.add_argument("--report", action="store_true", help="print the figure and the survivors, run nothing")
    p.add_argument("--retest", action="store_true", help="test the survivors again, with the checkout's tests as they are now")
    args = p.parse_args()
    try:
        import mutmut
    except ImportError:
        raise SystemExit(f"error: mutmut is not installed: pip install mutmut=={MUTMUT}") from None
    if mutmut.__version__ != MUTMUT:
        print(f"warning: mutmut {mutmut.__version__}, the figures in results/README.md are from {MUTMUT}")
    src = os.path.join(args.work, "src")
    if args.report:
        report(src)
        return 0
    if args.fresh and os.path.exists(args.work):
        shutil.rmtree(args.work)
    if not os.path.exists(src):
        copy_checkout(src)
    refresh_tests(src)
    if args.retest:   # their verdicts forgotten, the survivors are tested again like new ones, resumably
        meta = os.path.join(src, "mutants", "diffgap.py.meta")
        record = json.load(open(meta))
        survivors = [n for n, s in results(src).items() if s not in ("killed", "timeout", "not checked")]
        for name in survivors:
            record["exit_code_by_key"][name] = None
        with open(meta, "w") as f:
            json.dump(record, f)
        print(f"testing again the {len(survivors)} mutants that survived, with the checkout's tests")
    t0 = time.monotonic()
    run(src, args.minutes, args.jobs)
    done = results(src)
    left = sum(1 for s in done.values() if s in ("not checked", "check was interrupted by user"))
    print(f"{len(done) - left} of {len(done)} mutants tested in total ({time.monotonic() - t0:.0f} s this run)"
          + ("; all mutants tested" if done and not left else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
