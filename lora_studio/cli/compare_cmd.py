"""``lora-studio compare``: placeholder until its issue lands."""

from __future__ import annotations

from lora_studio.core.errors import UserError


def add_parser(sub) -> None:
    p = sub.add_parser("compare", help="(not available yet)")
    p.set_defaults(run=run)


def run(args) -> int:
    raise UserError("'compare' is not available in this build yet", "see the README")
