"""Mutation testing of diffgap.py and of kernels/: do the fast tests catch a changed line?

A tool beside the tests (pytest does not collect it). --target diffgap (the default): mutmut
(pinned below) changes one thing at a time in diffgap.py, the paper (schedule, denoiser,
diffusion, training loop; raise lines, which only build messages, are left alone), and runs the
tests that cover the changed function, fastest first; a mutant is killed when a test fails.
mutmut forks each test run from a warm process, but it never mutates a decorated function, so
every @triton.jit kernel would be left alone: for

--target kernels, cosmic-ray (pinned below) edits the kernel files themselves (every .py file
under kernels/ when the session starts: the kernels, their launchers, autograd.Functions, tile
configs and the torch path) and runs the kernel tests (the Triton interpreter, and the sm_80 /
sm_90 compiles) in a fresh process per mutant. Its operators are cut to one natural replacement
each, as mutmut makes (+ -, * /, < <=, == !=, numbers +-1, `not` added or removed, ...):
cosmic-ray's default replaces every operator by every other (thousands of mutants, most of them
`+` -> `>>` and the like), which 2 cores cannot run. Raise statements are skipped, as for diffgap.py.

Both work on a copy of the repository in --work, never on the checkout, and are long (a first
pass takes about 40 minutes on 2 cores for diffgap.py, about 70 for kernels/), so they are not
part of CI:

    pip install mutmut==3.8.1 cosmic-ray==8.7.0
    python tests/mutation.py --minutes 10     # repeat until it says "all mutants tested"
    python tests/mutation.py --report         # killed / tested, and every survivor's diff
    python tests/mutation.py --target kernels --minutes 10    # the same for kernels/
    python tests/mutation.py --target kernels --report

Each run stops after --minutes (Ctrl-C-like, the results so far are kept) and the next one goes
on where it stopped, with the checkout's tests as they are then (for diffgap.py, also with its
code as it is then: mutmut tests again every function whose code changed); --retest marks the
survivors untested (after a test was added for them) and goes on like a plain run; --fresh
starts over from the checkout's current files (for kernels/, also its current list of files).
For diffgap.py each test process uses one thread (OMP_NUM_THREADS=1) and --jobs of them run at
once; for kernels/ one runs at a time. results/README.md ("Mutation testing") has the figures
and why each survivor is harmless or which test now catches it.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MUTMUT = "3.8.1"
COSMIC_RAY = "8.7.0"

# The fast tests that exercise diffgap.py (a few seconds each; nothing that starts a process)
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
    """The checkout's files as they are now (edits and files git does not ignore included) into src."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if os.path.isfile(os.path.join(ROOT, name)):   # a file deleted in the checkout is still listed
            os.makedirs(os.path.dirname(os.path.join(src, name)) or src, exist_ok=True)
            shutil.copy2(os.path.join(ROOT, name), os.path.join(src, name))


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
    stop_after(proc, minutes)


def stop_after(proc: subprocess.Popen, minutes: float) -> None:
    """Wait for the tool; after `minutes`, Ctrl-C it (it keeps what it has) and wait for it."""
    try:
        proc.wait(timeout=60 * minutes)
    except (subprocess.TimeoutExpired, KeyboardInterrupt):   # Ctrl-C here stops it the same way
        os.killpg(proc.pid, signal.SIGINT)      # mutmut stops its workers and saves what it has
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        print("stopped: run again to go on")


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


# -- kernels/: cosmic-ray ------------------------------------------------------------------------

# Fastest first, those of them that exist when the session starts; -x: the first failure kills the mutant
KERNEL_TESTS = ["tests/test_kernels.py", "tests/test_first_use.py", "tests/test_aot.py"]
# The operators kept, one natural replacement each (cosmic-ray names them Kind_From_To)
KEPT_OPERATORS = re.compile(
    r"core/(ReplaceBinaryOperator_(Add_Sub|Sub_Add|Mul_Div|Div_Mul|FloorDiv_Div|Mod_FloorDiv|Pow_Mul|"
    r"BitAnd_BitOr|BitOr_BitAnd|BitXor_BitOr|LShift_RShift|RShift_LShift)"
    r"|ReplaceComparisonOperator_(Lt_LtE|LtE_Lt|Gt_GtE|GtE_Gt|Eq_NotEq|NotEq_Eq|Is_IsNot|IsNot_Is)"
    r"|ReplaceUnaryOperator_(Delete_USub|Delete_Not|USub_UAdd)"
    r"|NumberReplacer|AddNot|ReplaceTrueWithFalse|ReplaceFalseWithTrue|ReplaceAndWithOr|ReplaceOrWithAnd"
    r"|ZeroIterationForLoop|RemoveDecorator|ExceptionReplacer|ReplaceBreakWithContinue|ReplaceContinueWithBreak)$")

CR_CONFIG = """[cosmic-ray]
module-path = {files}
timeout = 120.0
excluded-modules = []
test-command = "{python} -m pytest -x -q -p no:cacheprovider {tests}"

[cosmic-ray.distributor]
name = "local"
"""


