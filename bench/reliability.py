"""Runs under abuse, counted: broken recipes, kill -9 at random moments, corrupted artifacts,
two runs into one output folder at once.

    python bench/reliability.py [--recipes 100] [--kills 10] [--corruptions 3] [--races 3]

1. `--recipes` randomly mutated copies of the shipped recipes (tests/test_fuzz.py's mutations:
   dropped/renamed keys, wrong types, out-of-range numbers, truncated YAML, binary garbage) →
   each refused with one line and exit 2 and nothing written, or still a valid recipe.
2. `--kills` runs of a 4-stage stories260K recipe, each killed with SIGKILL at a random moment
   (uniform over an uninterrupted run's duration, timed warm like the trials), then rerun → the rerun exits 0 and its
   figures equal the uninterrupted run's; every artifact in the store verifies against its hash.
3. `--corruptions`: bytes of a random artifact's weights flipped → detected, rebuilt, same figures.
4. `--races`: two runs started together into one output folder → one runs, the other is refused
   with the lock holder's pid (exit 2); the output is the winner's, whole.
5. `--shared`: four recipes that share their first stages (distill, prune; then two recover
   lengths × two quantizations), started together on one store → every artifact is built by
   exactly one of them, and every run's figures equal the same recipe run alone in a fresh store.
6. `--disk-full`: the store on a small tmpfs (60% of what the run needs) → the run stops with one
   line naming the full disk, the store still verifies; after the tmpfs grows, the same command
   finishes with the uninterrupted run's figures. Needs root to mount (else reported as skipped).

Needs ../shared/data (stories260K, TinyStories). Writes reports/reliability.json.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from _reports import ROOT, SHARED, save

REPO, DATA = ROOT, SHARED
sys.path.insert(0, str(REPO / "tests"))

from test_fuzz import SHIPPED, mutate  # noqa: E402

from compressor.cli import main  # noqa: E402
from compressor.storage import MANIFEST, Store  # noqa: E402

RECIPE = {
    "name": "reliability",
    "seed": 0,
    "teacher": f"llama2c:{DATA}/stories260K/stories260K.bin",
    "data": {"train": f"{DATA}/tinystories/tinystories_val.txt", "seq_len": 128},
    "stages": [
        {"distill": {"student": {"from": "teacher", "num_layers": 3}, "steps": 60, "batch_size": 8}},
        {"prune": {"targets": {"mlp": 0.25}}},
        {"recover": {"teacher": "original", "steps": 40, "batch_size": 8}},
        {"quantize": {"method": "rtn", "bits": 8, "group_size": None}},
    ],
    "eval": {
        "tasks": ["tinystories_local"],
        "limit": 4,
        "data_dir": str(DATA),
        "latency": {"prompt_tokens": 16, "new_tokens": 4, "batch_sizes": [1], "repeats": 1, "warmup": 0},
        "fidelity": {"samples": 8},
    },
}
for stage in RECIPE["stages"]:
    body = next(iter(stage.values()))
    if "steps" in body:
        body["checkpoint_every"] = 10


def figures(out: Path) -> list[dict]:
    """What must not change: everything but timings."""
    keep = ("params", "bytes", "accuracy", "teacher_kl", "top1_agreement", "heldout_ppl")
    record = json.loads((out / "run.json").read_text())
    return [{k: s["metrics"][k] for k in keep} for s in record["stages"]]


def command(recipe: Path, out: Path, store: Path) -> list[str]:
    return [sys.executable, "-m", "compressor", "run", str(recipe), "--out", str(out), "--store", str(store)]


def run(recipe: Path, out: Path, store: Path) -> subprocess.CompletedProcess:
    return subprocess.run(command(recipe, out, store), cwd=REPO, capture_output=True, text=True)


def store_verifies(store: Path) -> bool:
    """Every finished artifact matches its manifest (a partial one never has a manifest)."""
    if not store.is_dir():
        return True  # killed before the store was made
    keys = [p.name for p in store.iterdir() if (p / MANIFEST).is_file()]
    return all(Store(store).get(k) is not None for k in keys)


def broken_recipes(count: int, rng: random.Random, tmp: Path) -> dict:
    refused = valid = bad = 0
    for i in range(count):
        source = SHIPPED[i % len(SHIPPED)]
        path = tmp / f"fuzz-{i}" / "stacks" / source.name
        path.parent.mkdir(parents=True)
        path.write_bytes(mutate(source.read_text(), rng))
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = main(["validate", str(path)])
            if rc == 0:
                valid += 1
                continue
            out = path.parent.parent / "out"
            rc_run = main(["compare" if source.name == "orderings.yaml" else "run", str(path), "--out", str(out)])
        lines = err.getvalue().strip().splitlines()
        ok = rc == 2 and rc_run == 2 and not out.exists() and "Traceback" not in err.getvalue()
        ok = ok and len(lines) == 2 and all(line.startswith(f"error: {path}") for line in lines)
        refused += ok
        bad += not ok
        if not ok:
            print(f"  recipe {i}: NOT a clean refusal: rc={rc} {lines[:3]}")
    print(f"broken recipes: {count}: {refused} refused cleanly, {valid} still valid, {bad} bad")
    return {"count": count, "refused_cleanly": refused, "still_valid": valid, "bad": bad}


def kills(count: int, rng: random.Random, recipe: Path, tmp: Path, reference: list[dict], seconds: float) -> dict:
    trials = []
    for i in range(count):
        out, store = tmp / f"kill-{i}", tmp / f"kill-store-{i}"
        at = rng.uniform(0.5, seconds)
        log = open(tmp / f"kill-{i}.log", "w")
        proc = subprocess.Popen(command(recipe, out, store), cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=at)
            killed = False
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            killed = True
        log.close()
        lines = [ln.strip() for ln in (tmp / f"kill-{i}.log").read_text().replace("\r", "\n").splitlines()]
        doing = next((ln for ln in reversed(lines) if ln), "(nothing printed yet)")
        verified_after_kill = store_verifies(store)
        rerun = run(recipe, out, store)
        same = rerun.returncode == 0 and figures(out) == reference
        trial = {
            "kill_at_s": round(at, 1),
            "killed": killed,
            "doing": doing[:120],
            "store_valid_after_kill": verified_after_kill,
            "rerun_rc": rerun.returncode,
            "figures_equal": same,
            "store_valid_after_rerun": store_verifies(store),
        }
        trials.append(trial)
        print(f"  kill {i}: at {at:.1f}s during '{trial['doing']}' -> rerun rc {rerun.returncode}, equal {same}")
    good = sum(t["figures_equal"] and t["store_valid_after_kill"] and t["store_valid_after_rerun"] for t in trials)
    print(
        f"kill -9: {count} trials, {sum(t['killed'] for t in trials)} killed mid-run, {good} resumed to equal figures"
    )
    return {"count": count, "good": good, "trials": trials}


def corruptions(count: int, rng: random.Random, recipe: Path, tmp: Path, store: Path, reference: list[dict]) -> dict:
    good = 0
    for i in range(count):
        keys = sorted(p.name for p in store.iterdir() if (p / "model.safetensors").is_file())
        victim = store / rng.choice(keys) / "model.safetensors"
        blob = bytearray(victim.read_bytes())
        at = rng.randrange(len(blob) // 2, len(blob))
        blob[at] ^= 0xFF
        victim.write_bytes(bytes(blob))
        out = tmp / f"corrupt-{i}"
        result = run(recipe, out, store)
        detected = "is corrupt" in result.stdout + result.stderr
        ok = result.returncode == 0 and detected and figures(out) == reference
        good += ok
        print(f"  corrupt {victim.parent.name} byte {at}: detected {detected}, rebuilt to equal figures {ok}")
    print(f"corrupted artifacts: {count}, {good} detected and rebuilt")
    return {"count": count, "detected_and_rebuilt": good}


def races(count: int, recipe: Path, tmp: Path, reference: list[dict]) -> dict:
    good = 0
    for i in range(count):
        out, store = tmp / f"race-{i}", tmp / f"race-store-{i}"
        procs = [
            subprocess.Popen(
                command(recipe, out, store), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            for _ in range(2)
        ]
        results = [(p.wait(), *p.communicate()) for p in procs]
        codes = sorted(rc for rc, _, _ in results)
        refusal = next((err for rc, _, err in results if rc == 2), "")
        ok = codes == [0, 2] and "in use" in refusal and figures(out) == reference
        good += ok
        print(f"  race {i}: exit codes {codes}; refusal: {refusal.strip()[:100]!r}")
    print(f"concurrent runs: {count}, {good} with one run and one clear refusal")
    return {"count": count, "one_ran_one_refused": good}


def variant(recover_steps: int, bits: int) -> dict:
    recipe = json.loads(json.dumps(RECIPE))
    recipe["name"] = f"shared-r{recover_steps}-int{bits}"
    recipe["stages"][2]["recover"]["steps"] = recover_steps
    recipe["stages"][3]["quantize"]["bits"] = bits
    return recipe


def shared(count: int, tmp: Path) -> dict:
    """`count` rounds of four prefix-sharing recipes started together on one store."""
    recipes = []
    for steps, bits in ((40, 8), (40, 4), (20, 8), (20, 4)):
        path = tmp / f"shared-{steps}-{bits}.yaml"
        path.write_text(yaml.safe_dump(variant(steps, bits), sort_keys=False))
        recipes.append(path)
    solo = {}
    for path in recipes:  # each alone, in a fresh store: what the shared runs must reproduce
        out = tmp / f"solo-{path.stem}"
        assert run(path, out, tmp / f"solo-store-{path.stem}").returncode == 0
        solo[path] = figures(out)
    good, rounds = 0, []
    for i in range(count):
        store = tmp / f"shared-store-{i}"
        procs = [
            subprocess.Popen(
                command(p, tmp / f"shared-{i}-{p.stem}", store),
                cwd=REPO,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            for p in recipes
        ]
        codes = [p.wait() for p in procs]
        records = [json.loads((tmp / f"shared-{i}-{p.stem}" / "run.json").read_text()) for p in recipes]
        builds: dict[str, int] = {}
        for record in records:
            for stage in record["stages"][1:]:
                builds[stage["key"]] = builds.get(stage["key"], 0) + (not stage["cached"])
        built_once = all(n == 1 for n in builds.values())
        equal = all(figures(tmp / f"shared-{i}-{p.stem}") == solo[p] for p in recipes)
        ok = codes == [0, 0, 0, 0] and built_once and equal and store_verifies(store)
        good += ok
        rounds.append({"exit_codes": codes, "artifacts": len(builds), "built_once": built_once, "figures_equal": equal})
        print(f"  shared {i}: exit codes {codes}, {len(builds)} artifacts, built once {built_once}, equal {equal}")
    print(f"prefix-sharing runs together: {count} rounds, {good} with every artifact built once and equal figures")
    return {"count": count, "good": good, "rounds": rounds}


def disk_full(count: int, recipe: Path, tmp: Path, reference: list[dict], needed: int) -> dict:
    """The store on a tmpfs too small for the run; then the tmpfs grows and the run is redone."""
    trials, good = [], 0
    for i in range(count):
        mount = tmp / f"small-{i}"
        mount.mkdir()
        size = max(1 << 20, int(needed * (0.3 + 0.3 * i / max(1, count - 1))))
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True, text=True
        )
        if mounted.returncode != 0:
            print(f"disk full: cannot mount a tmpfs here ({mounted.stderr.strip()}): skipped")
            return {"count": 0, "good": 0, "skipped": mounted.stderr.strip()}
        try:
            out = tmp / f"full-{i}"
            first = run(recipe, out, mount / "store")
            lines = first.stderr.strip().splitlines()
            one_line = first.returncode == 1 and lines and lines[-1].startswith("error: no space left on the device")
            consistent = store_verifies(mount / "store")
            subprocess.run(["mount", "-o", f"remount,size={needed * 3}", str(mount)], check=True)
            again = run(recipe, out, mount / "store")
            equal = again.returncode == 0 and figures(out) == reference
            ok = bool(one_line) and consistent and equal and store_verifies(mount / "store")
            good += ok
            trials.append(
                {
                    "store_bytes": size,
                    "refused_in_one_line": bool(one_line),
                    "store_consistent": consistent,
                    "rerun_rc": again.returncode,
                    "figures_equal": equal,
                    "error": lines[-1][:160] if lines else "",
                }
            )
            print(
                f"  disk full {i}: {size >> 20} MiB: rc {first.returncode} {lines[-1][:100] if lines else ''!r}; "
                f"store consistent {consistent}; after growing: rc {again.returncode}, equal {equal}"
            )
        finally:
            subprocess.run(["umount", str(mount)], capture_output=True)
    print(f"disk full: {count} trials, {good} stopped in one line and finished after space was freed")
    return {"count": count, "good": good, "trials": trials}


def main_(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    drills = {"recipes": 100, "kills": 10, "corruptions": 3, "races": 3, "shared": 2, "disk-full": 3, "seed": 0}
    for name, default in drills.items():
        parser.add_argument(f"--{name}", type=int, default=default)
    args = parser.parse_args(argv)
    if not (DATA / "stories260K").is_dir():
        print(f"needs {DATA} (stories260K, TinyStories)", file=sys.stderr)
        return 2
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        os.environ.setdefault("COMPRESSOR_HOME", str(tmp / "home"))
        result = {"recipes": broken_recipes(args.recipes, rng, tmp)}
        recipe = tmp / "reliability.yaml"
        recipe.write_text(yaml.safe_dump(RECIPE, sort_keys=False))
        start = time.time()
        first = run(recipe, tmp / "reference", tmp / "store")
        seconds = time.time() - start
        if first.returncode != 0:
            print(first.stdout[-2000:], first.stderr[-2000:], file=sys.stderr)
            return 1
        reference = figures(tmp / "reference")
        # the first run also fills $COMPRESSOR_HOME (teacher, tokens, eval data): every kill trial starts warm,
        # so kill moments are drawn over a warm run's duration, or a third of them would land after its end
        start = time.time()
        warm = run(recipe, tmp / "warm", tmp / "warm-store")
        warm_seconds = time.time() - start
        print(f"uninterrupted run: {seconds:.0f} s cold, {warm_seconds:.0f} s warm")
        result["uninterrupted_seconds"] = round(seconds, 1)
        result["warm_seconds"] = round(warm_seconds, 1)
        result["warm_run_equal"] = warm.returncode == 0 and figures(tmp / "warm") == reference
        result["kills"] = kills(args.kills, rng, recipe, tmp, reference, warm_seconds)
        result["corruptions"] = corruptions(args.corruptions, rng, recipe, tmp, tmp / "store", reference)
        result["races"] = races(args.races, recipe, tmp, reference)
        result["shared_prefix_together"] = shared(args.shared, tmp)
        needed = sum(f.stat().st_size for f in (tmp / "store").rglob("*") if f.is_file())
        result["disk_full"] = disk_full(args.disk_full, recipe, tmp, reference, needed)
    save("reliability", result)
    clean = (
        result["recipes"]["bad"] == 0
        and result["warm_run_equal"]
        and result["kills"]["good"] == args.kills
        and result["corruptions"]["detected_and_rebuilt"] == args.corruptions
        and result["races"]["one_ran_one_refused"] == args.races
        and result["shared_prefix_together"]["good"] == args.shared
        and result["disk_full"]["good"] == result["disk_full"]["count"]
    )
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main_())
