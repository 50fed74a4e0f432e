"""``lora-studio merge``: placeholder until its issue lands."""

from __future__ import annotations

from lora_studio.core.errors import UserError


def add_parser(sub) -> None:
    p = sub.add_parser("merge", help="(not available yet)")
    p.set_defaults(run=run)


def run(args) -> int:
    raise UserError("'merge' is not available in this build yet", "see the README")
