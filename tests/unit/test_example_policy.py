"""The shipped example policy says what the documented defaults are
(issue 24 item 6): it said `raw: skip` while docs/configuration.md gives
`full` as the default, so an operator copying it left raw disks out
without meaning to."""

from __future__ import annotations

from pathlib import Path

from virtbackupd.config.policy import load_policy
from virtbackupd.core.policy import Policy

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "policies.d" / "example.yaml"


def test_the_example_policy_keeps_the_documented_raw_default() -> None:
    default = Policy(Path("p.yaml"), domains=("x",))
    assert load_policy(EXAMPLE).raw == default.raw
    assert (
        "| `disks.raw` | `full` |" in (EXAMPLE.parents[2] / "docs" / "configuration.md").read_text()
    )
