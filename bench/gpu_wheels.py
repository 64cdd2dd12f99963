"""`make gpu-wheels`: the wheels a bare GPU node needs beyond its own PyTorch, for an offline `make gpu-check`.

    python3 bench/gpu_wheels.py --out .whl [--bnb] [--python-version 3.12] [--limit-mib 60]

Runs on any machine with pip and a network.  It builds DeepSpeed as a wheel (PyPI has only its sdist; built
without ops, which it JIT-compiles when one is needed), resolves with pip (a dry run for CPython
``--python-version`` on manylinux x86_64) what the check imports at the pins of pyproject.toml (DeepSpeed,
transformers, accelerate, safetensors, pyyaml, numpy, pytest, pytest-timeout) and their dependencies, drops
torch and everything torch itself requires (the node's torch brings those), and downloads the rest into
``--out`` with ``manifest.json``.  The set must fit ``--limit-mib`` (exit 2 naming the largest wheels
otherwise).  ``--bnb`` adds bitsandbytes (optional: the check's part 6 runs only where it is importable),
counted apart from the limit.  The GPU node installs them with
``pip install --no-index --no-deps --target DIR .whl/*.whl`` (the Makefile's `gpu-check`).
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NEEDED = ("deepspeed", "transformers", "accelerate", "safetensors", "pyyaml", "numpy", "pytest", "pytest-timeout")
OPTIONAL = ("bitsandbytes",)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64",
             "manylinux2010_x86_64", "manylinux_2_12_x86_64", "linux_x86_64")
MANIFEST = "manifest.json"


def pins(pyproject: Path, names: tuple[str, ...]) -> dict[str, str]:
    """name -> requirement string as pyproject.toml writes it (``"transformers==5.23.0"``; a bare name if unpinned)."""
    text = pyproject.read_text()
    out = {}
    for name in names:
        found = re.search(rf'"({re.escape(name)}(?:[<>=!~][^"]*)?)"', text, re.IGNORECASE)
        out[name] = found.group(1) if found else name
    return out


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def target_flags(python_version: str) -> list[str]:
    abi = "cp" + python_version.replace(".", "")
    flags = ["--only-binary=:all:", "--python-version", python_version, "--implementation", "cp", "--abi", abi]
    for platform in PLATFORMS:
        flags += ["--platform", platform]
    return flags


def pip(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args], text=True,
                          capture_output=True)
    if proc.returncode != 0:
        tail = "\n".join(line for line in proc.stderr.splitlines() if not line.startswith("WARNING: Location"))
        raise SystemExit(f"gpu-wheels: pip {args[0]} failed (rc {proc.returncode}):\n{tail[-3000:]}")
    return proc


def build_deepspeed(requirement: str, out: Path) -> Path:
    """DeepSpeed's sdist built into a pure-Python wheel (no ops ahead of time)."""
    before = set(out.glob("deepspeed-*.whl"))
    pip("wheel", "--no-cache-dir", "--no-deps", "--no-binary", "deepspeed", requirement, "-w", str(out))
    built = sorted(set(out.glob("deepspeed-*.whl")) - before) or sorted(out.glob("deepspeed-*.whl"))
    return built[-1]


def resolve(requirements: list[str], python_version: str, work: Path) -> list[dict]:
    """pip's resolution for the target interpreter: [{name, version, requires}] (a dry run: nothing installed)."""
    report = work / "report.json"
    pip("install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report), *target_flags(python_version),
        "--target", str(work / "target"), *requirements)
    items = []
    for item in json.loads(report.read_text())["install"]:
        meta = item["metadata"]
        requires = [norm(re.split(r"[ ;<>=!~\[(]", r, maxsplit=1)[0]) for r in meta.get("requires_dist", [])
                    if not re.search(r"\bextra\s*==", r)]  # an extra's requirements are not installed
        items.append({"name": norm(meta["name"]), "version": meta["version"], "requires": requires})
    return items