def raise_lines(path: str) -> set[int]:
    """The line numbers of path's raise statements (their messages), which are not mutated."""
    tree = ast.parse(open(path).read())
    return {n for node in ast.walk(tree) if isinstance(node, ast.Raise) for n in range(node.lineno, node.end_lineno + 1)}


def kernels_init(work: str, src: str) -> None:
    """The copy, a pristine copy of the files to mutate (every .py file under kernels/, restored before
    each run), cosmic-ray's session, and every mutant of an operator not kept, or on a raise line,
    marked skipped."""
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import WorkerOutcome, WorkResult
    copy_checkout(src)
    files = sorted(f"kernels/{name}" for name in os.listdir(os.path.join(src, "kernels")) if name.endswith(".py"))
    for name in files:
        os.makedirs(os.path.dirname(os.path.join(work, "pristine", name)), exist_ok=True)
        shutil.copy2(os.path.join(src, name), os.path.join(work, "pristine", name))
    tests = " ".join(t for t in KERNEL_TESTS if os.path.exists(os.path.join(src, t)))
    with open(os.path.join(src, "cosmic-ray.toml"), "w") as f:
        f.write(CR_CONFIG.format(files=json.dumps(files), python=sys.executable, tests=tests))
    db = os.path.join(work, "session.sqlite.tmp")   # renamed once filtered: a session is whole or absent
    subprocess.run([cosmic_ray_command(), "init", "cosmic-ray.toml", db], cwd=src, check=True)
    skipped = {name: raise_lines(os.path.join(src, name)) for name in files}
    numbers = set()   # NumberReplacer makes n + 1 and n - 1 at one place: n + 1 alone is kept, as mutmut does
    with use_db(db, WorkDB.Mode.open) as session:
        for item in list(session.pending_work_items):
            m = item.mutations[0]
            place = (str(m.module_path), tuple(m.start_pos))
            why = ("operator not kept" if not KEPT_OPERATORS.match(m.operator_name) else
                   "a raise line" if m.start_pos[0] in skipped[str(m.module_path)] else
                   "n - 1 (n + 1 kept)" if m.operator_name == "core/NumberReplacer" and place in numbers else None)
            if m.operator_name == "core/NumberReplacer":
                numbers.add(place)
            if why:
                session.set_result(item.job_id, WorkResult(output=why, worker_outcome=WorkerOutcome.SKIPPED))
    os.replace(db, os.path.join(work, "session.sqlite"))


def cosmic_ray_command() -> str:
    return os.path.join(os.path.dirname(sys.executable), "cosmic-ray")


def copies(work: str) -> list[str]:
    """The copies the tests run in: src, and src-1, src-2, ... for more than one job."""
    return sorted(os.path.join(work, d) for d in os.listdir(work) if d == "src" or d.startswith("src-"))


