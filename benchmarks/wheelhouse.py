"""The GPU check's wheelhouse: psp_core's dependencies beyond torch and torchvision (gpu_requirements.txt) as wheels
for the device image's Python, carried with the working tree, since that machine reaches no package registry.

    python benchmarks/wheelhouse.py build [--dir .whl]   # here, with the registry: download, check the size
    python benchmarks/wheelhouse.py unpack DIR SITE      # there (gpu_check.sh does it): unpack what is missing

`unpack` puts a wheel's files in SITE (then on PYTHONPATH) only where the interpreter cannot import the package,
so the device image's own copies win; a missing package whose wheel does not fit the interpreter is an error.
"""
from __future__ import annotations

import argparse
import importlib.util
import re
import subprocess
import sys
import zipfile
from pathlib import Path

REQUIREMENTS = Path(__file__).with_name("gpu_requirements.txt")
TARGET_PYTHON = "3.12"                     # the device image's interpreter
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
LIMIT_BYTES = 64 * 2**20                   # what one call to the device machine carries
WHEEL_NAME = re.compile(r"^(?P<dist>[^-]+)-(?P<version>[^-]+)(-\d[^-]*)?-(?P<python>[^-]+)-(?P<abi>[^-]+)-(?P<plat>[^-]+)\.whl$")


def pinned() -> dict[str, str]:
    """gpu_requirements.txt as {normalised distribution: version}; every line must pin one version (`name==version`)."""
    pins = {}
    for number, line in enumerate(REQUIREMENTS.read_text().splitlines(), 1):
        line = line.split("#")[0].strip()
        if line:
            name, separator, version = line.partition("==")
            if not separator or not name or not version:
                raise SystemExit(f"wheelhouse: {REQUIREMENTS.name} line {number}: {line!r} is not name==version")
            pins[normalised(name.strip())] = version.strip()
    return pins


def normalised(name: str) -> str:
    """A distribution name as pip compares them (`pytorch_msssim` == `pytorch-msssim`)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def build(folder: Path) -> int:
    """Download the pinned wheels for TARGET_PYTHON into `folder`; 1 if the folder then exceeds LIMIT_BYTES."""
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
               "--only-binary=:all:", "--python-version", TARGET_PYTHON, "--implementation", "cp",
               *[arg for plat in PLATFORMS for arg in ("--platform", plat)], "-d", str(folder), "-r", str(REQUIREMENTS)]
    if subprocess.run(command).returncode != 0:
        print("wheelhouse: pip download failed (see above)", file=sys.stderr)
        return 1
    wheels, pins = sorted(folder.glob("*.whl")), pinned()
    parsed = {w.name: WHEEL_NAME.match(w.name) for w in wheels}
    extra = [name for name, wheel in parsed.items()   # unpinned, or another version than the pin
             if wheel is None or pins.get(normalised(wheel["dist"])) != wheel["version"]]
    if extra:
        print(f"wheelhouse: {folder} holds wheels gpu_requirements.txt does not pin (an older build?): "
              f"{', '.join(extra)}; remove them and build again", file=sys.stderr)
        return 1
    total = sum(w.stat().st_size for w in wheels)
    for wheel in wheels:
        print(f"{wheel.stat().st_size / 2**20:7.2f} MiB  {wheel.name}")
    print(f"{total / 2**20:7.2f} MiB  in {folder} (limit {LIMIT_BYTES / 2**20:.0f} MiB)")
    if total > LIMIT_BYTES:
        print(f"wheelhouse: {total / 2**20:.1f} MiB is over the {LIMIT_BYTES / 2**20:.0f} MiB a call carries",
              file=sys.stderr)
        return 1
    return 0


def import_names(wheel: zipfile.ZipFile) -> list[str]:
    """The top-level packages a wheel installs: its top_level.txt, else its top-level folders and modules (not its
    folders of bundled libraries, such as `scipy.libs`)."""
    listed = [n for n in wheel.namelist() if n.endswith(".dist-info/top_level.txt")]
    if listed:
        return [name for name in wheel.read(listed[0]).decode().split() if name]
    tops = {n.split("/")[0] for n in wheel.namelist() if not n.split("/")[0].endswith((".dist-info", ".data"))}
    return sorted(name for name in (t.removesuffix(".py") for t in tops) if name.isidentifier())


def fits(python_tag: str, abi_tag: str = "none") -> bool:
    """Whether a wheel's Python tag (`py3`, `cp312`, `py2.py3`; with abi3, any CPython from that one on) runs on
    this interpreter."""
    major, minor = sys.version_info[:2]
    for tag in python_tag.split("."):
        if tag in ("py3", f"py{major}{minor}", f"cp{major}{minor}"):
            return True
        if abi_tag == "abi3" and re.fullmatch(r"cp3\d+", tag) and int(tag[3:]) <= minor and major == 3:
            return True
    return False


def unpack(folder: Path, site: Path) -> int:
    """Unpack into `site` each wheel of `folder` whose packages this interpreter cannot import; one line per wheel.
    1 if a missing package has no wheel for this interpreter, or the folder has no wheels."""
    wheels = sorted(folder.glob("*.whl"))
    if not wheels:
        print(f"wheelhouse: no wheels in {folder} (build it with: python benchmarks/wheelhouse.py build)",
              file=sys.stderr)
        return 1
    status, unpacked = 0, set()
    for path in wheels:
        name = WHEEL_NAME.match(path.name)
        with zipfile.ZipFile(path) as wheel:
            packages = import_names(wheel)
            missing = [p for p in packages if importlib.util.find_spec(p) is None and p not in unpacked]
            if not missing:
                verdict = "present"
            elif name is None or not fits(name["python"], name["abi"]):
                verdict, status = f"MISSING and the wheel is not for Python {sys.version.split()[0]}", 1
            else:
                wheel.extractall(site)
                unpacked.update(packages)
                verdict = f"unpacked into {site}"
        print(f"wheelhouse: {path.name}: {', '.join(packages)}: {verdict}")
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build_parser = commands.add_parser("build", help="download the pinned wheels for the device image's Python")
    build_parser.add_argument("--dir", type=Path, default=Path(".whl"), help="the wheelhouse (default: %(default)s)")
    unpack_parser = commands.add_parser("unpack", help="unpack the wheels of the packages this Python lacks")
    unpack_parser.add_argument("dir", type=Path)
    unpack_parser.add_argument("site", type=Path)
    args = parser.parse_args(argv)
    if args.command == "build":
        args.dir.mkdir(parents=True, exist_ok=True)
        return build(args.dir)
    args.site.mkdir(parents=True, exist_ok=True)
    return unpack(args.dir, args.site)


if __name__ == "__main__":
    sys.exit(main())
