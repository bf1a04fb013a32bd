#!/usr/bin/env python3
"""Checks that every cargo command in deploy/Dockerfile resolves against this workspace, then runs
it here (issue 14: the CUDA stage once asked for a feature no crate had, and no image could build).

For each `cargo ...` in a RUN instruction (continuation lines joined, `${ARG}` replaced by the
ARG's default), it checks with `cargo metadata`:
  - the subcommand is `build` and every flag is one this script understands (a new flag must be
    taught here, not skipped);
  - `-p/--package` names a workspace member, `--bin` a binary of the selected packages,
    `--features` a feature of at least one selected package (what cargo itself requires);
  - `--locked`: Cargo.lock is up to date (`cargo metadata --locked`).
Then it runs the same command here (`--release` dropped unless DOCKERFILE_CHECK_RELEASE=1: CI has
just built the dev profile, so it is a no-op there instead of a second full build).
Usage: scripts/dockerfile-check.py [DOCKERFILE]. Exits non-zero naming the line and the flag.
"""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def instructions(text: str):
    """(line number, instruction) with continuation lines joined and comments dropped."""
    out, buf, start = [], "", 0
    for n, line in enumerate(text.splitlines(), 1):
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if buf and line.lstrip().startswith("#"):
            continue
        if not buf:
            start = n
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
        else:
            out.append((start, buf + line))
            buf = ""
    return out


def substitute(s: str, args: dict, where: str) -> str:
    def one(m):
        name = m.group(1) or m.group(2)
        if name not in args or args[name] is None:
            sys.exit(f"dockerfile-check: FAIL: {where}: ${name} has no ARG default")
        return args[name]
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", one, s)


def cargo_commands(path: Path):
    args = {}
    for line, ins in instructions(path.read_text()):
        word, _, rest = ins.strip().partition(" ")
        if word.upper() == "ARG":
            name, eq, default = rest.strip().partition("=")
            args[name] = default.strip().strip('"') if eq else args.get(name)
        elif word.upper() == "RUN":
            for part in re.split(r"&&|;", rest):
                words = shlex.split(part)
                while words and words[0].startswith("--mount"):
                    words.pop(0)
                if words and words[0] == "cargo":
                    where = f"{path.name}:{line}"
                    yield where, [substitute(w, args, where) for w in words]


def metadata(locked: bool):
    cmd = ["cargo", "metadata", "--format-version", "1", "--no-deps"]
    if locked:
        cmd.append("--locked")
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"dockerfile-check: FAIL: {' '.join(cmd)}:\n{p.stderr}")
    return json.loads(p.stdout)


def check(where: str, words: list, meta: dict) -> list:
    fail = lambda msg: sys.exit(f"dockerfile-check: FAIL: {where}: {msg}")
    if words[1:2] != ["build"]:
        fail(f"`{' '.join(words[:2])}`: only `cargo build` is understood here")
    members = {p["name"]: p for p in meta["packages"] if p["id"] in meta["workspace_members"]}
    packages, bins, features, locked = [], [], [], False
    it = iter(words[2:])
    for w in it:
        if w in ("--release", "--workspace", "--no-default-features", "--all-features"):
            continue
        if w == "--locked":
            locked = True
        elif w in ("-p", "--package"):
            packages.append(next(it, ""))
        elif w == "--bin":
            bins.append(next(it, ""))
        elif w == "--features":
            features += [f for f in re.split(r"[ ,]+", next(it, "")) if f]
        else:
            fail(f"flag {w!r} is not one this check understands: teach scripts/dockerfile-check.py")
    for p in packages:
        if p not in members:
            fail(f"--package {p}: no such workspace member")
    selected = [members[p] for p in packages] if packages else list(members.values())
    have_bins = {t["name"] for p in selected for t in p["targets"] if "bin" in t["kind"]}
    for b in bins:
        if b not in have_bins:
            fail(f"--bin {b}: no such binary in the selected packages")
    for f in features:
        pkg, _, feat = f.rpartition("/")
        owners = [members[pkg]] if pkg in members else selected
        if pkg and pkg not in members:
            fail(f"--features {f}: no workspace member {pkg}")
        if not any(feat in p["features"] for p in owners):
            fail(f"--features {f}: none of the selected packages has this feature "
                 f"(packages with features: "
                 f"{ {p['name']: sorted(p['features']) for p in selected if p['features']} })")
    if locked:
        metadata(locked=True)
    return words


def main():
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "deploy" / "Dockerfile"
    meta = metadata(locked=False)
    cmds = [(w, check(w, words, meta)) for w, words in cargo_commands(path)]
    if not cmds:
        sys.exit(f"dockerfile-check: FAIL: no cargo command found in {path}")
    for where, words in cmds:
        run = [w for w in words if w != "--release" or os.environ.get("DOCKERFILE_CHECK_RELEASE") == "1"]
        print(f"dockerfile-check: {where}: {' '.join(words)} resolves; running {' '.join(run)}")
        if subprocess.run(run, cwd=ROOT).returncode != 0:
            sys.exit(f"dockerfile-check: FAIL: {where}: {' '.join(run)}")
    print(f"dockerfile-check: ok: {len(cmds)} cargo command(s) of {path.name}")


if __name__ == "__main__":
    main()