def torch_closure(items: list[dict]) -> set[str]:
    """torch and every resolved package it requires, transitively: what a node's own torch install brings."""
    by = {i["name"]: i for i in items}
    todo, seen = ["torch"], set()
    while todo:
        name = todo.pop()
        if name in seen or name not in by:
            continue
        seen.add(name)
        todo += by[name]["requires"]
    return seen


def download(items: list[dict], python_version: str, out: Path) -> None:
    if items:
        pip("download", "--no-deps", *target_flags(python_version), "-d", str(out),
            *(f"{i['name']}=={i['version']}" for i in items))


def wheel_of(out: Path, name: str, version: str) -> Path:
    stem = re.sub(r"[-.]+", "_", name)
    for path in out.glob("*.whl"):
        dist, ver = path.name.split("-")[:2]
        if norm(dist) == norm(stem) and ver == version:
            return path
    raise SystemExit(f"gpu-wheels: no wheel of {name} {version} in {out} after the download")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpu_wheels", description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / ".whl"))
    p.add_argument("--python-version", default="3.12")
    p.add_argument("--limit-mib", type=float, default=60.0)
    p.add_argument("--bnb", action="store_true", help="also bitsandbytes (optional, counted apart from the limit)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stale = [w for w in out.glob("*.whl")]
    if stale:
        raise SystemExit(f"gpu-wheels: {out} already holds {len(stale)} wheels; remove the dir first "
                         f"(rm -r {out}) so the set is exactly this resolution")
    want = pins(ROOT / "pyproject.toml", NEEDED + OPTIONAL)
    with tempfile.TemporaryDirectory(prefix="npt-gpu-wheels-") as tmp:
        work = Path(tmp)
        ds = build_deepspeed(want["deepspeed"], work)
        shutil.copy2(ds, out / ds.name)
        reqs = [str(ds)] + [want[n] for n in NEEDED if n != "deepspeed"]
        items = resolve(reqs, args.python_version, work)
        dropped = torch_closure(items)
        fetch = [i for i in items if i["name"] not in dropped and i["name"] != "deepspeed"]
        download(fetch, args.python_version, out)
        optional = []
        if args.bnb:
            extra = resolve([want["bitsandbytes"]], args.python_version, work)
            optional = [i for i in extra if i["name"] == "bitsandbytes"]
            download(optional, args.python_version, out)
    ds_name, ds_version = ds.name.split("-")[:2]
    rows = [{"name": "deepspeed", "version": ds_version, "file": ds.name, "built_from_sdist": True}]
    rows += [{"name": i["name"], "version": i["version"]} for i in fetch]
    rows += [{"name": i["name"], "version": i["version"], "optional": True} for i in optional]
    for row in rows:
        path = out / row.get("file", "") if "file" in row else wheel_of(out, row["name"], row["version"])
        row["file"], row["bytes"] = path.name, path.stat().st_size
    required = sum(r["bytes"] for r in rows if not r.get("optional"))
    manifest = {"python_version": args.python_version, "platforms": list(PLATFORMS), "pins": want,
                "left_to_the_node": sorted(dropped), "required_bytes": required,
                "optional_bytes": sum(r["bytes"] for r in rows if r.get("optional")), "wheels": rows}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    mib = required / 2**20
    print(f"{len(rows)} wheels in {out}: {mib:.1f} MiB required (limit {args.limit_mib:g} MiB)"
          + (f", + {manifest['optional_bytes'] / 2**20:.1f} MiB optional (bitsandbytes)" if optional else "")
          + f"; left to the node's torch: {', '.join(sorted(dropped))}")
    if mib > args.limit_mib:
        big = sorted((r for r in rows if not r.get("optional")), key=lambda r: -r["bytes"])[:5]
        print("gpu-wheels: over the limit; largest: " + ", ".join(f"{r['file']} {r['bytes'] / 2**20:.1f} MiB"
                                                                   for r in big), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
