"""Apple silicon's mps, chosen where it runs: the choices, the refusals, unified memory in the estimate.

No Mac runs this suite: the machine's devices are passed in, as torch would report them on one.
"""

from __future__ import annotations

import pytest
from cli_helpers import run_in_process

from lora_studio.core.errors import UserError
from lora_studio.core.model.estimate import judge
from lora_studio.core.session import check_device
from lora_studio.core.system.devices import Devices, check_mps, mps_here

GIB = 1024**3
MAC = Devices(cuda=0, mps=True, mps_bfloat16=True)


def test_mps_is_offered_only_where_it_runs():
    assert Devices().choices() == ["cpu", "auto"]
    assert Devices(cuda=2).choices() == ["cpu", "cuda:0", "cuda:1", "auto"]
    assert MAC.choices() == ["cpu", "mps", "auto"]
    assert MAC.auto_target() == "mps" and Devices(cuda=1, mps=True).auto_target() == "cuda:0"
    assert mps_here() is False  # this Linux machine: torch is not even asked


def test_what_mps_cannot_run_is_refused_in_one_line():
    check_mps("float16", None, MAC)
    check_mps("bfloat16", None, MAC)
    with pytest.raises(UserError, match="mps has no float64"):
        check_mps("float64", None, MAC)
    with pytest.raises(UserError, match="bfloat16 on mps needs macOS 14"):
        check_mps("bfloat16", None, Devices(mps=True, mps_bfloat16=False))
    with pytest.raises(UserError, match=r"nf4 quantisation .* does not run on mps"):
        check_mps("float16", "nf4", MAC)
    with pytest.raises(UserError, match="mps is not available on this machine"):
        check_device("mps", dtype="float32")
    check_device("mps", dtype="float16", devices=MAC)


def test_mps_memory_is_the_ram():
    verdict, where, why = judge("mps", 3 * GIB, 8 * GIB, {})
    assert (verdict, where) == ("fits", "mps") and "unified memory" in why
    assert judge("mps", 9 * GIB, 8 * GIB, {})[0] == "does_not_fit"
    assert judge("auto", 3 * GIB, 8 * GIB, {}, mps=True)[1] == "mps"
    assert judge("auto", 3 * GIB, 8 * GIB, {}, mps=False)[1] == "cpu"


def test_the_cli_says_in_one_line_that_mps_is_not_here(capsys, tiny_llama):
    code, _, err = run_in_process(capsys, ["compare", tiny_llama, "--device-map", "mps", "--prompt", "hi"])
    assert code == 2 and "mps is not available" in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("lora-studio: error")]) == 1
