"""Check a folder of wheels against the device image before carrying it: is every requirement met?

    python experiments/bench/wheel_deps.py .whl [--python 3.12] [--packages experiments/bench/device_packages.txt]

Every requirement of every wheel (with the extras another wheel asks for, environment markers evaluated for CPython
--python on x86-64 Linux) must be met by another wheel in the folder or by a package of the device image
(device_packages.txt: one name a line, `name==version` where the version is known, and then it is checked too).
Also refused: two wheels of one project (they stop `pip install` on the device) and a wheel built for another
Python or platform. Prints one line per problem and exits 1 if there is any; a version range that only a device
package without a recorded version could meet is a note (stderr). Needs `packaging` only.

    python experiments/bench/wheel_deps.py .whl --device-requirements

prints instead the requirements that the device image meets, one a line for `pip install -r` (pinned to the
device's version where the list has it): device_venv.sh installs them to dry-run the suite with the device's set.
"""

import argparse
import email.parser
import sys
import zipfile
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.tags import parse_tag
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

HERE = Path(__file__).resolve().parent


def read_wheel(path: Path) -> tuple:
    """(name, Version, [Requirement]) from a wheel's METADATA."""
    with zipfile.ZipFile(path) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        msg = email.parser.Parser().parsestr(zf.read(meta).decode("utf-8"))
    return canonicalize_name(msg["Name"]), Version(msg["Version"]), [Requirement(r) for r in
                                                                        msg.get_all("Requires-Dist") or []]


def read_device_packages(path: Path) -> dict:
    """name -> Version, or None where the list gives no version."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            out[canonicalize_name(name)] = Version(version) if version else None
    return out


def environment(python: str) -> dict:
    env = default_environment()
    env.update({"python_version": python, "python_full_version": f"{python}.0", "sys_platform": "linux",
                "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
                "implementation_name": "cpython", "platform_python_implementation": "CPython"})
    return env


def fits(filename: str, python: str) -> bool:
    """A wheel that pip installs on CPython `python` on x86-64 Linux (pure Python or manylinux x86_64)."""
    _, _, _, tags = parse_wheel_filename(filename)
    short = "".join(python.split(".")[:2])
    return any(t.interpreter in ("py3", f"py{short}", f"cp{short}")
               and (t.platform == "any" or (t.platform.startswith("manylinux") and t.platform.endswith("x86_64")))
               for tag in tags for t in parse_tag(str(tag)))


def check(folder: Path, python: str, device: dict) -> tuple:
    """(problems, unchecked, from_device): unmet requirements and misfit wheels; requirements with a version range
    that a device package meets by name only (its version is not on the list); the sorted requirements the device
    meets, as pip specs (`name==version` where the list has the version, else the name and the range asked)."""
    wheels, out, unchecked, from_device = {}, [], [], {}
    for path in sorted(folder.glob("*.whl")):
        name, version, reqs = read_wheel(path)
        if name in wheels:
            out.append(f"{path.name}: a second wheel of {name} (also {wheels[name][2].name}): keep one")
        if not fits(path.name, python):
            out.append(f"{path.name}: not installable on CPython {python}, x86-64 Linux")
        wheels[name] = (version, reqs, path)
    env = environment(python)
    todo = [(name, "") for name in wheels]  # (project, extra) pairs whose requirements are checked
    seen = set()
    while todo:
        name, extra = todo.pop()
        if (name, extra) in seen or name not in wheels:
            continue
        seen.add((name, extra))
        version, reqs, path = wheels[name]
        for req in reqs:
            if req.marker and not req.marker.evaluate({**env, "extra": extra}):
                continue
            dep = canonicalize_name(req.name)
            if dep in wheels:
                if not req.specifier.contains(wheels[dep][0], prereleases=True):
                    out.append(f"{path.name}: needs {req}, the folder has {dep} {wheels[dep][0]}")
                todo += [(dep, e) for e in req.extras]
            elif dep in device:
                from_device[dep] = from_device.get(dep, SpecifierSet()) & req.specifier
                if device[dep] is None and req.specifier:
                    unchecked.append(f"{path.name}: needs {req}; the device's {dep} version is not on the list")
                elif device[dep] is not None and not req.specifier.contains(device[dep], prereleases=True):
                    out.append(f"{path.name}: needs {req}, the device has {dep} {device[dep]}")
            else:
                out.append(f"{path.name}: needs {req}: neither in the folder nor on the device")
    return out, unchecked, [f"{dep}=={device[dep]}" if device[dep] else f"{dep}{spec}"
                            for dep, spec in sorted(from_device.items())]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="folder of .whl files (e.g. .whl)")
    p.add_argument("--python", default="3.12", help="the device's Python version (default: 3.12)")
    p.add_argument("--packages", default=str(HERE / "device_packages.txt"), help="the device image's packages")
    p.add_argument("--device-requirements", action="store_true",
                   help="print the requirements the device meets (for pip install -r) instead of checking")
    args = p.parse_args(argv)
    folder = Path(args.folder)
    if not any(folder.glob("*.whl")):
        print(f"error: {folder}: no .whl files", file=sys.stderr)
        return 2
    found, unchecked, from_device = check(folder, args.python, read_device_packages(Path(args.packages)))
    if args.device_requirements:
        print("\n".join(from_device))
        return 0
    for line in unchecked:
        print(f"note: {line}", file=sys.stderr)
    for line in found:
        print(line)
    print(f"{len(list(folder.glob('*.whl')))} wheels in {folder}: "
          + ("every requirement met" if not found else f"{len(found)} problem(s)"), file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
