"""After installing: the doctor's package checks on the target."""

from __future__ import annotations

from setup_kit.profiles import Profile

# The doctor's checks that say whether an install did what the profile asked for.
VERIFY_CHECKS = ["python.version", "packages.pins", "packages.dependencies"]


def profile_argument(profile: Profile) -> str:
    """How the doctor finds the same profile: its file when it is not one of the shipped ones."""
    from setup_kit.profiles import available_profiles

    shipped = available_profiles().get(profile.name)
    if shipped is not None and (profile.path is None or shipped.path == profile.path):
        return profile.name
    return str(profile.path)


def verify(python: str, profile: Profile):
    from setup_kit.doctor import diagnose

    return diagnose(python=python, profile=profile_argument(profile), only=VERIFY_CHECKS)
