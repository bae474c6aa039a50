"""Environment profiles: the pinned stacks in `envs/*.toml`, read into plain objects."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from setup_kit.errors import UsageError
from setup_kit.locations import envs_dir

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

NOT_PROFILES = {"known_issues", "cuda"}


@dataclass(frozen=True)
class Pin:
    name: str
    version: str
    why: str = ""
    group: str = "main"  # "torch" pins install first, from the profile's torch source

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"


@dataclass(frozen=True)
class Profile:
    name: str
    summary: str
    python: str  # a PEP 440 specifier such as ">=3.10,<3.12"
    cuda: str  # torch.version.cuda of the torch build; "" for a CPU build
    pins: tuple[Pin, ...]
    torch_index_url: str = ""
    torch_source_why: str = ""
    engines: tuple[str, ...] = ("native",)
    transformers_ceiling: str = ""
    path: Path | None = field(default=None, compare=False)

    def pin(self, name: str) -> Pin | None:
        from packaging.utils import canonicalize_name

        wanted = canonicalize_name(name)
        return next((p for p in self.pins if canonicalize_name(p.name) == wanted), None)

    @property
    def torch_pins(self) -> tuple[Pin, ...]:
        return tuple(p for p in self.pins if p.group == "torch")

    @property
    def other_pins(self) -> tuple[Pin, ...]:
        return tuple(p for p in self.pins if p.group != "torch")


def parse_profile(data: dict, path: Path | None = None) -> Profile:
    try:
        source = data.get("torch_source", {})
        return Profile(
            name=data["name"],
            summary=data.get("summary", ""),
            python=data.get("python", ""),
            cuda=data.get("cuda", ""),
            pins=tuple(
                Pin(p["name"], str(p["version"]), p.get("why", ""), p.get("group", "main"))
                for p in data.get("pin", [])
            ),
            torch_index_url=source.get("index_url", ""),
            torch_source_why=source.get("why", ""),
            engines=tuple(data.get("engines", ["native"])),
            transformers_ceiling=data.get("transformers_ceiling", ""),
            path=path,
        )
    except (KeyError, TypeError) as exc:
        where = path or "profile"
        raise UsageError(f"The profile {where} is malformed: missing or wrong field {exc}.",
                         "Compare it with envs/tutorial.toml.") from exc


def load_profile_file(path: Path) -> Profile:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"Cannot read the profile {path}: {exc}.",
                         "Check the file is valid TOML.") from exc
    return parse_profile(data, path)


def available_profiles(directory: Path | None = None) -> dict[str, Profile]:
    directory = directory or envs_dir()
    profiles = {}
    for path in sorted(directory.glob("*.toml")):
        if path.stem in NOT_PROFILES:
            continue
        profile = load_profile_file(path)
        profiles[profile.name] = profile
    return profiles


def load_profile(name_or_path: str) -> Profile:
    """A profile by name (from `envs/`) or by path to a TOML file."""
    candidate = Path(name_or_path)
    if candidate.suffix == ".toml" and candidate.is_file():
        return load_profile_file(candidate)
    profiles = available_profiles()
    if name_or_path not in profiles:
        known = ", ".join(sorted(profiles)) or "none"
        raise UsageError(f"There is no profile named '{name_or_path}' (known: {known}).",
                         "Run `internlm-kit install --list-profiles`, or pass a path to a .toml profile.")
    return profiles[name_or_path]


def unmet_pins(profile: Profile, installed_version=None) -> list[Pin]:
    """The profile's pins this interpreter does not satisfy (missing or another version).

    `make setup` asks this instead of trusting its stamp, so a venv changed behind the stamp's back
    (`install --rollback`, a stray `pip install`) is installed again."""
    from importlib import metadata

    from packaging.specifiers import SpecifierSet

    def version_of(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    version_of = installed_version or version_of
    unmet = []
    for pin in profile.pins:
        have = version_of(pin.name)
        # `==2.1.2` accepts the local build 2.1.2+cu121, as pip does.
        if have is None or not SpecifierSet(f"=={pin.version}").contains(have, prereleases=True):
            unmet.append(pin)
    return unmet


if __name__ == "__main__":
    # `python -m setup_kit.profiles NAME`: exit 0 when this interpreter satisfies the profile.
    # `python -m setup_kit.profiles NAME --constraints`: its pins but torch's, as a pip constraints
    # file (stdlib only, so it runs before anything is installed): `make setup`'s dev stack is the
    # cpu profile's, not whatever the index has newest that day.
    import sys

    if sys.argv[2:] == ["--constraints"]:
        for pin in load_profile(sys.argv[1]).pins:
            if pin.group != "torch":
                print(pin.requirement)
        sys.exit(0)
    missing = unmet_pins(load_profile(sys.argv[1]))
    for pin in missing:
        print(f"{pin.requirement} is not installed", file=sys.stderr)
    sys.exit(1 if missing else 0)