def kernels_run(work: str, src: str, minutes: float, jobs: int) -> None:
    """cosmic-ray exec of the pending mutants (in random order) for at most `minutes`, then every
    copy's files restored. jobs > 1: one HTTP worker per copy of the repository (cosmic-ray's
    http distributor), each test process on one thread."""
    for i in range(1, jobs):
        if not os.path.exists(f"{src}-{i}"):
            shutil.copytree(src, f"{src}-{i}")
    folders = copies(work)[:jobs]

    pristine = os.path.join(work, "pristine", "kernels")

    def restore():   # a run stopped mid-mutant may have left one on disk
        for folder in folders:
            for name in os.listdir(pristine):
                shutil.copy2(os.path.join(pristine, name), os.path.join(folder, "kernels", name))
    restore()
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")   # a stale .pyc would hide a mutant
    config = "cosmic-ray.toml"
    workers = []
    if jobs > 1:
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        ports = []
        for folder in folders:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                ports.append(sock.getsockname()[1])
            workers.append(subprocess.Popen([cosmic_ray_command(), "http-worker", "--port", str(ports[-1])], cwd=folder,
                                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                            start_new_session=True))
        for port in ports:   # until each worker listens
            for _ in range(100):
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    time.sleep(0.2)
        config = "cosmic-ray-http.toml"
        with open(os.path.join(src, "cosmic-ray.toml")) as f, open(os.path.join(src, config), "w") as out:
            out.write(f.read().replace('name = "local"', 'name = "http"\n\n[cosmic-ray.distributor.http]\n'
                                       f'worker-urls = {json.dumps([f"http://127.0.0.1:{p}" for p in ports])}'))
    log = open(os.path.join(work, "cosmic-ray.log"), "a")
    proc = subprocess.Popen([cosmic_ray_command(), "exec", config, os.path.join(work, "session.sqlite")],
                            cwd=src, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        stop_after(proc, minutes)
    finally:
        for worker in workers:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
        restore()


def kernels_results(work: str) -> dict[str, tuple]:
    """{job id: (status, mutation, diff)}; status "pending", "skipped: why", "killed", "survived", ..."""
    from cosmic_ray.work_db import WorkDB, use_db
    out = {}
    with use_db(os.path.join(work, "session.sqlite"), WorkDB.Mode.open) as session:
        done = dict(session.results)
        for item in session.work_items:
            r = done.get(item.job_id)
            status = ("pending" if r is None else f"skipped: {r.output}" if r.worker_outcome == "skipped"
                      else getattr(r.test_outcome, "value", r.worker_outcome.value))
            out[item.job_id] = (status, item.mutations[0], r.diff if r is not None else None)
    return out


def kernels_report(work: str) -> None:
    res = kernels_results(work)
    skipped = sum(1 for s, _, _ in res.values() if s.startswith("skipped"))
    tested = {k: v for k, v in res.items() if v[0] not in ("pending",) and not v[0].startswith("skipped")}
    killed = sum(1 for s, _, _ in tested.values() if s != "survived")   # cosmic-ray: incompetent counts as killed
    pending = sum(1 for s, _, _ in res.values() if s == "pending")
    counts = {s: sum(1 for v in tested.values() if v[0] == s) for s in sorted({v[0] for v in tested.values()})}
    print(f"{len(res)} mutants, {skipped} skipped (operator not kept, or a raise line); {len(tested)} tested: "
          f"{killed} killed ({100 * killed / max(1, len(tested)):.1f}%); " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    print("all mutants tested" if not pending else f"{pending} not tested yet")
    for job, (status, m, diff) in sorted(tested.items(), key=lambda kv: (str(kv[1][1].module_path), kv[1][1].start_pos)):
        if status == "survived":
            changed = [line for line in (diff or "").splitlines() if line[:1] in "+-" and line[:3] not in ("+++", "---")]
            print(f"\n{m.module_path}:{m.start_pos[0]} {m.operator_name} ({job[:8]}): survived\n" + "\n".join(changed))


def kernels_retest(work: str) -> None:
    import sqlite3
    survivors = [job for job, (s, _, _) in kernels_results(work).items() if s == "survived"]
    with sqlite3.connect(os.path.join(work, "session.sqlite")) as con:
        con.executemany("DELETE FROM work_results WHERE job_id = ?", [(j,) for j in survivors])
    print(f"testing again the {len(survivors)} mutants that survived, with the checkout's tests")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", choices=["diffgap", "kernels"], default="diffgap",
                   help="diffgap.py (mutmut) or kernels/ (cosmic-ray); default diffgap")
    p.add_argument("--work", help="folder for the copy and the results (default: diffgap-mutation or "
                                  "diffgap-mutation-kernels in the temporary folder)")
    p.add_argument("--minutes", type=float, default=10.0, help="stop after this long (default 10); rerun to go on")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                   help="test processes at once (default: the cores)")
    p.add_argument("--fresh", action="store_true", help="forget earlier results and copy the checkout again")
    p.add_argument("--report", action="store_true", help="print the figure and the survivors, run nothing")
    p.add_argument("--retest", action="store_true", help="test the survivors again, with the checkout's tests as they are now")
    args = p.parse_args()
    dist, pinned = ("mutmut", MUTMUT) if args.target == "diffgap" else ("cosmic-ray", COSMIC_RAY)
    try:
        installed = version(dist)
    except PackageNotFoundError:
        raise SystemExit(f"error: {dist} is not installed: pip install {dist}=={pinned}") from None
    if installed != pinned:
        print(f"warning: {dist} {installed}, the figures in results/README.md are from {pinned}")
    work = args.work or os.path.join(tempfile.gettempdir(), "diffgap-mutation" + ("-kernels" if args.target == "kernels" else ""))
    src = os.path.join(work, "src")
    if args.target == "kernels":
        return kernels_main(args, work, src)
    if args.report:
        report(src)
        return 0
    if args.fresh and os.path.exists(work):
        shutil.rmtree(work)
    copy_checkout(src)   # the checkout as it is now: mutmut tests again the functions that changed
    with open(os.path.join(src, "setup.cfg"), "w") as f:
        f.write(SETUP_CFG.format(tests="\n".join("    " + t for t in TESTS)))
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


def kernels_main(args, work: str, src: str) -> int:
    if args.report:
        if not os.path.exists(os.path.join(work, "session.sqlite")):
            raise SystemExit(f"error: {work}: no mutation results yet: run without --report first")
        kernels_report(work)
        return 0
    if args.fresh and os.path.exists(work):
        shutil.rmtree(work)
    if not os.path.exists(os.path.join(work, "session.sqlite")):
        kernels_init(work, src)
    for folder in copies(work):   # every worker's copy, not only the first
        refresh_tests(folder)
    if args.retest:
        kernels_retest(work)
    t0 = time.monotonic()
    kernels_run(work, src, args.minutes, args.jobs)
    res = kernels_results(work)
    left = sum(1 for s, _, _ in res.values() if s == "pending")
    print(f"{len(res) - left} of {len(res)} mutants tested or skipped in total ({time.monotonic() - t0:.0f} s this run)"
          + ("; all mutants tested" if not left else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
