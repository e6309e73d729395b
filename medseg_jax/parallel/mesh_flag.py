"""The --mesh flag's syntax, kept free of JAX imports: `medseg memory` must read it before JAX starts (to simulate
devices)."""

from __future__ import annotations

from medseg_jax.errors import MedsegError


def parse_mesh_arg(text: str) -> dict[str, int]:
    """`data=2,space=4[,space2=2]` (the --mesh flag) -> {"data": 2, "space": 4}."""
    result = {}
    for part in text.split(","):
        name, sep, value = part.strip().partition("=")
        if not sep or name not in ("data", "space", "space2"):
            raise MedsegError(f"--mesh {text}: expected comma-separated data=D,space=S[,space2=T]")
        try:
            result[name] = int(value)
        except ValueError:
            raise MedsegError(f"--mesh {text}: '{value}' is not a whole number") from None
    return result
