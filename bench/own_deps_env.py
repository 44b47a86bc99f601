"""Build a virtual environment that sees only i2vd's own dependency closure, out of what this interpreter has.

Why: the service runs from its own virtual environment (`systemd/i2vd.service`: `/opt/i2vd/.venv`), which holds
`pyproject.toml`'s dependencies and what they require, nothing else. A shared GPU host's system Python often
carries more, and diffusers and transformers import some optional packages just because they are installed (peft
and scikit-learn: 2.7 s and 1.6 s of the generation process's start on the GPU machine, BENCHMARKS.md). Timing
restart-to-READY there with the system interpreter measures that host's package set, not the daemon's.

The new environment is a plain `venv` (no system site-packages) whose site-packages links, for every distribution
of the closure, the top-level files and folders its RECORD lists, from where this interpreter finds them (so a
`PYTHONPATH` overlay of wheels is honoured). Nothing is copied or downloaded.

    python bench/own_deps_env.py /tmp/i2vd-env --out env.json
    /tmp/i2vd-env/bin/python bench/restart_ready.py --config ... --runs warm

Writes what it linked, what it left out and what the closure asked for but this interpreter lacks.
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
import venv
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parent.parent


def project_requirements(pyproject: Path, extras: list[str]) -> list[Requirement]:
    project = tomllib.loads(pyproject.read_text())["project"]
    lines = list(project["dependencies"])
    for extra in extras:
        lines += project["optional-dependencies"][extra]
    return [Requirement(line) for line in lines]


def applies(requirement: Requirement, extras: frozenset[str]) -> bool:
    """Whether a requirement is installed here: its marker holds for this interpreter with one of `extras`."""
    if requirement.marker is None:
        return True
    environment = dict(default_environment())
    return any(requirement.marker.evaluate({**environment, "extra": extra}) for extra in extras or {""})


def closure(roots: list[Requirement]) -> tuple[dict[str, metadata.Distribution], list[str]]:
    """Every installed distribution the roots require, transitively (markers and extras as pip would apply them),
    and the names that are required but not installed here."""
    found: dict[str, metadata.Distribution] = {}
    missing: list[str] = []
    pending: list[tuple[Requirement, frozenset[str]]] = [(r, frozenset()) for r in roots]
    seen: set[tuple[str, frozenset[str]]] = set()
    while pending:
        requirement, parent_extras = pending.pop()
        if not applies(requirement, parent_extras):
            continue
        name = canonicalize_name(requirement.name)
        extras = frozenset(requirement.extras)
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        try:
            distribution = found.get(name) or metadata.distribution(requirement.name)
        except metadata.PackageNotFoundError:
            missing.append(requirement.name)
            continue
        found[name] = distribution
        for line in distribution.requires or []:
            pending.append((Requirement(line), extras))
    return found, sorted(set(missing))


def top_level_entries(distribution: metadata.Distribution) -> set[Path]:
    """The files and folders directly in site-packages that a distribution installed (its RECORD), located."""
    entries: set[Path] = set()
    for file in distribution.files or []:
        parts = Path(file).parts
        if not parts or parts[0] == ".." or parts[0] == "__pycache__":
            continue  # console scripts in bin/, and byte-code caches
        entries.add(Path(str(distribution.locate_file(parts[0]))))
    return entries


def build(target: Path, extras: list[str]) -> dict[str, object]:
    venv.create(target, with_pip=False, symlinks=True, clear=True)
    site = target / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    distributions, missing = closure(project_requirements(REPO / "pyproject.toml", extras))
    linked: dict[str, str] = {}
    for distribution in distributions.values():
        for entry in sorted(top_level_entries(distribution)):
            link = site / entry.name
            if link.exists() or link.is_symlink() or not entry.exists():
                continue  # a namespace folder (nvidia/) that another distribution already brought
            link.symlink_to(entry)
            linked[entry.name] = str(entry)
    installed = {canonicalize_name(d.metadata["Name"]) for d in metadata.distributions() if d.metadata["Name"]}
    return {
        "python": str(target / "bin" / "python"),
        "distributions": sorted(f"{d.metadata['Name']}=={d.version}" for d in distributions.values()),
        "left_out": sorted(installed - set(distributions)),
        "missing": missing,
        "linked_entries": len(linked),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", type=Path)
    parser.add_argument("--extra", action="append", default=[], help="also the optional dependencies of this extra")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    report = build(args.target, args.extra)
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
